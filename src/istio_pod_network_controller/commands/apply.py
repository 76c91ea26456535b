"""`apply`: program one network namespace by hand, exactly as the agent would, and verify it.

For administrators and tests on a node: the ruleset comes from istio-iptables flags or a pod
manifest (the same parsing as `rules`), the namespace from a path, a PID or a pod UID. Prints a
one-line JSON summary; exit 0 only when the rules were applied and read back as intended.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import EXIT_FAILURE, EXIT_OK, PROG
from ..node import locate
from ..node.apply import Applier
from ..node.backend import Backend, detect
from ..node.errors import LocateError, NodeError
from ..node.netns import Netns
from ..node.nft import NftApplier, NftPlan
from ..render import Ruleset, render
from ..render.nftables import render_nftables
from ..spec import OutOfScope, RedirectSpec, SpecError
from ..spec.flags import add_redirect_flags, check_arg_count
from ..spec.manifest import ManifestError
from .common import Parser, UsageError, wants_help
from .rules import add_manifest_flags, add_mode_flag, manifest_spec, report, spec_from_cli


def _own_flags(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("which network namespace (one of)")
    where.add_argument(
        "--netns", metavar="PATH", help="a namespace file: /var/run/netns/NAME, /proc/PID/ns/net"
    )
    where.add_argument("--pid", metavar="PID", type=int, help="a process in the pod (its network namespace)")
    where.add_argument("--pod-uid", metavar="UID", help="find the pod's namespace through /proc cgroups")
    parser.add_argument(
        "--pod-ip",
        metavar="IP",
        action="append",
        default=[],
        help="with --pod-uid: the namespace must hold this IP (repeatable; default: the manifest's podIPs)",
    )
    parser.add_argument("--proc-root", default="/proc", help="the host's /proc (default /proc)")
    parser.add_argument(
        "--backend",
        choices=("auto", "nft", "legacy"),
        default="auto",
        help="iptables backend (iptables mode only)",
    )
    add_mode_flag(parser)
    add_manifest_flags(parser)


def own_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=f"{PROG} apply", add_help=False, allow_abbrev=False)
    _own_flags(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The complete parser: our flags and the istio-iptables ones (for --help and the docs test)."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} apply",
        description="Apply and verify the redirect rules in one network namespace (root).",
        allow_abbrev=False,
    )
    _own_flags(parser)
    add_redirect_flags(parser)
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, RedirectSpec]:
    """Our own flags, then the spec: istio-iptables flags (shared with `rules`) or --pod."""
    check_arg_count("command line", argv)  # before argparse, whose cost is quadratic in it
    args, rest = own_parser().parse_known_args(argv)
    if args.pod:
        if rest:
            raise SpecError(rest[0], rest[0], "give either istio-iptables flags or --pod, not both")
        pod, spec = manifest_spec(args)
        if not args.pod_ip:
            args.pod_ip = list(pod.ips)
        if not (args.netns or args.pid or args.pod_uid) and pod.uid:
            args.pod_uid = pod.uid
    else:
        if args.namespace:
            raise SpecError("--namespace", args.namespace, "--namespace goes with --pod")
        if "--output" in rest:
            raise SpecError("--output", "", "apply always prints one JSON line")
        _, spec = spec_from_cli(rest)
    if args.native_nftables and args.backend != "auto":
        why = "--backend chooses the iptables variant; not with --native-nftables"
        raise SpecError("--backend", args.backend, why)
    chosen = [name for name in ("netns", "pid", "pod_uid") if getattr(args, name) not in (None, "")]
    if len(chosen) != 1:
        raise SpecError("--netns/--pid/--pod-uid", "", "give exactly one way to find the namespace")
    if args.pod_ip and not args.pod_uid:
        raise SpecError("--pod-ip", args.pod_ip[0], "--pod-ip goes with --pod-uid")
    if args.pod_uid:
        try:
            locate.valid_pod_uid(args.pod_uid)
            locate.parse_ips(args.pod_ip)
        except LocateError as exc:
            raise SpecError("--pod-uid/--pod-ip", "", exc.reason) from None
    return args, spec


def open_namespace(args: argparse.Namespace) -> Netns:
    if args.netns:
        return locate.by_path(args.netns, proc_root=args.proc_root)
    if args.pid is not None:
        return locate.by_pid(args.pid, proc_root=args.proc_root)
    return locate.by_pod_uid(args.pod_uid, pod_ips=args.pod_ip, proc_root=args.proc_root)


def planned(args: argparse.Namespace, spec: RedirectSpec) -> Ruleset | NftPlan:
    """The rules in the mode the flags name; raises SpecError for what that mode cannot write
    (before any namespace is opened, so a refusal leaves nothing half-done)."""
    return NftPlan.of(render_nftables(spec)) if args.native_nftables else render(spec)


def run(args: argparse.Namespace, rules: Ruleset | NftPlan) -> dict[str, object]:
    """Apply ``rules`` in the mode the flags name; the summary says which."""
    if isinstance(rules, NftPlan):
        nft = NftApplier()
        with open_namespace(args) as ns:
            return nft.apply(ns, rules).summary()
    forced = None if args.backend == "auto" else Backend(args.backend)
    applier = Applier(detect(forced=forced))
    with open_namespace(args) as ns:
        return applier.apply(ns, rules).summary()


def main(argv: list[str]) -> int:
    if wants_help(argv):
        build_parser().print_help()
        return EXIT_OK
    try:
        args, spec = parse(argv)
        rules = planned(args, spec)
    except (OutOfScope, SpecError, ManifestError, UsageError) as exc:
        return report("apply", exc)
    try:
        summary = run(args, rules)
    except NodeError as exc:
        print(json.dumps({"ok": False, "step": exc.step, "reason": exc.reason}))
        print(f"{PROG} apply: failed at {exc.step}: {exc.reason}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps({"ok": True, **summary}))
    return EXIT_OK
