"""Error types shared by the build-time pipeline and the runtime, each with its CLI exit code.

engines/cli_errors.py maps them for every console script: InputError, BackendError (and its
BackendUnavailable) and IntegrityError -> 2; a failed parity/quality check -> 1 (a report, not an
exception; TrainingDiverged is its dd-distill form); any other exception is a bug -> 4.
"""


class DDCompileError(Exception):
    """Base class: a one-line, user-facing message."""

    exit_code = 2


class InputError(DDCompileError):
    """Bad user input: a missing or malformed file, option or feed (exit code 2)."""


class BackendError(DDCompileError):
    """A backend failed on valid input (a TensorRT build, a provider that will not start): exit 2."""


class BackendUnavailable(BackendError):
    """A backend's package or device is missing; the message names the extra to install."""


class IntegrityError(DDCompileError):
    """An artifact does not match the manifest (sha256, versions, target)."""
