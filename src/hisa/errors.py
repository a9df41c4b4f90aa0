"""User-facing errors.

Every error a user can cause (a bad path, an unsupported model, invalid sampling values, a prompt
that does not fit) is raised as a subclass of :class:`HisaError` with a message that says what to
change. The CLI prints these without a traceback; everything else is a bug and keeps its traceback.
"""


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
