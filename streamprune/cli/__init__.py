"""The command line: `streamprune` and its subcommands (`main`), and the `run` config file."""

from streamprune.cli.main import main

__all__ = ["main"]
