"""Pieces more than one subcommand's command line needs: number arguments, and turning a bad
spec into the one-line message and exit status every command gives for it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..cli import EXIT_INVALID, EXIT_OUT_OF_SCOPE, PROG
from ..spec import OutOfScope, SpecError
from ..spec.manifest import ManifestError

SpecProblem = OutOfScope | SpecError | ManifestError


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse ``type``: a number greater than 0 (argparse names the flag in its message)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
        return value

    return parse


def spec_problem(command: str, exc: SpecProblem) -> int:
    """Print why there is no spec, in one line, and return the exit status for it."""
    if isinstance(exc, OutOfScope):
        print(f"{PROG} {command}: out of scope: {exc.reason}", file=sys.stderr)
        return EXIT_OUT_OF_SCOPE
    print(f"{PROG} {command}: {exc}", file=sys.stderr)
    return EXIT_INVALID
