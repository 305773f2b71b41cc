"""Exceptions -> one line and an exit code, the same way for all five console scripts.

0 success; 1 a parity/quality check failed (the CLI exits 1 itself, after writing the report);
2 bad input, an unusable file system path, or a missing/failing backend (engines.errors);
3 dd-distill stopped early on request (resume with --resume); 4 an internal error: a bug.
Click's own usage errors keep click's exit code 2. A traceback is printed only with --debug or
DD_DEBUG=1.
"""

from __future__ import annotations

import errno
import os
import re
import traceback
from typing import Any

import click

from engines.errors import DDCompileError

DEBUG_ENV = "DD_DEBUG"
EXIT_INTERNAL = 4

# OSErrors the user can fix (space, permissions, a path that is a file, a read-only mount...):
# one line naming the path, exit 2. Any other OSError is unexpected and reported as a bug.
USER_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC",
        "EDQUOT",
        "EFBIG",
        "EACCES",
        "EPERM",
        "EROFS",
        "ENOTDIR",
        "EISDIR",
        "ENOENT",
        "EEXIST",
        "ENOTEMPTY",
        "ENAMETOOLONG",
        "ELOOP",
        "EXDEV",
    )
    if hasattr(errno, name)
)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def describe(prog: str, exc: BaseException) -> tuple[int, str]:
    """(exit code, the one line to print) for an exception that reached a CLI."""
    if isinstance(exc, DDCompileError):
        return exc.exit_code, f"{prog}: error: {_one_line(exc)}"
    if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
        where = exc.filename if exc.filename is not None else "(output file)"
        reason = exc.strerror or os.strerror(exc.errno)
        extra = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return 2, f"{prog}: error: {where}{extra}: {reason}"
    return EXIT_INTERNAL, (
        f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)[:500]} — this is a bug in "
        f"{prog}, please report it with the command (rerun with --debug or {DEBUG_ENV}=1 for the "
        "traceback)"
    )


def debug_enabled(ctx: click.Context | None = None) -> bool:
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        return True
    return bool(ctx is not None and ctx.meta.get("dd_debug"))


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta["dd_debug"] = True


def debug_option() -> click.Option:
    return click.Option(
        ["--debug"],
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_debug,
        help=f"Print the traceback of an error (also: {DEBUG_ENV}=1).",
    )


def report_exception(ctx: click.Context | None, prog: str, exc: BaseException) -> int:
    """Print the exception's one line (and the traceback in debug mode); return the exit code."""
    code, line = describe(prog, exc)
    if debug_enabled(ctx):
        traceback.print_exception(exc)
    click.echo(line, err=True)
    return code


class _Guarded:
    """Mixin: adds --debug and maps every exception escaping the command's callback."""

    def __init__(self, *args: Any, prog: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.prog = prog
        self.params.append(debug_option())  # type: ignore[attr-defined]

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors keep click's own message and exit code
        except Exception as e:
            ctx.exit(report_exception(ctx, self.prog, e))


class GuardedCommand(_Guarded, click.Command):
    """`@click.command(cls=GuardedCommand, prog="dd-x")`."""


class GuardedGroup(_Guarded, click.Group):
    """`@click.group(cls=GuardedGroup, prog="dd-x")`: guards its subcommands too."""
