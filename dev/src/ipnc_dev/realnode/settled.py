"""Is every meshed pod programmed exactly once, for the sandbox it runs in now?

What the scenarios of the real-node tier end with, whatever they did to the nodes (an agent
killed, containerd or the kubelet restarted, a sandbox recreated, a node drained, the chart
upgraded). ``gather`` reads what the cluster shows -- each pod's mark, its ready sandbox (from
the node's containerd) and the rules in that sandbox's network namespace (read back with the
host's iptables and nft), the waiter's log, the agents' logs and /metrics, the Events -- and
``judge`` (pure) names every way it falls short, one line each:

- the pod is Running, Ready and not being deleted, its mark ``initialized`` and written for the
  node it runs on;
- the mark's ``netnsInode`` is the inode of the pod's current sandbox, and the waiter that let
  it start logged that very inode;
- its namespace holds exactly ``rules`` rules of ours (the detail's count) in all iptables
  variants and native nftables together, all of them where the detail's mode and backend say:
  one copy, not two;
- one ``Initialized`` Event names that sandbox (none may be missing but when the agent process
  that marked it is gone: its Event is posted after the mark); no sandbox has two; no Warning
  of ours;
- each agent is one process on its node, and its ``ipnc_pods_initialized_total`` equals the
  ``pod initialized`` lines of its log, each with its Event.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from istio_pod_network_controller import names
from istio_pod_network_controller.node.tables import TAG
from istio_pod_network_controller.render.ruleset import OWN_CHAINS

from . import mesh
from .install import Release

if TYPE_CHECKING:
    from .cluster import RealCluster

COMPONENT = "istio-pod-network-controller"
INITIALIZED = re.compile(r"^redirect rules applied and verified: (\d+) rules in network namespace (\d+) ")
NFT_TABLE_PREFIX = "istio-proxy-"
# What reads the rules of one place (variant) in a pod's network namespace.
PLACES: Mapping[str, tuple[str, ...]] = {
    "iptables/nft": ("iptables-nft-save",),
    "ip6tables/nft": ("ip6tables-nft-save",),
    "iptables/legacy": ("iptables-legacy-save",),
    "ip6tables/legacy": ("ip6tables-legacy-save",),
    "nftables": ("nft", "list", "ruleset"),
}


def own_iptables_rules(save: str) -> int:
    """Rules of ours in one ``iptables-save`` text: every rule of a chain we own, and in chains we
    do not, every rule tagged with our comment or jumping into one of ours (tagged or not: a
    second jump is a second copy)."""
    table = ""
    count = 0
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            words = line.split()
            own = OWN_CHAINS.get(table, ())
            jumps = {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-j", "--jump", "-g", "--goto")}
            if words[1] in own or jumps & set(own) or TAG in words or f'"{TAG}"' in words:
                count += 1
    return count


def own_nft_rules(ruleset: str) -> int:
    """Rules in our native nftables tables (``istio-proxy-*``) of one ``nft list ruleset`` text."""
    count = 0
    ours = False
    in_chain = False
    for raw in ruleset.splitlines():
        line = raw.strip()
        if line.startswith("table "):
            ours = line.split()[2].startswith(NFT_TABLE_PREFIX) if len(line.split()) > 2 else False
            in_chain = False
        elif line.startswith("chain "):
            in_chain = True
        elif line == "}":
            in_chain = False
        elif ours and in_chain and line and not line.startswith(("type ", "policy ", "comment ")):
            count += 1
    return count


def place_of(detail: Mapping[str, Any]) -> set[str]:
    """Where the detail says the rules are: both families of its iptables backend, or nftables."""
    if detail.get("mode") == "nftables" or detail.get("backend") == "nftables":
        return {"nftables"}
    backend = detail.get("backend")
    return {f"iptables/{backend}", f"ip6tables/{backend}"}


def agent_marks(log: str) -> list[tuple[str, int]]:
    """(pod UID, netns inode) of every ``pod initialized`` line of an agent's JSON log."""
    out: list[tuple[str, int]] = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("msg") == "pod initialized":
            uid, inode = record.get("uid"), record.get("netnsInode")
            if isinstance(uid, str) and isinstance(inode, int):
                out.append((uid, inode))
    return out


@dataclass(frozen=True)
class PodFacts:
    pod: mesh.PodView
    sandbox_inode: int | None  # None: no single ready sandbox (``sandbox_problem`` says why)
    sandbox_problem: str
    rules: Mapping[str, int]  # place -> rules of ours found there
    waiter_log: str


@dataclass(frozen=True)
class AgentFacts:
    name: str
    node: str
    started_at: str | None
    log: str
    metrics: str


@dataclass(frozen=True)
class Facts:
    pods: Sequence[PodFacts]
    agents: Sequence[AgentFacts]
    events: Sequence[Mapping[str, Any]]
    agent_processes: Mapping[str, int]  # node -> how many agent processes run there
    nodes: Sequence[str] = field(default_factory=tuple)
    # Pods that did not opt in -> rules of ours found in their network namespace, per place.
    unmeshed: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


def _stamp(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def initialized_events(events: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], int]:
    """(pod UID, netns inode) -> how many times the Initialized Event was posted for it."""
    out: Counter[tuple[str, int]] = Counter()
    for event in events:
        involved = event.get("involvedObject") or {}
        if event.get("reason") != "Initialized" or not isinstance(involved, Mapping):
            continue
        match = INITIALIZED.match(str(event.get("message", "")))
        if match:
            out[(str(involved.get("uid")), int(match[2]))] += int(event.get("count") or 1)
    return dict(out)


def _event_time(event: Mapping[str, Any]) -> datetime | None:
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        stamp = _stamp(event.get(key) if isinstance(event.get(key), str) else None)
        if stamp is not None:
            return stamp
    return None


def judge(
    facts: Facts, *, expected_pods: int | None = None, warnings_since: datetime | None = None
) -> list[str]:
    """Every way the cluster falls short of "each meshed pod programmed exactly once for its
    current sandbox, nothing of ours left over" (empty: it does not). Warnings count from
    ``warnings_since`` on (a scenario is judged by what happened during it)."""
    problems: list[str] = []
    if expected_pods is not None and len(facts.pods) != expected_pods:
        problems.append(f"{len(facts.pods)} meshed pods, not {expected_pods}")
    events = initialized_events(facts.events)
    agents_by_node = {a.node: a for a in facts.agents}
    for f in facts.pods:
        p = f.pod
        name = p.name
        if p.deleting or p.phase != "Running" or not p.ready:
            problems.append(f"{name}: {p.phase}, ready={p.ready}, deleting={p.deleting}")
            continue
        if p.annotations.get(names.STATUS) != names.STATUS_INITIALIZED:
            problems.append(f"{name}: status {p.annotations.get(names.STATUS)!r}, detail {p.detail}")
            continue
        detail = p.detail
        if detail.get("node") != p.node:
            problems.append(f"{name}: marked by {detail.get('node')!r}, runs on {p.node}")
        if f.sandbox_inode is None:
            problems.append(f"{name}: {f.sandbox_problem}")
            continue
        inode = detail.get("netnsInode")
        if inode != f.sandbox_inode:
            problems.append(
                f"{name}: the mark names network namespace {inode}, its sandbox's is {f.sandbox_inode}"
            )
            continue
        if f"pod initialized for network namespace {inode}" not in f.waiter_log:
            problems.append(
                f"{name}: its waiter did not pass for network namespace {inode}:\n{f.waiter_log[-600:]}"
            )
        wanted = detail.get("rules")
        total = sum(f.rules.values())
        at_place = sum(n for place, n in f.rules.items() if place in place_of(detail))
        if not isinstance(wanted, int) or wanted <= 0 or total != wanted or at_place != wanted:
            found = ", ".join(f"{k} {v}" for k, v in f.rules.items() if v) or "none"
            problems.append(
                f"{name}: {wanted} rules of ours wanted in {sorted(place_of(detail))}, found {found}"
            )
        posted = events.get((p.uid, inode), 0)
        agent = agents_by_node.get(p.node)
        applied, started = _stamp(detail.get("appliedAt")), _stamp(agent.started_at if agent else None)
        # Marked by an agent process that is gone (killed before its Event went out): the one
        # Event may be missing, never doubled.
        by_earlier = applied is not None and started is not None and applied < started
        if posted > 1 or (posted == 0 and not by_earlier):
            problems.append(f"{name}: {posted} Initialized Events for network namespace {inode}, not one")
    current = {f.pod.uid for f in facts.pods}
    for (uid, inode), count in events.items():
        if count > 1 and uid in current:
            problems.append(f"pod {uid}: {count} Initialized Events for network namespace {inode}")
    for event in facts.events:
        source = event.get("source") or {}
        if (
            event.get("type") != "Warning"
            or not isinstance(source, Mapping)
            or source.get("component") != COMPONENT
        ):
            continue
        when = _event_time(event)
        if warnings_since is None or when is None or when >= warnings_since:
            involved = event.get("involvedObject") or {}
            who = involved.get("name") if isinstance(involved, Mapping) else "?"
            problems.append(f"Warning {event.get('reason')} on {who}: {event.get('message')}")
    for node in facts.nodes:
        running = facts.agent_processes.get(node, 0)
        if running != 1:
            problems.append(f"{node}: {running} agent processes, not one")
        if node not in agents_by_node:
            problems.append(f"{node}: no running agent pod")
    for pod, places in facts.unmeshed.items():
        if any(places.values()):
            found = ", ".join(f"{k} {v}" for k, v in places.items() if v)
            problems.append(f"{pod} did not opt in, yet its network namespace holds rules of ours: {found}")
    for agent in facts.agents:
        marks = agent_marks(agent.log)
        counted = mesh.metric_value(agent.metrics, "ipnc_pods_initialized_total")
        if counted != len(marks):
            problems.append(
                f"{agent.name}: ipnc_pods_initialized_total {counted:g}, "
                f"but {len(marks)} 'pod initialized' log lines"
            )
        missing = [m for m in marks if m not in events]
        if missing:
            problems.append(f"{agent.name}: no Initialized Event for {missing}")
    return problems


def _rules(cluster: RealCluster, pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for place, argv in PLACES.items():
        text = cluster.in_netns(pid, *argv)
        out[place] = own_nft_rules(text) if place == "nftables" else own_iptables_rules(text)
    return out


def rules_of(cluster: RealCluster, pod: mesh.PodView) -> dict[str, int]:
    """Rules of ours in the network namespace of ``pod``'s current sandbox, per place."""
    sandbox = cluster.sandbox(cluster.node(pod.node), pod.uid)
    return _rules(cluster, sandbox.pid)


def gather(
    cluster: RealCluster, release: Release, namespace: str, *, unmeshed: Sequence[mesh.PodView] = ()
) -> Facts:
    """Read everything ``judge`` needs from the cluster and its nodes; ``unmeshed``: pods whose
    network namespaces must hold nothing of ours."""
    from .cluster import RealClusterError

    found: list[PodFacts] = []
    with cluster.client() as client:
        for p in mesh.pods(cluster, namespace):
            inode: int | None = None
            problem, rules, waiter = "", {}, ""
            try:
                sandbox = cluster.sandbox(cluster.node(p.node), p.uid)
                inode = sandbox.netns_inode
                rules = _rules(cluster, sandbox.pid)
            except (RealClusterError, KeyError, OSError) as e:
                problem = f"sandbox: {e}"
                inode = None
            if inode is not None:
                try:
                    waiter = "".join(
                        client.log(p.name, namespace=namespace, container=names.WAITER_CONTAINER)
                    )
                except Exception as e:  # a log the kubelet cannot give is a finding, not a crash
                    waiter = f"(no log: {e})"
            found.append(PodFacts(p, inode, problem, rules, waiter))
        agents: list[AgentFacts] = []
        labels = {"app.kubernetes.io/component": "agent"}
        for a in mesh.pods(cluster, release.namespace, labels=labels):
            if a.deleting or a.phase != "Running" or not a.ready:
                continue
            container = next(iter(a.containers.values()))
            log = "".join(client.log(a.name, namespace=release.namespace, container=container.name))
            path = f"/api/v1/namespaces/{release.namespace}/pods/{a.name}:15300/proxy/metrics"
            metrics = cluster.kubectl("get", "--raw", path).stdout
            agents.append(AgentFacts(a.name, a.node, container.started_at, log, metrics))
    processes = {
        node.name: sum(1 for cmd in cluster.node_processes(node).values() if f"{COMPONENT} run" in cmd)
        for node in cluster.nodes
    }
    return Facts(
        pods=found,
        agents=agents,
        events=mesh.events(cluster, namespace),
        agent_processes=processes,
        nodes=tuple(n.name for n in cluster.nodes),
        unmeshed={f"{p.name} ({p.node})": rules_of(cluster, p) for p in unmeshed},
    )


def wait_settled(
    cluster: RealCluster,
    release: Release,
    namespace: str,
    *,
    expected_pods: int | None = None,
    warnings_since: datetime | None = None,
    unmeshed: Sequence[mesh.PodView] = (),
    timeout: float = 90.0,
) -> Facts:
    """Until ``judge`` finds nothing (Events and restarts take a moment); raises ``NotSettled``
    naming what was still wrong after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        facts = gather(cluster, release, namespace, unmeshed=unmeshed)
        problems = judge(facts, expected_pods=expected_pods, warnings_since=warnings_since)
        if not problems:
            return facts
        if time.monotonic() > deadline:
            raise NotSettled(problems, timeout)
        time.sleep(1.0)


class NotSettled(AssertionError):
    """The scenario did not end with every meshed pod programmed once for its current sandbox."""

    def __init__(self, problems: Sequence[str], timeout: float) -> None:
        self.problems = list(problems)
        shown = "\n  ".join(self.problems)
        super().__init__(
            f"after {timeout:g} s, not every meshed pod is programmed exactly once for its current "
            f"sandbox:\n  {shown}"
        )
