"""Benchmark: apply + verify the default sidecar ruleset into fresh network namespaces.

Compares the node side (one iptables-restore per family, read back and verified) with the way the
original controller worked (one ``iptables`` command per rule inside the namespace, here followed
by one ``iptables-save`` so both sides end with a read-back), entered per command with nsenter as
our own commands are, and entered once (xargs inside the namespace). Every sample uses a
namespace that nothing has touched yet, as a new pod's would be; after ours, the same namespace is
re-checked as the agent's resync does (read back, nothing written). Needs root.

    .venv/bin/python bench/apply.py [--count 200] [--backend auto|nft|legacy]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from ipnc_dev.iptables import iptables_command
from istio_pod_network_controller.node.apply import Applier
from istio_pod_network_controller.node.backend import Backend, Family, Tools, detect
from istio_pod_network_controller.node.netns import Netns
from istio_pod_network_controller.render import Ruleset, render
from istio_pod_network_controller.spec import spec_from_pod

SIDECAR_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "bench", "namespace": "bench"},
    "spec": {"containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}]},
}


def default_sidecar_ruleset() -> Ruleset:
    return render(spec_from_pod(SIDECAR_POD))


def per_rule_commands(ruleset: Ruleset, family: Family) -> list[list[str]]:
    """``iptables`` arguments for each chain and rule of one family, in restore order."""
    rules = ruleset.v4 if family is Family.IPV4 else ruleset.v6
    out: list[list[str]] = []
    for table, chains, table_rules in rules.by_table():
        out += [["-t", table, "-N", chain] for chain in chains]
        out += [["-t", table, *rule.argv()] for rule in table_rules]
    return out


def one_command_per_rule(tools: Tools, ns: Netns, ruleset: Ruleset) -> None:
    """The original controller's way: each rule its own iptables process in the namespace."""
    for family in Family:
        commands = per_rule_commands(ruleset, family)
        for args in commands:
            done = ns.run([iptables_command(tools, family), "-w", *args])
            if not done.ok:
                raise RuntimeError(done.reason())
        if commands:
            saved = ns.run(tools.save_argv(family))
            if not saved.ok:
                raise RuntimeError(saved.reason())


def in_namespace_per_rule(tools: Tools, ns: Netns, ruleset: Ruleset) -> None:
    """The same, with a single entry into the namespace: ``xargs`` there runs one iptables
    process per line, like a script run inside the pod by istio-init (cheaper than the above)."""
    for family in Family:
        lines = [" ".join(args) for args in per_rule_commands(ruleset, family)]
        if not lines:
            continue
        argv = ["xargs", "-L", "1", iptables_command(tools, family), "-w"]
        done = ns.run(argv, stdin="\n".join(lines) + "\n")
        if not done.ok:
            raise RuntimeError(done.reason())
        saved = ns.run(tools.save_argv(family))
        if not saved.ok:
            raise RuntimeError(saved.reason())


def timed_once(path: str, work: Callable[[Netns], object]) -> float:
    with Netns(path) as ns:
        started = time.perf_counter()
        work(ns)
        return (time.perf_counter() - started) * 1000


def summary(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), statistics.quantiles(samples, n=20)[18]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="fresh namespaces per way (default 200)")
    parser.add_argument("--backend", choices=("auto", "nft", "legacy"), default="auto")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/apply.py needs root (it creates network namespaces)", file=sys.stderr)
        return 1

    tools = detect(forced=None if args.backend == "auto" else Backend(args.backend))
    ruleset = default_sidecar_ruleset()
    applier = Applier(tools)
    prefix = "ipncbench" + secrets.token_hex(2)
    ways: dict[str, Callable[[Netns], object]] = {
        "ours": lambda ns: applier.apply(ns, ruleset),
        "old": lambda ns: one_command_per_rule(tools, ns, ruleset),
        "inside": lambda ns: in_namespace_per_rule(tools, ns, ruleset),
    }
    names = [f"{prefix}-{i}" for i in range(len(ways) * args.count + 1)]
    samples: dict[str, list[float]] = {way: [] for way in [*ways, "recheck"]}

    def recheck(ns: Netns) -> None:
        if applier.apply(ns, ruleset, fresh=False).changed:
            raise RuntimeError("an intact namespace was rewritten")
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)  # noqa: S603
        paths = iter(f"/run/netns/{name}" for name in names)
        # The applier loads each distinct ruleset into a scratch namespace once, to know its
        # canonical form; an agent pays that once per ruleset, not per pod. Warm it up here.
        warm = timed_once(next(paths), ways["ours"])
        # Interleaved, so that whatever else runs on the machine weighs on every way alike.
        for _ in range(args.count):
            for way, work in ways.items():
                path = next(paths)
                samples[way].append(timed_once(path, work))
                if way == "ours":  # the resync's read-back of the namespace just programmed
                    samples["recheck"].append(timed_once(path, recheck))
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)  # noqa: S603
    ours, old, inside = samples["ours"], samples["old"], samples["inside"]

    rows = [
        ("ours: create-only restore + read-back + verify", ours),
        ("old: 1 iptables command per rule, each via nsenter, + save", old),
        ("old, entered once: 1 iptables per rule via xargs, + save", inside),
    ]
    print(f"backend {tools.backend.value}; default sidecar ruleset: {ruleset.rule_count()} rules (IPv4)")
    print(f"{args.count} fresh namespaces per way, interleaved; {os.cpu_count()} CPUs")
    print(f"  first apply of this ruleset (loads it once into a scratch namespace): {warm:.1f} ms")
    median, p95 = summary(samples["recheck"])
    print(f"  {'ours, re-check of an intact namespace (resync, restart): read back, write nothing':60}"
          f" median {median:6.2f} ms  p95 {p95:6.2f} ms")
    ours_median, ours_p95 = summary(ours)
    for label, data in rows:
        median, p95 = summary(data)
        print(f"  {label:60} median {median:6.2f} ms  p95 {p95:6.2f} ms")
    for label, data in rows[1:]:
        median, p95 = summary(data)
        name = label.split(":")[0]
        print(f"  ratio {name:18} / ours: median {median / ours_median:5.1f}x  p95 {p95 / ours_p95:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
