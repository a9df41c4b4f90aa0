"""User-facing errors.

Every error a user can cause (a bad path, an unsupported model, invalid sampling values, a prompt
that does not fit) is raised as a subclass of :class:`HisaError` with a message that says what to
change. The CLI prints these without a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math


class HisaError(Exception):
    """An error caused by input the user can fix; the message says how."""


class ModelLoadError(HisaError):
    """The model path, format or architecture cannot be used."""


class InvalidRequestError(HisaError, ValueError):
    """A request (prompt or sampling parameters) is invalid."""


class ConfigError(HisaError, ValueError):
    """An engine configuration value is invalid."""


class StepFailedError(RuntimeError):
    """An engine step failed for a reason no single request caused (out of memory, a bug): the step's
    requests were ended with this error and their pages freed; the engine goes on."""


class DeviceError(RuntimeError):
    """The device no longer works (a CUDA error that persists after a failed step): the engine stops."""


def is_int(value) -> bool:
    """An int, not a bool (True is an int to Python) and not a float such as 96.0."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """An int or a float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value, *, low: int = 0, high: int | None = None) -> None:
    """Raise ConfigError unless `value` is an int (`is_int`) in [low, high]."""
    if not is_int(value) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be an integer {bounds}, got {value!r}")


def check_number(name: str, value, *, low: float, open_low: bool = False) -> None:
    """Raise ConfigError unless `value` is a finite number >= low (> low with open_low): NaN and inf are
    refused here, where a check like `value <= 0` lets NaN through to fail later without saying why."""
    if not is_finite_number(value) or not (value > low if open_low else value >= low):
        raise ConfigError(f"{name} must be a finite number {'>' if open_low else '>='} {low:g}, got {value!r}")
