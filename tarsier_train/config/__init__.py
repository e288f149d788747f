"""Config checks. Loaded on first use, so that any module (data, models, recipes) can annotate its parameters with
tarsier_train.config.types without importing the checker and its schema, which import those modules."""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "redact", "validate_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tarsier_train.config import validate

        return getattr(validate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
