"""The neoxconv app: the typer application, its consoles, the root options and `main()`, which
turns every outcome into an exit code (0 ok, 1 check failed, 2 bad input or usage, 3 our bug).
Heavy imports (torch, transformers) happen inside the commands so `neoxconv --help` stays fast."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="Convert GPT-NeoX checkpoints to and from Hugging Face and Meta Llama at any tensor-parallel "
         "degree, and prove each conversion numerically.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        from neoxconv import __version__

        print(f"neoxconv {__version__}")
        raise typer.Exit(0)


@app.callback()


def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug


def _click_exceptions():
    """The exception module of the click that typer runs on. typer >= 0.24 vendors click as
    `typer._click`, whose UsageError is not the separately installed `click`'s: matching on
    `click.exceptions` turned every usage mistake into an "internal error" (exit 3)."""
    import importlib

    return importlib.import_module(typer.BadParameter.__module__)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    clicks = _click_exceptions()
    try:
        rc = app(standalone_mode=False, prog_name="neoxconv")
    except SystemExit:
        raise
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[red]aborted[/red]")
        sys.exit(130)
    except clicks.ClickException as e:  # usage errors: usage line, --help hint, exit 2
        if debug:
            console.print_exception()
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the top level turns every error into one line
        from neoxconv.errors import NeoxconvError

        if debug:
            console.print_exception()
        if isinstance(e, NeoxconvError):
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        console.print(f"[red]internal error:[/red] {type(e).__name__}: {e} (run with --debug for a traceback)",
                      highlight=False, soft_wrap=True)
        sys.exit(3)
    if rc == 130:  # typer turns Ctrl-C inside a command into exit code 130
        console.print("[red]aborted[/red]")
    sys.exit(rc if isinstance(rc, int) else 0)
