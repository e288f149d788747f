"""Check a composed config before any compute: every `_target_` importable, every key a real argument.

All problems are collected and raised as one error that names each key and what is allowed.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

# Arguments train.py passes at build time rather than from YAML, per role.
RUNTIME_ARGUMENTS = {"data": {"processor"}, "objective": {"model", "processor"}, "trainer": {"callbacks", "logger", "plugins", "default_root_dir"}}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
SECRET_KEY = re.compile(r"(api_?key|token|secret|password)", re.IGNORECASE)
RESUME_CHOICES = "null, auto, or a path to a .ckpt file"


class ConfigError(ValueError):
    pass


def validate_config(cfg: DictConfig) -> None:
    problems = [f"{key}: required value is missing (set {key}=...)" for key in _missing_keys(cfg)]
    container = OmegaConf.to_container(cfg, resolve=False)
    problems += _check_targets(container, "")
    resume = cfg.get("resume")
    if resume is not None and not isinstance(resume, str):
        problems.append(f"resume={resume!r}: allowed values are {RESUME_CHOICES}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


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
        accepted, takes_any = _accepted_arguments(get_object(target))
    except Exception as error:  # noqa: BLE001 - any import failure is the user's bad _target_
        return [f"{path}._target_={target!r} cannot be imported: {error}"]
    if takes_any:
        return []
    given = set(node) - HYDRA_KEYS
    unknown = sorted(given - accepted)
    if not unknown:
        return []
    allowed = ", ".join(sorted(accepted - RUNTIME_ARGUMENTS.get(path, set())))
    return [f"{path}.{key}: not an argument of {target} (allowed: {allowed})" for key in unknown]


def _accepted_arguments(obj: Any) -> tuple[set[str], bool]:
    """Parameter names of a callable; for a class whose __init__ forwards **kwargs, its bases' too."""
    classes = inspect.getmro(obj) if inspect.isclass(obj) else ()
    functions = [c.__init__ for c in classes if "__init__" in vars(c)] if classes else [obj]
    accepted: set[str] = set()
    for function in functions:
        parameters = inspect.signature(function).parameters.values()
        accepted |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return accepted, False
    return accepted, True


def redact(container: Any) -> Any:
    """A copy of a config container with secret-looking values replaced, for anything written to disk."""
    if isinstance(container, dict):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) and v is not None else redact(v) for k, v in container.items()}
    if isinstance(container, list):
        return [redact(v) for v in container]
    return container
