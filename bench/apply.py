"""Benchmark: apply + verify the default sidecar's rules into fresh network namespaces, per pod.

Side by side, interleaved, each sample in a namespace nothing has touched yet (as a new pod's):
- ours, the agent's in-process path, in both of Istio's modes: native nftables (one nft
  transaction through libnftables in process, and through the nft binary) and iptables (one
  iptables-restore per family, read back and verified);
- Istio's real istio-iptables (built by scripts/build-istio), in both modes, run as istio-init
  or the CNI plugin runs it: a whole process per pod, started inside the namespace;
- the way the original controller worked: one ``iptables`` command per rule inside the namespace
  (each via nsenter, and all through one ``xargs`` inside it), followed by one ``iptables-save``.
After each of ours the same namespace is re-checked as the agent's resync does (read back,
nothing written). Every namespace has lo up and 10.99.0.2/32 on it (istio-iptables needs a pod
address). Needs root.

    .venv/bin/python bench/apply.py [--count 200] [--backend auto|nft|legacy] [--ways a,b,...]
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
from dataclasses import dataclass
from pathlib import Path

from ipnc_dev.iptables import iptables_command
from istio_pod_network_controller.node.apply import Applier
from istio_pod_network_controller.node.backend import Backend, Family, Tools, detect
from istio_pod_network_controller.node.errors import NodeError
from istio_pod_network_controller.node.netns import Netns
from istio_pod_network_controller.node.nft import LibRunner, NftApplier, Owned, ProcessRunner
from istio_pod_network_controller.render import Ruleset, render
from istio_pod_network_controller.spec import RedirectSpec, spec_from_pod
from istio_pod_network_controller.spec.canonical import to_args

SIDECAR_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "bench", "namespace": "bench"},
    "spec": {"containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}]},
}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "istio-pod-network-controller"
ISTIO = CACHE / "istio" / "current" / "istio-iptables"
# Our flags that istio-iptables reads from elsewhere (environment, resolv.conf), at the values
# that mean its defaults; the default sidecar has nothing else.
ISTIO_DEFAULTS = {
    "--dns-servers-v4=",
    "--dns-servers-v6=",
    "--host-ipv4-loopback-cidr=127.0.0.1/32",
    "--owner-groups-include=*",
    "--owner-groups-exclude=",
}
POD_ADDRESS = "10.99.0.2/32"


def default_sidecar_spec() -> RedirectSpec:
    return spec_from_pod(SIDECAR_POD)


def default_sidecar_ruleset() -> Ruleset:
    return render(default_sidecar_spec())


def istio_argv(binary: Path, spec: RedirectSpec, *, nft: bool) -> list[str]:
    """istio-iptables' command line for ``spec`` (the same configuration as ours)."""
    args = [a for a in to_args(spec) if a not in ISTIO_DEFAULTS]
    for arg in args:
        if arg.startswith(("--dns-servers", "--host-ipv4", "--owner-groups")):
            raise ValueError(f"istio-iptables takes {arg} from its environment: not benchmarked")
    return [str(binary), *(["--native-nftables"] if nft else []), *args]


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


def whole_process(ns: Netns, argv: list[str]) -> None:
    """One process started inside the namespace, to its exit (istio-init, the CNI plugin)."""
    done = ns.run(argv)
    if not done.ok:
        raise RuntimeError(done.reason())


@dataclass(frozen=True)
class Way:
    label: str
    work: Callable[[Netns], object]
    recheck: Callable[[Netns], bool] | None = None  # True when it wrote something


def timed_once(path: str, work: Callable[[Netns], object]) -> float:
    with Netns(path) as ns:
        started = time.perf_counter()
        work(ns)
        return (time.perf_counter() - started) * 1000


def summary(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), statistics.quantiles(samples, n=20)[18]


def new_namespace(name: str) -> str:
    subprocess.run(["ip", "netns", "add", name], check=True)  # noqa: S603
    script = f"link set lo up\naddr add {POD_ADDRESS} dev lo\n"
    subprocess.run(["ip", "-n", name, "-batch", "-"], input=script, text=True, check=True)  # noqa: S603
    return f"/run/netns/{name}"


def nft_way(applier: NftApplier, spec: RedirectSpec, label: str) -> Way:
    plan = applier.render(spec)
    return Way(
        label, lambda ns: applier.apply(ns, plan), lambda ns: applier.apply(ns, plan, fresh=False).changed
    )


def ways_for(args: argparse.Namespace, tools: Tools, spec: RedirectSpec) -> dict[str, Way]:
    ruleset = render(spec)
    iptables = Applier(tools)
    ways: dict[str, Way] = {}
    runners: list[tuple[str, LibRunner | ProcessRunner]] = []
    try:
        runners.append(("libnftables", LibRunner()))
    except NodeError as exc:
        print(f"(no libnftables here: {exc.reason})")
    runners.append(("nft binary", ProcessRunner()))
    for name, runner in runners:
        key = "nft-lib" if name == "libnftables" else "nft-bin"
        ways[key] = nft_way(
            NftApplier(runner), spec, f"ours, nftables mode ({name}): 1 transaction + read-back"
        )
    ways["iptables"] = Way(
        f"ours, iptables mode ({tools.backend.value}): restore + read-back",
        lambda ns: iptables.apply(ns, ruleset),
        lambda ns: iptables.apply(ns, ruleset, fresh=False).changed,
    )
    if args.istio.is_file():
        nft_argv, ipt_argv = istio_argv(args.istio, spec, nft=True), istio_argv(args.istio, spec, nft=False)
        ways["istio-nft"] = Way(
            "istio-iptables --native-nftables, a process per pod", lambda ns: whole_process(ns, nft_argv)
        )
        ways["istio-iptables"] = Way(
            "istio-iptables (iptables mode), a process per pod", lambda ns: whole_process(ns, ipt_argv)
        )
    else:
        print(f"(Istio's istio-iptables is not built at {args.istio}: run scripts/build-istio)")
    ways["old"] = Way(
        "old: 1 iptables command per rule via nsenter, + save",
        lambda ns: one_command_per_rule(tools, ns, ruleset),
    )
    ways["inside"] = Way(
        "old, entered once: 1 iptables per rule via xargs, + save",
        lambda ns: in_namespace_per_rule(tools, ns, ruleset),
    )
    wanted = [w for w in args.ways.split(",") if w] if args.ways else list(ways)
    unknown = [w for w in wanted if w not in ways]
    if unknown:
        raise SystemExit(f"unknown or unavailable ways {unknown}; available: {', '.join(ways)}")
    return {w: ways[w] for w in wanted}


def same_tables(paths: list[str]) -> bool:
    """Whether the namespaces hold the same tables of ours (Istio's nft mode against ours)."""
    seen = []
    for path in paths:
        with Netns(path) as ns:
            listed = ns.run(["nft", "-j", "list", "ruleset"])
            seen.append(Owned.from_listing(listed.stdout))
    return all(s.same_rules(seen[0]) for s in seen[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="fresh namespaces per way (default 200)")
    parser.add_argument(
        "--backend", choices=("auto", "nft", "legacy"), default="auto", help="iptables mode's"
    )
    parser.add_argument("--ways", default="", help="comma list of ways (default: all available)")
    parser.add_argument("--istio", type=Path, default=ISTIO, help=f"istio-iptables binary (default {ISTIO})")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/apply.py needs root (it creates network namespaces)", file=sys.stderr)
        return 1

    tools = detect(forced=None if args.backend == "auto" else Backend(args.backend))
    spec = default_sidecar_spec()
    ways = ways_for(args, tools, spec)
    prefix = "ipncbench" + secrets.token_hex(2)
    made: list[str] = []

    def fresh() -> str:
        name = f"{prefix}-{len(made)}"
        made.append(name)
        return new_namespace(name)

    samples: dict[str, list[float]] = {way: [] for way in ways}
    rechecks: dict[str, list[float]] = {way: [] for way, w in ways.items() if w.recheck is not None}
    warm: dict[str, float] = {}
    witnesses: dict[str, str] = {}
    try:
        # Each of our appliers loads a ruleset into a scratch namespace once, to know its
        # canonical form; an agent pays that once per ruleset, not per pod. Warm them up here.
        for way, w in ways.items():
            witnesses[way] = fresh()
            warm[way] = timed_once(witnesses[way], w.work)
        # Interleaved, so that whatever else runs on the machine weighs on every way alike.
        for _ in range(args.count):
            for way, w in ways.items():
                path = fresh()
                samples[way].append(timed_once(path, w.work))
                check = w.recheck
                if check is not None:  # the resync's read-back of the namespace just programmed

                    def recheck(ns: Netns, check: Callable[[Netns], bool] = check) -> None:
                        if check(ns):
                            raise RuntimeError("an intact namespace was rewritten")

                    rechecks[way].append(timed_once(path, recheck))
        nft_witnesses = [witnesses[w] for w in ("nft-lib", "nft-bin", "istio-nft") if w in witnesses]
        same = same_tables(nft_witnesses) if len(nft_witnesses) > 1 else None
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)  # noqa: S603

    load = os.getloadavg()
    print(
        f"default sidecar: {render(spec).rule_count()} iptables rules (IPv4); "
        f"iptables backend {tools.backend.value}"
    )
    print(f"{args.count} fresh namespaces per way, interleaved; {os.cpu_count()} CPUs; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")  # fmt: skip
    if same is not None:
        print(
            "  nftables tables of ours from Istio's nft mode, libnftables and the nft binary: "
            + ("the same" if same else "DIFFERENT")
        )
    for way, w in ways.items():
        if way in warm and w.recheck is not None:
            print(
                f"  first apply, {w.label.split(':')[0]} (loads the ruleset once into a scratch "
                f"namespace): {warm[way]:.1f} ms"
            )
    medians: dict[str, float] = {}
    for way, w in ways.items():
        median, p95 = summary(samples[way])
        medians[way] = median
        print(f"  {w.label:66} median {median:7.2f} ms  p95 {p95:7.2f} ms")
    for way, data in rechecks.items():
        median, p95 = summary(data)
        label = f"re-check of an intact namespace, {way} (read back, write nothing)"
        print(f"  {label:66} median {median:7.2f} ms  p95 {p95:7.2f} ms")
    ratios = [("istio-nft", "nft-lib"), ("istio-nft", "nft-bin"), ("istio-iptables", "iptables"),
              ("istio-iptables", "nft-lib"), ("old", "iptables"), ("inside", "iptables")]  # fmt: skip
    for slow, fast in ratios:
        if slow in medians and fast in medians:
            print(f"  median ratio {slow} / {fast}: {medians[slow] / medians[fast]:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
