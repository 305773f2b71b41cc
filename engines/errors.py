"""Error types shared by the build-time pipeline and the runtime.

The CLI maps them to exit codes: InputError and BackendUnavailable -> 2, parity failures -> 1.
"""


class DDCompileError(Exception):
    """Base class: a one-line, user-facing message."""


class InputError(DDCompileError):
    """Bad user input: a missing or malformed file, option or feed (exit code 2)."""


class BackendUnavailable(DDCompileError):
    """A backend's package or device is missing; the message names the extra to install."""


class IntegrityError(DDCompileError):
    """An artifact does not match the manifest (sha256, versions, target)."""
