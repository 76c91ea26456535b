"""What the benchmarks share: distributions, the API server's own counters, CPU and memory of
the processes under test (children included), and the machine's load to print beside them.

Pure helpers (parsing, summaries, request classification) are separate from the ones that touch
the machine, so the first can be unit-tested without root or a cluster.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# -- distributions ----------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class Summary:
    count: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        return cls(
            len(samples),
            percentile(samples, 0.5),
            percentile(samples, 0.95),
            percentile(samples, 0.99),
            max(samples) if samples else math.nan,
        )

    def text(self, unit: str = "ms") -> str:
        return f"p50 {self.p50:.0f} / p95 {self.p95:.0f} / p99 {self.p99:.0f} / max {self.max:.0f} {unit}"


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- the API server's metrics -----------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

WANTED = (
    "apiserver_response_sizes_sum",
    "apiserver_request_total",
    "apiserver_watch_events_sizes_sum",
    "apiserver_watch_events_total",
    "apiserver_longrunning_requests",
    "apiserver_registered_watchers",
)


def parse_metrics(text: str, wanted: Sequence[str] = WANTED) -> Samples:
    """The samples of the ``wanted`` metric names from Prometheus text exposition."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith(tuple(wanted)):
            continue
        match = _SAMPLE.match(line)
        if match is None or match.group(1) not in wanted:
            continue
        labels = tuple(sorted(_LABEL.findall(match.group(3) or "")))
        try:
            out[(match.group(1), labels)] = float(match.group(4))
        except ValueError:
            continue
    return out


def delta(after: Samples, before: Samples) -> Samples:
    """Counter increases between two scrapes (a series new in ``after`` counts from zero)."""
    return {
        key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)
    }


@dataclass(frozen=True)
class Request:
    verb: str
    resource: str
    subresource: str
    scope: str

    def name(self) -> str:
        sub = f"/{self.subresource}" if self.subresource else ""
        return f"{self.verb} {self.resource}{sub}"


def requests(samples: Samples) -> dict[Request, float]:
    """apiserver_request_total by (verb, resource, subresource, scope), codes summed."""
    out: dict[Request, float] = {}
    for (name, labels), value in samples.items():
        if name != "apiserver_request_total":
            continue
        d = dict(labels)
        key = Request(d.get("verb", ""), d.get("resource", ""), d.get("subresource", ""), d.get("scope", ""))
        out[key] = out.get(key, 0.0) + value
    return out


def is_driver_request(req: Request) -> bool:
    """Requests the benchmark itself makes, playing the user and the kubelet: creating and
    deleting pods, reporting their status, and its own namespace-scoped watch of them. Everything
    else in the window is the controller's (its watches are cluster-scoped with a field selector)."""
    if req.resource == "pods" and req.subresource == "status":
        return True
    if req.resource == "pods" and req.verb in ("POST", "DELETE") and req.subresource == "":
        return True
    if req.resource == "pods" and req.verb in ("LIST", "WATCH", "GET") and req.scope == "namespace":
        return True
    return req.resource == "namespaces" and req.verb in ("POST", "DELETE")


CONTROLLER_RESOURCES = ("pods", "namespaces", "events")  # all an agent may touch


def controller_requests(samples: Samples) -> dict[str, float]:
    """The controller's requests in a window, by ``VERB resource[/subresource]``: requests on the
    resources a controller touches, minus the benchmark's own. The API server's own loops (leases,
    endpoints) and admission lookups fall outside."""
    out: dict[str, float] = {}
    for req, value in requests(samples).items():
        if req.resource not in CONTROLLER_RESOURCES or is_driver_request(req):
            continue
        out[req.name()] = out.get(req.name(), 0.0) + value
    return out


def watch_bytes(samples: Samples, resource: str = "pods") -> float:
    """Bytes of watch events the API server sent, for one resource, all watchers."""
    total = 0.0
    for (name, labels), value in samples.items():
        if name == "apiserver_watch_events_sizes_sum" and dict(labels).get("resource") == resource:
            total += value
    return total


def watch_events(samples: Samples, resource: str = "pods") -> float:
    total = 0.0
    for (name, labels), value in samples.items():
        if name == "apiserver_watch_events_total" and dict(labels).get("resource") == resource:
            total += value
    return total


def response_bytes(samples: Samples, verb: str, resource: str) -> float:
    """Bytes of responses the API server sent for one verb on one resource."""
    total = 0.0
    for (name, labels), value in samples.items():
        d = dict(labels)
        if name == "apiserver_response_sizes_sum" and d.get("verb") == verb and d.get("resource") == resource:
            total += value
    return total


def gauge(samples: Samples, name: str, **match: str) -> float:
    total = 0.0
    for (metric, labels), value in samples.items():
        d = dict(labels)
        if metric == name and all(d.get(k) == v for k, v in match.items()):
            total += value
    return total


class MetricsScraper:
    """GET /metrics of the API server with the admin's TLS context."""

    def __init__(self, server: str, context: ssl.SSLContext) -> None:
        self.url = server.rstrip("/") + "/metrics"
        self.context = context

    def scrape(self) -> Samples:
        with urllib.request.urlopen(self.url, context=self.context, timeout=30) as resp:
            return parse_metrics(resp.read().decode("utf-8", "replace"))


# -- processes: CPU and memory ----------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (its own, not its children's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> tuple[float, float]:
    """Current RSS and peak RSS (VmHWM) of a live process, in MB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", math.nan), values.get("VmHWM", math.nan)


def cpuacct_mount() -> Path | None:
    """Where the cgroup v1 cpuacct hierarchy is mounted (None on a pure v2 host)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] == "cgroup" and "cpuacct" in tail[2].split(","):
            return Path(fields[4])
    return None


@dataclass
class CpuCgroup:
    """A cpuacct cgroup of our own for one process under test: everything it starts inherits it,
    so ``usage_seconds`` counts the process and all its children (iptables, nsenter). Created
    here, removed at ``close`` once its processes are gone; nothing else is ever moved."""

    directory: Path = field(init=False)

    def __post_init__(self) -> None:
        mount = cpuacct_mount()
        if mount is None:
            raise RuntimeError("no cgroup v1 cpuacct hierarchy mounted")
        self.directory = mount / f"ipnc-bench-{secrets.token_hex(4)}"
        self.directory.mkdir()

    def join_self(self) -> None:
        """For ``preexec_fn``: the child enters the cgroup before it execs."""
        (self.directory / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def usage_seconds(self) -> float:
        return int((self.directory / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        deadline = time.monotonic() + 5
        while self.directory.exists() and time.monotonic() < deadline:
            try:
                self.directory.rmdir()
            except OSError:
                time.sleep(0.05)


def spawn_in(
    cgroup: CpuCgroup, argv: Sequence[str], env: Mapping[str, str] | None = None, stdout: int | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 -- argv built by the benchmark
        list(argv),
        preexec_fn=cgroup.join_self,
        env=dict(env) if env is not None else None,
        stdout=stdout,
        stdin=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- the machine ------------------------------------------------------------------------------


def load() -> str:
    """The load averages and the number of processes, to print beside every figure."""
    with contextlib.suppress(OSError):
        one, five, fifteen, runnable, _ = Path("/proc/loadavg").read_text().split()
        return f"load {one} {five} {fifteen}, {runnable.split('/')[1]} processes"
    return "load unknown"


def env_with_source(src: str | None) -> dict[str, str]:
    """The environment for a controller run from another source tree (``src``: a ``src`` folder
    holding ``istio_pod_network_controller``, e.g. an exported older commit)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
