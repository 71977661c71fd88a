"""Errors desloc raises for bad input. Each message names the field, the value and the fix."""


class ConfigError(ValueError):
    """A configuration value is out of range or unknown."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the run it is loaded into."""


class RunDirError(ValueError):
    """A run directory cannot be used as asked (not empty, in use, nothing to resume, ...)."""


class RunComplete(Exception):
    """``--resume`` on a run that already reached its last step: nothing to do."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or state; nothing non-finite was checkpointed."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Interrupted(Exception):
    """SIGINT / SIGTERM: the run stopped after a step and saved a checkpoint."""

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum = signum
        self.step = step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


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


class DeslocWarning(UserWarning):
    """Input desloc accepts but that is probably not what was meant (the CLI prints one line)."""


def check_finite(field: str, value: object, example: str = "") -> None:
    """Validate a real number that must be finite (not NaN or +-inf, not a string or bool)."""
    import math

    hint = f"; e.g. {example}" if example else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field} must be a number, got {value!r} ({type(value).__name__}){hint}")
    if not math.isfinite(value):
        raise ConfigError(f"{field} must be a finite number, got {value}{hint}")
