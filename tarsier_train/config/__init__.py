from tarsier_train.config.validate import ConfigError, redact, validate_config

__all__ = ["ConfigError", "redact", "validate_config"]
