"""Check a composed config before any compute: every `_target_` importable, every key a real argument.

All problems are collected and raised as one error that names each key and what is allowed.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from tarsier_train.models.load import MODEL_DTYPES

# Arguments train.py passes at build time rather than from YAML, per role.
RUNTIME_ARGUMENTS = {"data": {"processor"}, "objective": {"model", "processor"}, "trainer": {"callbacks", "logger", "plugins", "default_root_dir"}}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Whole words of a key (max_new_tokens is not a token): api_key, wandb_token, client_secret, password, ...
SECRET_KEY = re.compile(r"(?:^|_)(?:api_?key|token|secret|password)(?:$|_)", re.IGNORECASE)
RESUME_CHOICES = "null, auto, or a path to a .ckpt file"
MODES = ("fit", "predict")
LOW_PRECISION_WEIGHTS = ("bf16-true", "16-true")


class ConfigError(ValueError):
    pass


def validate_config(cfg: DictConfig) -> None:
    problems = [f"{key}: required value is missing (set {key}=...)" for key in _missing_keys(cfg)]
    container = OmegaConf.to_container(cfg, resolve=False)
    problems += _check_targets(container, "")
    resume = cfg.get("resume")
    if resume is not None and not isinstance(resume, str):
        problems.append(f"resume={resume!r}: allowed values are {RESUME_CHOICES}")
    if cfg.get("mode", "fit") not in MODES:
        problems.append(f"mode={cfg.mode!r}: allowed values are {', '.join(MODES)}")
    problems += _precision_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _precision_problems(cfg: DictConfig) -> list[str]:
    """model.dtype is one the weights can load in; training never updates low-precision weights directly (what trains
    is fp32, compute runs in bf16 through bf16-mixed or FSDP2's policy)."""
    problems = []
    dtype = OmegaConf.select(cfg, "model.dtype")
    if dtype not in MODEL_DTYPES:
        problems.append(f"model.dtype={dtype!r}: allowed values are {', '.join(MODEL_DTYPES)}")
    precision = str(OmegaConf.select(cfg, "trainer.precision"))
    if cfg.get("mode", "fit") == "fit" and precision in LOW_PRECISION_WEIGHTS:
        problems.append(f"trainer.precision={precision}: it would train {precision.split('-')[0]} weights, whose "
                        "resolution rounds away updates at Tarsier2's learning rates; allowed for training: 32-true, "
                        "bf16-mixed, 16-mixed (or trainer=fsdp with trainer.strategy.mixed_precision=bf16)")
    return problems


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
        if "_target_" in node:
            problems += _check_call(node, path)
        for key, value in node.items():
            problems += _check_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, ListConfig)):
        for index, value in enumerate(node):
            problems += _check_targets(value, f"{path}[{index}]")
    return problems


def _check_call(node: dict, path: str) -> list[str]:
    target = node["_target_"]
    try:
        functions = _init_chain(get_object(target))
    except Exception as error:  # noqa: BLE001 - any import failure is the user's bad _target_
        return [f"{path}._target_={target!r} cannot be imported: {error}"]
    problems = _check_choices(node, path, functions)
    parameters = [p for f in functions for p in inspect.signature(f).parameters.values()]
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(functions[-1]).parameters.values()):
        return problems  # the chain ends in **kwargs: any key may be meant for it
    accepted = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
    unknown = sorted(set(node) - HYDRA_KEYS - accepted)
    allowed = ", ".join(sorted(accepted - RUNTIME_ARGUMENTS.get(path, set())))
    return problems + [f"{path}.{key}: not an argument of {target} (allowed: {allowed})" for key in unknown]


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


def _check_choices(node: dict, path: str, functions: list[Any]) -> list[str]:
    """Values given for Literal-typed parameters must be among the literals."""
    hints: dict[str, Any] = {}
    for function in reversed(functions):
        try:
            hints.update(typing.get_type_hints(function))
        except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against
            continue
    problems = []
    for key, value in node.items():
        choices = _literal_choices(hints.get(key))
        if choices and isinstance(value, str) and "${" not in value and value not in choices:
            problems.append(f"{path}.{key}={value!r}: allowed values are {', '.join(map(str, choices))}")
    return problems


def _literal_choices(annotation: Any) -> tuple:
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return tuple(c for arg in typing.get_args(annotation) for c in _literal_choices(arg))


def redact(container: Any) -> Any:
    """A copy of a config container with secret-looking values replaced, for anything written to disk."""
    if isinstance(container, dict):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) and v is not None else redact(v) for k, v in container.items()}
    if isinstance(container, list):
        return [redact(v) for v in container]
    return container
