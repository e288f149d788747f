"""Check a composed config before any compute: every `_target_` importable, every key a real argument, every value
of the type and in the range its schema allows.

The schema of a `_target_` node is its target's signature (its type hints, ranges as `Annotated` markers from
tarsier_train.config.types); the rest of the config follows tarsier_train.config.schema. All problems are collected
and raised as one error that names each key, its value and what is allowed.
"""

from __future__ import annotations

import inspect
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tarsier_train.config.schema import Config
from tarsier_train.config.types import UNRESOLVED, value_problems

# Arguments train.py passes at build time rather than from YAML, per role.
RUNTIME_ARGUMENTS = {"data": {"processor", "model_dir"}, "objective": {"model", "processor"},
                     "trainer": {"callbacks", "logger", "plugins", "default_root_dir"}}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Whole words of a key (max_new_tokens is not a token): api_key, wandb_token, client_secret, password, ...
SECRET_KEY = re.compile(r"(?:^|[_-])(?:api_?key|access_?key|private_?key|token|secret|password|passwd|credentials?)"
                        r"(?:$|[_-])", re.IGNORECASE)
REDACTED = "<redacted>"
# Secrets inside values, whatever the key: credentials in URLs (scheme://user:pass@host), `key=value` pairs with a
# secret-looking key (Hydra overrides, URL queries), and well-known key formats wherever they appear.
_URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE)
# `key=value`, or `key: value` (a colon needs the space YAML needs: `https://`, `${oc.env:X}` are not assignments)
_ASSIGNMENT = re.compile(r"(?P<key>[\w.+~-]+)(?P<sep>\s*=\s*|:\s+)(?P<value>[^\s,;&'\"]+)")
_KEY_FORMATS = re.compile(r"\b(?:sk-[\w-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
                          r"|glpat-[\w-]{20,}|xox[abposr]-[\w-]{10,}|AKIA[0-9A-Z]{16}"
                          r"|eyJ[\w-]{10,}\.[\w-]{10,}\.[\w-]{10,})")
LOW_PRECISION_WEIGHTS = ("bf16-true", "16-true")


class ConfigError(ValueError):
    pass


def validate_config(cfg: DictConfig) -> None:
    problems = [f"{key}: required value is missing (set {key}=...)" for key in _missing_keys(cfg)]
    container = _resolved(cfg)
    problems += value_problems(container, Config, "")
    problems += _check_targets(container, "")
    problems += _precision_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _resolved(node: DictConfig | ListConfig) -> dict | list:
    """The config as plain containers, each interpolation resolved where it can be here and UNRESOLVED where not
    (${hydra:...} outside a Hydra run, a missing value): those are checked where they are resolved."""
    keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
    values = {key: _resolved_value(node, key) for key in keys}
    return values if isinstance(node, DictConfig) else list(values.values())


def _resolved_value(node: DictConfig | ListConfig, key: Any) -> Any:
    try:
        value = node[key]
    except OmegaConfBaseException:
        return UNRESOLVED
    return _resolved(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _precision_problems(cfg: DictConfig) -> list[str]:
    """Training never updates low-precision weights directly (what trains is fp32, compute runs in bf16 through
    bf16-mixed or FSDP2's policy)."""
    precision = str(OmegaConf.select(cfg, "trainer.precision"))
    if cfg.get("mode", "fit") != "fit" or precision not in LOW_PRECISION_WEIGHTS:
        return []
    return [f"trainer.precision={precision}: it would train {precision.split('-')[0]} weights, whose resolution "
            "rounds away updates at Tarsier2's learning rates; allowed for training: 32-true, bf16-mixed, 16-mixed "
            "(or trainer=fsdp with trainer.strategy.mixed_precision=bf16)"]


def _missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    missing = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            missing.append(full)
        elif isinstance(node := cfg._get_node(key), DictConfig):
            missing += _missing_keys(node, full + ".")
    return missing


def _check_targets(node: Any, path: str) -> list[str]:
    problems: list[str] = []
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            problems += _check_call(node, path)
        for key, value in node.items():
            problems += _check_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            problems += _check_targets(value, f"{path}[{index}]")
    return problems


def _check_call(node: dict, path: str) -> list[str]:
    """A `_target_` node against its target's signature: each value against its parameter's hint, each key an
    argument (nested `_target_` nodes are checked as nodes of their own)."""
    target = node["_target_"]
    try:
        functions = _init_chain(get_object(target))
    except Exception as error:  # noqa: BLE001 - any import failure is the user's bad _target_
        return [f"{path}._target_={target!r} cannot be imported: {error}"]
    hints = _signature_hints(functions)
    problems = [problem for key, value in node.items() if key not in HYDRA_KEYS and key in hints
                for problem in value_problems(value, hints[key], f"{path}.{key}")]
    return problems + _unknown_arguments(node, path, functions)


def _unknown_arguments(node: dict, path: str, functions: list[Any]) -> list[str]:
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(functions[-1]).parameters.values()):
        return []  # the chain ends in **kwargs: any key may be meant for it
    parameters = [p for f in functions for p in inspect.signature(f).parameters.values()]
    accepted = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
    unknown = sorted(set(node) - HYDRA_KEYS - accepted)
    allowed = ", ".join(sorted(accepted - RUNTIME_ARGUMENTS.get(path, set())))
    return [f"{path}.{key}: not an argument of {node['_target_']} (allowed: {allowed})" for key in unknown]


def _init_chain(obj: Any) -> list[Any]:
    """The callables whose parameters a config node may set: a function, or a class's __init__ and,
    while an __init__ forwards **kwargs, its bases' __init__s."""
    if not inspect.isclass(obj):
        return [obj]
    chain = []
    for cls in inspect.getmro(obj):
        if "__init__" in vars(cls):
            chain.append(cls.__init__)
            parameters = inspect.signature(cls.__init__).parameters.values()
            if not any(p.kind is p.VAR_KEYWORD for p in parameters):
                break
    return chain


def _signature_hints(functions: list[Any]) -> dict[str, Any]:
    """Each parameter's type hint along an __init__ chain, the subclass's where both annotate it."""
    hints: dict[str, Any] = {}
    for function in reversed(functions):
        hints.update(_hints(function))
    return hints


def _hints(function: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable annotations (e.g. type-checking-only imports): nothing to check
        return {}


def redact(container: Any) -> Any:
    """A copy of a config container with secrets replaced, for anything written to disk: the values of
    secret-looking keys, and secrets inside any string (see redact_text)."""
    if isinstance(container, dict):
        return {k: REDACTED if SECRET_KEY.search(str(k)) and v is not None else redact(v) for k, v in container.items()}
    if isinstance(container, list):
        return [redact(v) for v in container]
    return redact_text(container) if isinstance(container, str) else container


def redact_text(text: str) -> str:
    """`text` with URL credentials, values assigned to secret-looking keys (`objective.judge.api_key=...`,
    `?token=...`) and well-known key formats (sk-..., hf_..., ghp_...) replaced."""
    text = _URL_CREDENTIALS.sub(rf"\1{REDACTED}@", text)
    text = _ASSIGNMENT.sub(_redact_assignment, text)
    return _KEY_FORMATS.sub(REDACTED, text)


def _redact_assignment(match: re.Match) -> str:
    name = match["key"].lstrip("+~").rsplit(".", 1)[-1]  # an override's key is a dotted path: its last part counts
    if not SECRET_KEY.search(name) or match["value"] == REDACTED:
        return match.group(0)
    return f"{match['key']}{match['sep']}{REDACTED}"


HYDRA_DUMPS = ("config.yaml", "hydra.yaml", "overrides.yaml")


def redact_hydra_dumps(run_dir: Path, subdir: str | None = ".hydra") -> None:
    """Redact the copies Hydra writes before the run starts (<run_dir>/<subdir>/: the unresolved config, its own
    config with the command line, the overrides), which would otherwise keep a key given on the command line.
    `subdir` is hydra.output_subdir; None: Hydra wrote none. A file with nothing to redact is left as Hydra wrote it."""
    if subdir is None:
        return
    for path in (Path(run_dir) / subdir / name for name in HYDRA_DUMPS):
        if not path.is_file():
            continue
        content = yaml.safe_load(path.read_text())
        redacted = redact(content)
        if redacted != content:
            partial = path.with_name(path.name + ".partial")
            partial.write_text(yaml.safe_dump(redacted, sort_keys=False, allow_unicode=True))
            os.replace(partial, path)  # never a half-written copy, nor the secret left behind on a crash
