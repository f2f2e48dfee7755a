"""The command line: `streamprune` and its subcommands (`main`)."""

from streamprune.cli.main import main

__all__ = ["main"]
