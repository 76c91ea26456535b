"""What the demo records and reports: one record per pod and per request, what it created (so a
test can check it is all gone), the summary table and the JSON summary (``--json-summary``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .display import Display


@dataclass
class PodRecord:
    """One pod of the sample application, as the demo saw it (seconds from its creation)."""

    service: str
    name: str
    node: str
    uid: str = ""
    ip: str = ""
    admitted: bool = False
    mutated: bool = False  # waiter first, no istio-init, no capability added, args kept
    init_containers: list[str] = field(default_factory=list)
    programmed_s: float | None = None
    apply_ms: float | None = None
    rules: int | None = None
    backend: str = ""
    netns_inode: int | None = None
    waiter_s: float | None = None
    waiter_line: str = ""
    initialized_s: float | None = None
    running_s: float | None = None
    problem: str = ""
    requests_sent: int = 0
    requests_intercepted: int = 0
    reached_directly: int = 0
    created_at: float = 0.0  # monotonic; not reported

    @property
    def ok(self) -> bool:
        return self.mutated and self.programmed_s is not None and self.running_s is not None


@dataclass
class HopRecord:
    """One connection of a request: the app of ``source`` to ``service``'s ClusterIP."""

    request: int
    source: str
    source_node: str
    service: str
    address: str
    port: int
    target_pods: list[str]
    target_nodes: list[str]
    intercepted: bool = False
    answered_by: str = ""  # "<container>:<port>" of the listener that answered
    original_destination: list[Any] | None = None
    recorded_by_sidecar: bool = False  # the sender's sidecar stub logged this very connection
    ms: float = 0.0
    error: str = ""


@dataclass
class Resources:
    """What the demo created, so that a test can check it is all gone afterwards."""

    workdir: str = ""
    api_server: str = ""  # kubectl keeps no cache for it under ~/.kube
    netns_prefixes: list[str] = field(default_factory=list)
    cgroup_tops: list[str] = field(default_factory=list)
    netns_inodes: list[int] = field(default_factory=list)
    processes: list[list[int]] = field(default_factory=list)  # [pid, start time in clock ticks]

    def add_pid(self, pid: int | None) -> None:
        if pid is None:
            return
        start = process_start(pid)
        if start is not None and [pid, start] not in self.processes:
            self.processes.append([pid, start])


def process_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), which tells a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


@dataclass
class Summary:
    ok: bool = False
    failure: str = ""
    seconds: float = 0.0
    setup_seconds: float = 0.0
    teardown_seconds: float = 0.0
    kept: bool = False
    real_node: bool = False  # ran on real nodes (``demo --real-node``)
    # Which injector made the pods: "istiod <version>" (built by scripts/build-istio, Istio's
    # charts) or "saved" (Istio's saved injection output); "" before it is known.
    injection: str = ""
    host: str = ""  # real nodes: "as it was" after the harness's comparison, else the differences
    pods: list[PodRecord] = field(default_factory=list)
    hops: list[HopRecord] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for pod in data["pods"]:
            pod.pop("created_at", None)
        data["pods_total"] = len(self.pods)
        data["pods_running"] = sum(1 for p in self.pods if p.ok)
        data["requests_total"] = len(self.hops)
        data["requests_intercepted"] = sum(1 for h in self.hops if h.intercepted)
        return data


def _cell(value: float | None, unit: str = "s", digits: int = 2) -> str:
    return "…" if value is None else f"{value:.{digits}f} {unit}"


def pod_table(pods: Sequence[PodRecord], *, live: bool = False, wide: bool = True) -> Any:
    """Pods, one row each: mutated by the webhook, programmed by the agent (seconds after the pod
    was created, and the agent's own apply time), initialized, running, requests intercepted."""
    from rich import box
    from rich.table import Table

    table = Table(
        box=box.SIMPLE_HEAD if live else (box.ASCII2 if wide else box.SIMPLE),
        title=None if live else "Summary",
        padding=(0, 1),
    )
    # An 80-column terminal gets the essentials; the mutation is in each pod's first event line.
    headers = ["pod", "node", *(["pod IP", "mutated"] if wide else []), "rules", "apply"]
    headers += ["initialized", "running", "requests"]
    for header in headers:
        table.add_column(
            header, justify="left" if header in ("pod", "node", "pod IP") else "right", no_wrap=True
        )
    for p in pods:
        mutated = "…" if not p.admitted else ("✓" if p.mutated else "✗")
        applied = f"{p.apply_ms:.0f} ms" if p.apply_ms is not None else "…"
        sent = f"{p.requests_intercepted}/{p.requests_sent}" if p.requests_sent else "-"
        row = [p.name, p.node, *([p.ip or "…", mutated] if wide else []), _cell(p.programmed_s), applied]
        row += [_cell(p.initialized_s), _cell(p.running_s), sent]
        table.add_row(*row)
    return table


def print_summary(display: Display, summary: Summary) -> None:
    display.plain()
    wide = display.console.width >= 100
    display.console.print(pod_table(summary.pods, wide=wide))
    legend = "mutated: the webhook replaced istio-init by the waiter, no capability added; " if wide else ""
    display.plain(
        f"{legend}rules: when the agent's mark came (after the pod's creation); apply: the agent's own "
        "time to write and verify them; initialized: all init containers done (waiter, sidecar); "
        "running: ready; requests: caught by the sender's sidecar"
    )
    running = sum(1 for p in summary.pods if p.ok)
    intercepted = sum(1 for h in summary.hops if h.intercepted)
    direct = sum(p.reached_directly for p in summary.pods)
    verdict = "[green]OK[/green]" if summary.ok else "[red]FAILED[/red]"
    where = " on real nodes" if summary.real_node else ""
    # The stand-ins count connections that reached an application directly; a real node's
    # application does not listen, so there is nothing to count.
    around = "" if summary.real_node else f", {direct} reached an application around its sidecar"
    if summary.injection:
        injected = (
            "Istio's saved injection output (istiod is not built)"
            if summary.injection == "saved"
            else f"{summary.injection}'s injector, with Istio's charts, then our webhook"
        )
        display.plain(f"pods injected by {injected}")
    display.plain(
        f"{verdict}: {running}/{len(summary.pods)} pods initialized and running under restricted{where}, "
        f"{intercepted}/{len(summary.hops)} requests intercepted by the sender's sidecar with their original "
        f"destination{around}; set-up {summary.setup_seconds:.1f} s, total {summary.seconds:.1f} s"
    )


def write_json(path: Path | None, summary: Summary) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    tmp.replace(path)
