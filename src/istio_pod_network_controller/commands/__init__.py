"""Subcommands: one module each, exposing ``main(argv: list[str]) -> int``."""
