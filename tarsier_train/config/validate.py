"""Check a composed config before any compute: every `_target_` importable, every key a real argument, every value
of the type and in the range its schema allows.

The schema of a `_target_` node is its target's signature (its type hints, ranges as `Annotated` markers from
tarsier_train.config.types); the rest of the config follows tarsier_train.config.schema. All problems are collected
and raised as one error that names each key, its value and what is allowed.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

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
SECRET_KEY = re.compile(r"(?:^|_)(?:api_?key|token|secret|password)(?:$|_)", re.IGNORECASE)
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
    """A copy of a config container with secret-looking values replaced, for anything written to disk."""
    if isinstance(container, dict):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) and v is not None else redact(v) for k, v in container.items()}
    if isinstance(container, list):
        return [redact(v) for v in container]
    return container
