"""The ``glinthawk`` click group; the commands register on it.

Every user mistake ends with one ``Error: ...`` line on stderr and a non-zero exit code:
click's usage block is left out (the line names the command's ``--help``).
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import click


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C (SIGINT) a command caught to say what it leaves behind: its message is
    printed instead of ``Aborted!`` and the exit code is 130, as for any interrupt."""


class _SyncCancelBeforeStart(logging.Filter):
    """Drops the traceback distributed's ``sync`` logs when a Ctrl-C lands before the
    coroutine it waits for has started: its ``cancel`` callback reads a variable that is
    not bound yet (NameError, logged by tornado after the interrupt; nothing was running
    to cancel).  Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        if not exc or exc[0] is not NameError or exc[2] is None:
            return True
        last = traceback.extract_tb(exc[2])[-1]
        return not (last.name == "cancel" and last.filename.replace("\\", "/").endswith("distributed/utils.py"))


class _OneLineErrors(click.Group):
    """A group whose errors are one line, usage mistakes included."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        tornado = logging.getLogger("tornado.application")
        if not any(isinstance(f, _SyncCancelBeforeStart) for f in tornado.filters):
            tornado.addFilter(_SyncCancelBeforeStart())
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"Error: {_one_line(e.format_message())}{where}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"Error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Abort, EOFError, KeyboardInterrupt) as e:
            told = e if isinstance(e, Interrupted) else e.__cause__  # (click turns it into Abort)
            if isinstance(told, Interrupted):
                click.echo(f"Interrupted: {told}", err=True)
                sys.exit(130)
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _one_line(message: str) -> str:
    return " ".join(message.split())


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="glinthawk-dask")
def main() -> None:
    """glinthawk: high-throughput LLM batch inference, attention and KV caches on a CPU tier."""
