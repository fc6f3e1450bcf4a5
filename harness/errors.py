import functools
import sys


class HarnessError(Exception):
    """A user-facing error: one line naming the bad field, file or value."""


def one_line_errors(command):
    """CLI contract: a HarnessError becomes `error: ...` on stderr and exit code 2 instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer

        try:
            return command(*args, **kwargs)
        except HarnessError as error:
            print(f"error: {error}", file=sys.stderr)
            raise typer.Exit(code=2) from None

    return wrapper
