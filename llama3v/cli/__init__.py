"""The `llama3v` command line: the parser and dispatch (`main`), and the commands that are more than a call."""

from llama3v.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
