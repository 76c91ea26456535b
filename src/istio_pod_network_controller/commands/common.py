"""Pieces more than one subcommand's command line needs: number arguments, and turning a bad
spec into the one-line message and exit status every command gives for it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..cli import EXIT_INVALID, EXIT_OUT_OF_SCOPE, PROG
from ..decide import scope_problem
from ..podfacts import AnyNamespace, AnyPod, namespace_facts, pod_facts
from ..spec import OutOfScope, RedirectSpec, SpecError, spec_from_pod
from ..spec.manifest import ManifestError
from ..spec.pod import TRAFFIC_ANNOTATIONS

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


def spec_for_manifest(pod: AnyPod, namespace: AnyNamespace) -> RedirectSpec:
    """The spec of a pod given as a file (`rules --pod`, `apply --pod`); OutOfScope with the
    agent's own reason for a pod it would never program. Traffic annotations are checked even
    then: a wrong value is worth saying before "not ours"."""
    pod, namespace = pod_facts(pod), namespace_facts(namespace)
    problem = scope_problem(pod)
    if problem is None:
        return spec_from_pod(pod, namespace)
    if not pod.host_network and any(a in pod.annotations for a in TRAFFIC_ANNOTATIONS):
        spec_from_pod(pod, namespace)
    raise OutOfScope(problem)


def spec_problem(command: str, exc: SpecProblem) -> int:
    """Print why there is no spec, in one line, and return the exit status for it."""
    if isinstance(exc, OutOfScope):
        print(f"{PROG} {command}: out of scope: {exc.reason}", file=sys.stderr)
        return EXIT_OUT_OF_SCOPE
    print(f"{PROG} {command}: {exc}", file=sys.stderr)
    return EXIT_INVALID
