"""Apply a Ruleset inside a pod's network namespace, verify it, and roll back on any failure.

Per family, one ``iptables-save`` to learn what we own there now, one ``iptables-restore
--noflush`` carrying the whole replacement (remove our old rules, write the new ones), and one
``iptables-save`` to read the result back. Verification compares our part of the read-back with
the same ruleset loaded into an empty scratch namespace, so both sides are in the kernel's own
canonical form. iptables-restore commits table by table, so a failed restore can leave some tables
changed: we then restore our previous rules from the first read. One namespace is never
programmed by two threads at once; different namespaces proceed in parallel.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..render import render
from ..render.nftables import TableName
from ..render.ruleset import TPROXY, Ruleset
from . import routes, tables
from .backend import Family, Tools
from .errors import ApplyError, NodeError
from .netns import Completed, Netns, NetnsId, tool

if TYPE_CHECKING:
    from ..spec import RedirectSpec

# Called with "start", then each step's name before it runs ("read", "policy route", "passthrough
# address", "restore", "verify"), and "done" at the end, all while the namespace's lock is held.
StepHook = Callable[[str, Netns], None]


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one apply did, for the agent's status and the ``apply`` command's summary line."""

    netns: str
    inode: int
    backend: str
    rules: int
    changed: bool
    milliseconds: float
    # What was there instead of the intended rules when something had to be written over a
    # namespace that already held rules of ours ("" otherwise): the drift a repair undid.
    replaced: str = ""
    # Which of Istio's modes the rules follow: "iptables" or "nftables" (native).
    mode: str = "iptables"

    def summary(self) -> dict[str, object]:
        return {
            "netns": self.netns,
            "inode": self.inode,
            "mode": self.mode,
            "backend": self.backend,
            "rules": self.rules,
            "changed": self.changed,
            "ms": round(self.milliseconds, 2),
        }


class NamespaceLocks:
    """One lock per namespace identity, created on demand and dropped when nobody holds it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[NetnsId, tuple[threading.Lock, int]] = {}

    def waiting(self, key: NetnsId) -> int:
        """How many callers hold or wait for ``key``'s lock now."""
        with self._guard:
            return self._locks.get(key, (None, 0))[1]

    @contextlib.contextmanager
    def hold(self, key: NetnsId) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class ExpectedCache:
    """Our part of a ruleset as the kernel shows it after loading it into an empty namespace,
    cached per (backend, family, desired rules): the reference that verification compares
    against."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, Family, tables.Desired], tables.Owned] = OrderedDict()
        self._guard = threading.Lock()

    @staticmethod
    def _key(tools: Tools, family: Family, desired: tables.Desired) -> tuple[str, Family, tables.Desired]:
        return (tools.backend.value, family, desired)

    def get(self, tools: Tools, family: Family, desired: tables.Desired) -> tables.Owned | None:
        key = self._key(tools, family, desired)
        with self._guard:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def compute(self, tools: Tools, family: Family, desired: tables.Desired) -> tables.Owned:
        found = self.get(tools, family, desired)
        if found is not None:
            return found
        if desired.is_empty():
            result = tables.Owned()
        else:
            with scratch_netns() as scratch:
                text = tables.replace_transaction(tables.Owned(), desired)
                loaded = scratch.run(tools.restore_argv(family), stdin=text)
                if not loaded.ok:
                    raise ApplyError("prepare", f"{family.value} ruleset does not load: {loaded.reason()}")
                saved = scratch.run(tools.save_argv(family))
                if not saved.ok:
                    raise ApplyError("prepare", saved.reason())
                result = tables.owned(tables.parse_save(saved.stdout))
        with self._guard:
            self._items[self._key(tools, family, desired)] = result
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return result


def remove_nftables_mode(ns: Netns, *, keep_routes: bool) -> list[str]:
    """Delete our native nftables mode's tables from ``ns`` (when nft is installed) and, unless
    ``keep_routes``, the TPROXY policy route they used. Notes on what was done."""
    try:
        nft = tool("nft")
    except NodeError:
        return []
    listed = ns.run([nft, "-j", "list", "tables"])
    try:
        objects = json.loads(listed.stdout)["nftables"] if listed.ok else []
        present = {o["table"]["name"] for o in objects if "table" in o and o["table"].get("family") == "inet"}
    except (ValueError, KeyError, TypeError):
        return []
    ours = [t.value for t in TableName if t.value in present]
    if not ours:
        return []
    done = ns.run([nft, "-f", "-"], stdin="".join(f"delete table inet {name}\n" for name in ours))
    what = f"tables of nftables mode ({', '.join(ours)})"
    notes = [f"{what} removed" if done.ok else f"{what} not removed: {done.reason()}"]
    if done.ok and not keep_routes and TableName.MANGLE.value in ours:
        for family in Family:
            try:
                routes.write(ns, family, routes.read_state(ns, family), routes.RouteState())
            except NodeError:
                continue  # IPv6 off here, or nothing of ours
    return notes


@contextlib.contextmanager
def scratch_netns() -> Iterator[Netns]:
    """A new, empty network namespace that lives only as long as this handle: ``unshare`` a
    process into it, pin it by descriptor, let the process go."""
    proc = subprocess.Popen(  # noqa: S603 -- fixed argv
        [tool("unshare"), "--net", "--", tool("cat")],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        own = os.stat("/proc/self/ns/net").st_ino
        path = f"/proc/{proc.pid}/ns/net"
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.stat(path).st_ino != own:
                    break
            except FileNotFoundError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ApplyError("prepare", "could not create a scratch network namespace (unshare --net)")
            time.sleep(0.0005)
        handle = Netns(path)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    with handle:
        yield handle


@dataclass(slots=True)
class _FamilyState:
    """Working state of one family during one apply."""

    family: Family
    desired: tables.Desired
    now: tables.Owned | None = None  # ours as read before writing: what the transaction replaces
    before: tables.Owned | None = None  # ours before this apply began: what a rollback restores
    written: bool = False
    # What an attempted create-only transaction committed (tables), to subtract from the next read.
    created: tables.Owned | None = None
    created_tables: set[str] | None = None


class Applier:
    """Applies Rulesets with one backend. Thread-safe; share one per agent so that the
    per-namespace lock and the verification cache are shared too."""

    mode = "iptables"

    def __init__(self, tools: Tools, *, on_step: StepHook | None = None) -> None:
        self.tools = tools
        self.locks = NamespaceLocks()
        self.expected = ExpectedCache()
        self._on_step = on_step

    @property
    def backend(self) -> str:
        return self.tools.backend.value

    def render(self, spec: RedirectSpec) -> Ruleset:
        return render(spec)

    def apply(self, ns: Netns, ruleset: Ruleset, *, fresh: bool = True) -> ApplyResult:
        """Make our rules in ``ns`` exactly ``ruleset``, verified; raise ApplyError otherwise,
        after putting back what we owned before. Nothing is written when they already are.

        ``fresh`` is the caller's belief that the namespace holds nothing of ours. True (a new
        sandbox, or one the caller knows nothing of) tries the create-only fast path first, which
        fails before committing anything when rules of ours are there, and the read-first path
        takes over; False reads first (a re-check of a namespace programmed before)."""
        started = time.perf_counter()
        replaced: list[str] = []
        with self.locks.hold(ns.id):
            try:
                self._step("start", ns)
                changed = self._apply_locked(ns, ruleset, fresh, replaced)
            finally:
                self._step("done", ns)
        return ApplyResult(
            netns=ns.path,
            inode=ns.inode,
            backend=self.tools.backend.value,
            rules=ruleset.rule_count(),
            changed=changed,
            milliseconds=(time.perf_counter() - started) * 1000,
            replaced="; ".join(replaced),
        )

    def _step(self, name: str, ns: Netns) -> None:
        if self._on_step is not None:
            self._on_step(name, ns)

    def _apply_locked(self, ns: Netns, ruleset: Ruleset, fresh: bool, replaced: list[str]) -> bool:
        try:
            fams = [
                _FamilyState(Family.IPV4, tables.desired(ruleset.v4)),
                _FamilyState(Family.IPV6, tables.desired(ruleset.v6)),
            ]
        except tables.RulesetFormatError as exc:
            raise ApplyError("prepare", str(exc)) from None
        v6_used = not fams[1].desired.is_empty()
        if fresh and self._can_create(fams, ruleset):
            created = self._apply_fresh(ns, ruleset, fams)
            if created:
                return True

        self._step("read", ns)
        for fam, done in zip(fams, self._saves(ns, fams), strict=True):
            if not done.ok:
                if fam.family is Family.IPV6 and not v6_used:
                    fam.now = fam.before = tables.Owned()  # no IPv6 here: nothing of ours either
                    continue
                raise ApplyError("read", ns.gone_or(done.reason()))
            fam.now = fam.before = tables.owned(tables.parse_save(done.stdout))
            if fam.created is not None:
                # A create-only attempt committed part of this family: that part was not there before.
                fam.before = tables.without(fam.now, fam.created, fam.created_tables)
                fam.written = True

        pending = [f for f in fams if not self._already(f)]
        for fam in pending:
            want = self.expected.get(self.tools, fam.family, fam.desired)  # computed by _already
            if want is not None and fam.before is not None and not fam.before.is_empty():
                replaced.append(f"{fam.family.value}: {tables.describe_difference(want, fam.before)}")
        route_families = self._route_families(fams, ruleset, v6_used)
        route_before: dict[Family, routes.RouteState] = {}
        routes_written = False
        added_passthrough = False
        if not pending and not route_families and not ruleset.ipv6_passthrough_address:
            ns.check_still_there()
            return False
        try:
            if ruleset.tproxy is not None:
                self._step("policy route", ns)
                for family in route_families:
                    route_before[family] = routes.read_state(ns, family)
                    target = routes.wanted(ruleset.tproxy)
                    if routes.write(ns, family, route_before[family], target):
                        routes_written = True
                        replaced.append(f"{family.name} policy route: {route_before[family]}, not {target}")
            if ruleset.ipv6_passthrough_address:
                self._step("passthrough address", ns)
                added_passthrough = routes.add_passthrough_v6(ns)
            if pending:
                self._step("restore", ns)
                self._restore(ns, pending)
            if ruleset.tproxy is None and route_families:
                self._step("policy route", ns)
                for family in route_families:
                    route_before[family] = routes.read_state(ns, family)
                    routes_written |= routes.write(ns, family, route_before[family], routes.RouteState())
            self._step("verify", ns)
            self._verify(ns, pending, ruleset, route_families)
        except NodeError as exc:
            rollback = self._rollback(ns, fams, route_before, added_passthrough)
            reason = ns.gone_or(exc.reason)
            raise ApplyError(exc.step, reason + rollback) from None
        if pending and not fresh and all(f.before is not None and f.before.is_empty() for f in fams):
            # Nothing of ours in iptables mode, yet a re-check: perhaps programmed in native
            # nftables mode before the agent's mode changed. Ours are in place and verified;
            # the other mode's tables go now, so that the two never both stay.
            replaced += remove_nftables_mode(ns, keep_routes=ruleset.tproxy is not None)
        return bool(pending) or routes_written or added_passthrough

    def _can_create(self, fams: list[_FamilyState], ruleset: Ruleset) -> bool:
        """The create-only fast path needs nat chains in every family it writes, and no TPROXY
        (whose policy route must be in place before the rules)."""
        written = [f for f in fams if not f.desired.is_empty()]
        return (
            ruleset.tproxy is None
            and bool(written)
            and all(tables.creates_nat_first(f.desired) for f in written)
        )

    def _apply_fresh(self, ns: Netns, ruleset: Ruleset, fams: list[_FamilyState]) -> bool:
        """A namespace believed new, most often a new pod's: write without reading first, with
        ``-N`` so that anything of ours already there makes the restore fail before any commit.
        Returns False (having left the namespace as it found it, as far as it can tell) when the
        read-first path must take over."""
        expected = {f.family: self.expected.compute(self.tools, f.family, f.desired) for f in fams}
        self._step("restore", ns)
        # A family we do not write is not read either: every ruleset we apply creates IPv4 nat
        # chains, so if the IPv4 create succeeds we never programmed this namespace, and there is
        # no old IPv6 rule of ours to remove.
        texts = {f.family: tables.create_transaction(f.desired) for f in fams}
        fams = [f for f in fams if texts[f.family]]
        commands: list[tuple[Sequence[str], str | None]] = [
            (self.tools.restore_argv(f.family), texts[f.family]) for f in fams
        ]
        if ruleset.ipv6_passthrough_address:
            commands.append(([tool("ip"), "-6", "addr", "add", routes.PASSTHROUGH_V6, "dev", "lo"], None))
        started = ns.start_all(commands)
        running = started[: len(fams)]
        passthrough = started[len(fams)] if ruleset.ipv6_passthrough_address else None
        results = [r.wait() for r in running]
        fallback = False
        for fam, done in zip(fams, results, strict=True):
            if done.ok:
                fam.created, fam.created_tables = expected[fam.family], None
            else:
                fallback = True
                committed = tables.committed_tables(texts[fam.family], done.stderr)
                if committed:
                    fam.created, fam.created_tables = expected[fam.family], committed
        if passthrough is not None:
            done = passthrough.wait()
            if not done.ok and "exists" not in done.stderr and "already assigned" not in done.stderr:
                fallback = True
        if fallback:
            return False

        self._step("verify", ns)
        for fam, done in zip(fams, self._saves(ns, fams), strict=True):
            got = tables.owned(tables.parse_save(done.stdout)) if done.ok else None
            if got is None or not got.same_rules(expected[fam.family]):
                # Not what a namespace without rules of ours would give: hand over to the
                # read-first path, which sees what is there and replaces it whole.
                return False
        ns.check_still_there()
        return True

    def _already(self, fam: _FamilyState) -> bool:
        """True when our rules in this family already are the desired ones (nothing to write)."""
        assert fam.now is not None
        if fam.desired.is_empty():
            return fam.now.is_empty()
        # Computed (once per ruleset, then cached) rather than only looked up: a process that
        # never applied this ruleset itself, such as a restarted agent re-checking a namespace,
        # must still recognise rules that are already right and write nothing.
        try:
            return fam.now.same_rules(self.expected.compute(self.tools, fam.family, fam.desired))
        except ApplyError:
            return False  # a ruleset the kernel refuses: the restore says so, and rolls back

    def _route_families(self, fams: list[_FamilyState], ruleset: Ruleset, v6_used: bool) -> list[Family]:
        """Families whose policy route we must write or remove. Without TPROXY we look for an old
        route only where our old rules show TPROXY was in use, to spare a read on every apply."""
        if ruleset.tproxy is not None:
            return [Family.IPV4, Family.IPV6] if v6_used else [Family.IPV4]
        found = []
        for fam in fams:
            assert fam.now is not None
            if ("mangle", TPROXY) in fam.now.chains:
                found.append(fam.family)
        return found

    def _saves(self, ns: Netns, fams: list[_FamilyState]) -> list[Completed]:
        running = ns.start_all([(self.tools.save_argv(f.family), None) for f in fams])
        return [r.wait() for r in running]

    def _restore(self, ns: Netns, pending: list[_FamilyState]) -> None:
        texts = []
        for fam in pending:
            assert fam.now is not None
            texts.append(tables.replace_transaction(fam.now, fam.desired))
        running = ns.start_all(
            [
                (self.tools.restore_argv(f.family), text)
                for f, text in zip(pending, texts, strict=True)
                if text
            ]
        )
        results = [r.wait() for r in running]
        for fam in pending:
            fam.written = True  # may be partly committed even on failure: roll back to be sure
        for fam, done in zip([f for f, t in zip(pending, texts, strict=True) if t], results, strict=True):
            if not done.ok:
                raise ApplyError(f"{fam.family.value}-restore", done.reason())

    def _verify(
        self, ns: Netns, pending: list[_FamilyState], ruleset: Ruleset, route_fams: list[Family]
    ) -> None:
        if pending:
            for fam, done in zip(pending, self._saves(ns, pending), strict=True):
                if not done.ok:
                    raise ApplyError("verify", f"reading back {fam.family.value}: {done.reason()}")
                got = tables.owned(tables.parse_save(done.stdout))
                want = self.expected.compute(self.tools, fam.family, fam.desired)
                if not got.same_rules(want):
                    difference = tables.describe_difference(want, got)
                    raise ApplyError("verify", f"{fam.family.value} differs from the intended: {difference}")
        for family in route_fams:
            want_routes = routes.wanted(ruleset.tproxy)
            got_routes = routes.read_state(ns, family)
            if not got_routes.same_as(want_routes):
                raise ApplyError("verify", f"{family.name} policy route is {got_routes}, want {want_routes}")
        ns.check_still_there()

    def _rollback(
        self,
        ns: Netns,
        fams: list[_FamilyState],
        route_before: dict[Family, routes.RouteState],
        added_passthrough: bool,
    ) -> str:
        """Put back what we owned before; returns "" or a note on what could not be restored."""
        problems: list[str] = []
        for fam in fams:
            if not fam.written or fam.before is None:
                continue
            try:
                done = ns.run(self.tools.save_argv(fam.family))
                if not done.ok:
                    raise ApplyError("rollback", done.reason())
                now = tables.owned(tables.parse_save(done.stdout))
                if now.same_rules(fam.before):
                    continue
                text = tables.replace_transaction(now, tables.desired_from_owned(fam.before))
                undone = ns.run(self.tools.restore_argv(fam.family), stdin=text)
                if not undone.ok:
                    raise ApplyError("rollback", undone.reason())
            except (NodeError, tables.RulesetFormatError) as exc:
                problems.append(f"{fam.family.value}: {exc}")
        for family, before in route_before.items():
            try:
                routes.write(ns, family, routes.read_state(ns, family), before)
            except NodeError as exc:
                problems.append(f"{family.name} route: {exc.reason}")
        if added_passthrough:
            routes.remove_passthrough_v6(ns)
        if problems:
            return "; rollback incomplete: " + "; ".join(problems)
        return "; previous rules restored"
