"""The command line: ``main`` and the parser; one module per stage family, each a parser beside its handlers."""

from llmstack.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
