"""`rules`: print the ruleset for istio-iptables flags or a pod manifest (no side effects)."""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import EXIT_OK, EXIT_OUT_OF_SCOPE, PROG
from ..decide import scope_problem
from ..podfacts import AnyNamespace, AnyPod, PodFacts, namespace_facts, pod_facts
from ..render import Ruleset, TproxyRoute, render
from ..render.nftables import NftRuleset, render_nftables
from ..spec import OutOfScope, RedirectSpec, SpecError, spec_from_pod
from ..spec.flags import FLAGS, add_redirect_flags, check_arg_count, normalize_argv, spec_from_args
from ..spec.manifest import ManifestError, load_object, load_pod
from ..spec.pod import TRAFFIC_ANNOTATIONS
from .common import Parser, UsageError, fail, wants_help

SpecProblem = OutOfScope | SpecError | ManifestError | UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=f"{PROG} rules",
        description="Print the iptables-restore rulesets (IPv4, IPv6), or with --native-nftables the nft "
        "transaction, for istio-iptables flags or a pod.",
        allow_abbrev=False,
    )
    add_manifest_flags(parser)
    parser.add_argument("--output", choices=("text", "json"), default="text", help="output format")
    add_mode_flag(parser)
    add_redirect_flags(parser)
    return parser


def add_manifest_flags(parser: argparse.ArgumentParser) -> None:
    """``--pod`` and ``--namespace``, the other way than flags to give `rules` and `apply` a spec."""
    parser.add_argument(
        "--pod", metavar="FILE", help="a Pod or workload manifest (JSON or YAML; - for stdin)"
    )
    parser.add_argument("--namespace", metavar="FILE", help="the pod's Namespace object (with --pod)")


def add_mode_flag(parser: argparse.ArgumentParser) -> None:
    """``--native-nftables``: Istio's native nftables mode instead of iptables (`rules`, `apply`)."""
    parser.add_argument(
        "--native-nftables",
        action="store_true",
        help="Istio's native nftables mode: one nft transaction (tables inet istio-proxy-*) instead "
        "of iptables-restore rulesets",
    )


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


def manifest_spec(args: argparse.Namespace) -> tuple[PodFacts, RedirectSpec]:
    """The pod of ``--pod`` and its spec (with ``--namespace``'s Namespace when given)."""
    pod = pod_facts(load_pod(args.pod))
    namespace = load_object(args.namespace) if args.namespace else None
    return pod, spec_for_manifest(pod, namespace)


def report(command: str, exc: SpecProblem) -> int:
    """Say why there is no spec, in one line, and return the exit status for it."""
    if isinstance(exc, OutOfScope):
        return fail(command, f"out of scope: {exc.reason}", EXIT_OUT_OF_SCOPE)
    return fail(command, exc)


def spec_from_cli(argv: list[str]) -> tuple[argparse.Namespace, RedirectSpec]:
    """Shared by `rules` and `apply`: flags or --pod (never both)."""
    check_arg_count("command line", argv)  # before argparse, whose cost is quadratic in it
    parser = build_parser()
    normalized, falses = normalize_argv(argv)
    args, unknown = parser.parse_known_args(normalized)
    if unknown:
        raise SpecError(unknown[0], unknown[0], "unknown flag or stray argument")
    if args.pod:
        flagged = [f.names[0] for f in FLAGS if getattr(args, f.dest) is not None]
        if flagged or falses:
            name = flagged[0] if flagged else next(iter(falses))
            raise SpecError(name, name, "give either istio-iptables flags or --pod, not both")
        _, spec = manifest_spec(args)
        return args, spec
    if args.namespace:
        raise SpecError("--namespace", args.namespace, "--namespace goes with --pod")
    return args, spec_from_args(args, falses=falses)


def format_text(ruleset: Ruleset) -> str:
    parts = ["# IPv4: iptables-restore --noflush\n", ruleset.iptables or "# (no rules)\n"]
    if ruleset.ip6tables:
        parts += ["# IPv6: ip6tables-restore --noflush\n", ruleset.ip6tables]
    if ruleset.tproxy:
        mark, table = ruleset.tproxy.mark, ruleset.tproxy.table
        parts.append(f"# policy route: ip rule add fwmark {mark} lookup {table}; "
                     f"ip route add local default dev lo table {table}\n")  # fmt: skip
    return "".join(parts)


def format_nftables(ruleset: NftRuleset) -> str:
    parts = ["# nftables: nft -f -\n", ruleset.text() or "# (no rules)\n"]
    parts += _outside(ruleset.tproxy, ruleset.ipv6_passthrough_address)
    return "".join(parts)


def _outside(tproxy: TproxyRoute | None, passthrough: bool) -> list[str]:
    """What the mode needs outside the packet filter, as comment lines."""
    parts = []
    if tproxy:
        parts.append(f"# policy route: ip rule add fwmark {tproxy.mark} lookup {tproxy.table}; "
                     f"ip route add local default dev lo table {tproxy.table}\n")  # fmt: skip
    if passthrough:
        parts.append("# address: ip -6 addr add ::6/128 dev lo\n")
    return parts


def main(argv: list[str]) -> int:
    if wants_help(argv):
        build_parser().print_help()
        return EXIT_OK
    try:
        args, spec = spec_from_cli(argv)
        # Each mode's renderer may refuse what only it cannot write (iptables: 50+ owner groups).
        rendered = render_nftables(spec) if args.native_nftables else render(spec)
    except (OutOfScope, SpecError, ManifestError, UsageError) as exc:
        return report("rules", exc)
    if isinstance(rendered, NftRuleset):
        nft = rendered
        if args.output == "json":
            print(json.dumps({**nft.to_json(), "spec": spec.to_json()}, indent=2))
        else:
            sys.stdout.write(format_nftables(nft))
        return EXIT_OK
    ruleset = rendered
    if args.output == "json":
        doc = {"iptables": ruleset.iptables, "ip6tables": ruleset.ip6tables, "spec": spec.to_json()}
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.write(format_text(ruleset))
    return EXIT_OK
