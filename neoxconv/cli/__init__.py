"""neoxconv command line: parse, call, render. One module per group of commands; importing
them registers the commands on the app, in the order `--help` lists them."""

from neoxconv.cli import conversions  # noqa: F401, I001 - registers; the order is --help's
from neoxconv.cli import checks  # noqa: F401
from neoxconv.cli import publishing  # noqa: F401
from neoxconv.cli.app import app, main

__all__ = ["app", "main"]
