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
    """Validate a real number that must be finite (not NaN or +-inf, not a string or bool) and, unless
    it is 0, normal: a subnormal (0 < |x| < 2.2e-308, e.g. 5e-324) has lost its precision and
    overflows to infinity when divided into anything, so it is refused like infinity."""
    import math
    import sys

    hint = f"; e.g. {example}" if example else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field} must be a number, got {value!r} ({type(value).__name__}){hint}")
    if not math.isfinite(value):
        raise ConfigError(f"{field} must be a finite number, got {value}{hint}")
    if value != 0 and abs(value) < sys.float_info.min:
        raise ConfigError(f"{field} must be 0 or a normal number (|x| >= {sys.float_info.min:.3g}), got the "
                          f"subnormal {value!r}{hint}")


def check_range(field: str, value: object, low: float | None = None, high: float | None = None,
                low_open: bool = False, example: str = "") -> None:
    """:func:`check_finite`, then ``low <= value <= high`` (``low < value`` if ``low_open``)."""
    check_finite(field, value, example)
    assert isinstance(value, (int, float))
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        hint = f"; e.g. {example}" if example else ""
        raise ConfigError(f"{field} must be {' and '.join(x for x in (lo, hi) if x)}, got {value:g}{hint}")


def check_int(field: str, value: object, low: int, high: int | None = None, example: str = "") -> None:
    """An integer (not a bool) with ``low <= value <= high``."""
    hint = f"; e.g. {example}" if example else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field} must be an integer, got {value!r} ({type(value).__name__}){hint}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" + ("" if high is None else f" and <= {high:,}")
        raise ConfigError(f"{field} must be an integer {bound}, got {value}{hint}")
