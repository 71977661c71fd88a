"""Errors desloc raises for bad input. Each message names the field, the value and the fix."""


class ConfigError(ValueError):
    """A configuration value is out of range or unknown."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the run it is loaded into."""


def check_period(field: str, value: object, allow_none: bool = False) -> None:
    """Validate a sync period: an integer >= 1 (or None = never, where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        never = " or None (never sync)" if allow_none else ""
        raise ConfigError(
            f"sync period {field} must be an integer >= 1{never}, got {value!r} "
            f"({type(value).__name__}); e.g. {field}=256"
        )
    if value < 1:
        raise ConfigError(
            f"sync period {field} must be >= 1, got {value}; use 1 to average every step"
            + ("" if not allow_none else " or None to never average")
        )
