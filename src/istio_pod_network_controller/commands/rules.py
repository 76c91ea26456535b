"""`rules`: print the ruleset for istio-iptables flags or a pod manifest (no side effects)."""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import EXIT_OK, PROG
from ..render import Ruleset, render
from ..spec import OutOfScope, RedirectSpec, SpecError
from ..spec.flags import FLAGS, add_redirect_flags, check_arg_count, normalize_argv, spec_from_args
from ..spec.manifest import ManifestError, load_object, load_pod
from .common import spec_for_manifest, spec_problem


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SpecError("arguments", "", message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} rules",
        description="Print the iptables-restore rulesets (IPv4, IPv6) for istio-iptables flags or a pod.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--pod", metavar="FILE", help="a Pod or workload manifest (JSON or YAML; - for stdin)"
    )
    parser.add_argument("--namespace", metavar="FILE", help="the pod's Namespace object (with --pod)")
    parser.add_argument("--output", choices=("text", "json"), default="text", help="output format")
    add_redirect_flags(parser)
    return parser


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
        pod = load_pod(args.pod)
        namespace = load_object(args.namespace) if args.namespace else None
        return args, spec_for_manifest(pod, namespace)
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


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return EXIT_OK
    try:
        args, spec = spec_from_cli(argv)
    except (OutOfScope, SpecError, ManifestError) as exc:
        return spec_problem("rules", exc)
    ruleset = render(spec)
    if args.output == "json":
        doc = {"iptables": ruleset.iptables, "ip6tables": ruleset.ip6tables, "spec": spec.to_json()}
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.write(format_text(ruleset))
    return EXIT_OK
