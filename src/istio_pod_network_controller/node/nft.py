"""Apply Istio's native nftables ruleset inside a pod's network namespace, verify it, roll back.

nftables commits a whole batch or nothing, so one apply is one transaction: our three tables
(``inet istio-proxy-nat``/``-mangle``/``-raw``, the names Istio's ``--native-nftables`` gives them)
are deleted and rebuilt from the rendered ruleset in the same batch, and a failure leaves the
namespace as it was. What we read back (``list table`` of each of ours, JSON; nothing else in the
namespace is read) is compared with the same ruleset loaded once into an empty namespace, so both
sides are in the kernel's own canonical form. No other table is ever written. TPROXY's policy
route and IPv6's ``::6`` go through ``routes`` as in iptables mode.

nft runs either in process, through libnftables, or as ``nsenter ... nft`` per step. In process,
a short-lived thread enters the pod's namespace (``setns`` changes only the calling thread), does
the whole apply there and ends: the agent's other threads never move, and a thread that entered a
namespace is never reused. libnftables binds its netlink socket to the namespace of the thread
that creates its context, which is created inside. It saves the two process starts per step
(about 2-4 ms each) that dominate the per-pod cost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import selectors
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ..render.nftables import FAMILY, NftRuleset, TableName, render_nftables
from ..render.ruleset import TPROXY as TPROXY_CHAIN_IPTABLES
from ..render.ruleset import TproxyRoute
from ..spec import RedirectSpec
from . import routes, tables
from .apply import ApplyResult, NamespaceLocks, StepHook, scratch_netns
from .backend import Backend, Family
from .backend import tools as backend_tools
from .errors import ApplyError, NodeError
from .netns import CLONE_NEWNET, DEFAULT_TIMEOUT, Completed, Netns, tool

MODE = "nftables"
BACKEND = "nftables"
# Every table we may own: Istio's names. Anything else in a namespace is someone else's.
OUR_TABLES: tuple[str, ...] = tuple(t.value for t in TableName)
_MANGLE = TableName.MANGLE.value
_TPROXY_CHAIN = "istio-tproxy"
# What we read back: our tables, one command each, never the whole ruleset. A pod with NET_ADMIN
# may hold tables of its own of any size (a listing of all of them costs what it costs: seconds
# and hundreds of MiB for a 200k-element set); a table of ours that is not there is just absent.
LISTS: tuple[str, ...] = tuple(f"list table {FAMILY} {t}" for t in OUR_TABLES)
_ABSENT = "No such file or directory"
# How long one in-process apply may take, as a step of the nft binary (netns.DEFAULT_TIMEOUT).
LIB_TIMEOUT = 30.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NftPlan:
    """One sandbox's rules in nftables mode: the rendered ruleset and its ``nft -f`` text."""

    ruleset: NftRuleset
    text: str = field(default="", compare=False)

    @classmethod
    def of(cls, ruleset: NftRuleset) -> NftPlan:
        return cls(ruleset, ruleset.text())

    @property
    def tproxy(self) -> TproxyRoute | None:
        return self.ruleset.tproxy

    @property
    def ipv6(self) -> bool:
        return self.ruleset.ipv6_passthrough_address

    def tables(self) -> tuple[str, ...]:
        return tuple(t.name.value for t in self.ruleset.tables)

    def sha256(self) -> str:
        """Identifies the rules in a pod's mark; differs from any iptables-mode ruleset's."""
        digest = hashlib.sha256()
        for part in (MODE, "\0", self.text, "\0", repr(self.tproxy), repr(self.ipv6)):
            digest.update(part.encode())
        return digest.hexdigest()

    def rule_count(self) -> int:
        return self.ruleset.rule_count()


# -- what we own, as the kernel lists it ------------------------------------------------------


def _stable(value: Any) -> Any:
    """``value`` without what differs between equal rulesets: handles and counter values."""
    if isinstance(value, dict):
        if isinstance(value.get("counter"), dict):
            return {"counter": None}
        return {k: _stable(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _comparable(kind: str, body: dict[str, Any]) -> Any:
    """What two listings of equal rulesets have alike for one object (cheap: runs per rule)."""
    if kind == "rule":
        exprs = body.get("expr")
        if isinstance(exprs, list):
            exprs = [{"counter": None} if isinstance(e, dict) and "counter" in e else e for e in exprs]
        return (exprs, body.get("comment"))
    return json.dumps(_stable(body), sort_keys=True)


def _without_handles(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_handles(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [_without_handles(v) for v in value]
    return value


def _ours(kind: str, body: dict[str, Any]) -> bool:
    table = body.get("name") if kind == "table" else body.get("table")
    return body.get("family") == FAMILY and table in OUR_TABLES


@dataclass(frozen=True, slots=True)
class Item:
    """One listed object of ours: its kind, table, chain ("" for a table), the body as nft
    listed it (what a rollback writes back, counters included, handles dropped then), and what
    comparisons use: a rule's statements with counter values zeroed (and its comment), any other
    object's body without its handle, as text."""

    kind: str
    table: str
    chain: str
    body: dict[str, Any]
    stable: Any


@dataclass(frozen=True, slots=True)
class Owned:
    """Our tables in one namespace, in listing order. Compared canonically: tables and chains
    as sets, each chain's rules in order, handles and counter values left out."""

    items: tuple[Item, ...] = ()
    key: tuple[tuple[str, ...], tuple[tuple[tuple[str, str], tuple[Any, ...]], ...]] = field(
        default=((), ()), compare=False
    )

    @classmethod
    def of(cls, items: Iterable[Item]) -> Owned:
        kept = tuple(items)
        objects: list[str] = []
        rules: dict[tuple[str, str], list[Any]] = {}
        for item in kept:
            if item.kind == "rule":
                rules.setdefault((item.table, item.chain), []).append(item.stable)
            else:
                objects.append(f"{item.kind} {item.stable}")
        grouped = tuple(sorted(((k, tuple(v)) for k, v in rules.items()), key=lambda kv: kv[0]))
        return cls(kept, (tuple(sorted(objects)), grouped))

    @classmethod
    def from_listing(cls, text: str) -> Owned:
        """Our part of an ``nft -j list ...`` listing; ApplyError when it is not that."""
        return cls.from_listings([text])

    @classmethod
    def from_listings(cls, texts: Iterable[str]) -> Owned:
        """Our part of several ``nft -j list ...`` listings, in order."""
        objects: list[Any] = []
        for text in texts:
            try:
                listed = json.loads(text)
                found = listed["nftables"]
                if not isinstance(found, list):
                    raise TypeError("not a list")
            except (ValueError, TypeError, KeyError) as exc:
                raise ApplyError("read", f"nft listing is not the expected JSON: {exc}") from None
            objects += found
        items: list[Item] = []
        for obj in objects:
            if not isinstance(obj, dict) or len(obj) != 1:
                continue
            ((kind, body),) = obj.items()
            if kind == "metainfo" or not isinstance(body, dict) or not _ours(kind, body):
                continue
            table = str(body.get("name") if kind == "table" else body.get("table"))
            chain = str(body.get("chain", body.get("name", ""))) if kind != "table" else ""
            items.append(Item(kind, table, chain, body, _comparable(kind, body)))
        return cls.of(items)

    def is_empty(self) -> bool:
        return not self.items

    def canonical(self) -> tuple[tuple[str, ...], dict[tuple[str, str], tuple[Any, ...]]]:
        return self.key[0], dict(self.key[1])

    def same_rules(self, other: Owned) -> bool:
        return self.key == other.key

    def tables(self) -> set[str]:
        return {item.table for item in self.items if item.kind == "table"}

    def within(self, names: set[str]) -> Owned:
        """Only the items of the tables named."""
        return Owned.of(item for item in self.items if item.table in names)

    def tproxy_families(self) -> list[Family]:
        """Families our TPROXY chain diverts (where a policy route of ours may be left)."""
        found: list[Family] = []
        for item in self.items:
            if (item.kind, item.table, item.chain) != ("rule", _MANGLE, _TPROXY_CHAIN):
                continue
            loaded = item.body
            for expr in loaded.get("expr", ()):
                tproxy = expr.get("tproxy") if isinstance(expr, dict) else None
                if isinstance(tproxy, dict):
                    family = Family.IPV6 if tproxy.get("family") == "ip6" else Family.IPV4
                    if family not in found:
                        found.append(family)
        return sorted(found, key=lambda f: f is Family.IPV6)

    def restore_commands(self) -> list[dict[str, Any]]:
        """JSON commands that recreate exactly these items (counters included)."""
        return [{"add": {item.kind: _without_handles(item.body)}} for item in self.items]


def describe_difference(want: Owned, got: Owned, limit: int = 4) -> str:
    """A short account of how ``got`` differs from ``want``, chain by chain."""
    want_objects, want_rules = want.canonical()
    got_objects, got_rules = got.canonical()
    parts: list[str] = []
    want_tables, got_tables = want.tables(), got.tables()
    if want_tables != got_tables:
        parts.append(f"tables {sorted(got_tables)} instead of {sorted(want_tables)}")
    elif set(want_objects) != set(got_objects):
        parts.append("chains differ")
    for key in sorted(set(want_rules) | set(got_rules)):
        have, need = got_rules.get(key, ()), want_rules.get(key, ())
        if have != need:
            missing = sum(1 for r in need if r not in have)
            extra = sum(1 for r in have if r not in need)
            what = f"{missing} missing, {extra} unexpected" if missing or extra else "reordered"
            parts.append(f"{key[0]} {key[1]}: {len(have)} rules instead of {len(need)} ({what})")
    return ", ".join(parts[:limit]) or "same rules"


# -- running nft ------------------------------------------------------------------------------


class Session(Protocol):
    """nft in one namespace: ``run`` takes a script and returns what nft said. ``json_output``
    asks for JSON output (for ``list``) and lets nft read the script as JSON commands."""

    def run(self, script: str, *, json_output: bool = False) -> Completed: ...


class Runner(Protocol):
    """How nft reaches a namespace."""

    name: str

    def within(self, ns: Netns, body: Callable[[Session], T]) -> T: ...

    def scratch(self, body: Callable[[Session], T]) -> T: ...


class _ProcessSession:
    def __init__(self, ns: Netns, nft: str) -> None:
        self._ns, self._nft = ns, nft

    def run(self, script: str, *, json_output: bool = False) -> Completed:
        if script in LISTS:  # nft -f prints no JSON for a list command: ask on the command line
            return self._ns.run([self._nft, "-j", *script.split()])
        argv = [self._nft, *(["-j"] if json_output else []), "-f", "-"]
        return self._ns.run(argv, stdin=script)


class ProcessRunner:
    """``nsenter --net=/proc/self/fd/N -- nft -f -`` per step."""

    name = "nft"

    def __init__(self) -> None:
        self._nft = tool("nft")

    def within(self, ns: Netns, body: Callable[[Session], T]) -> T:
        return body(_ProcessSession(ns, self._nft))

    def scratch(self, body: Callable[[Session], T]) -> T:
        with scratch_netns() as ns:
            return body(_ProcessSession(ns, self._nft))


_NFT_CTX_OUTPUT_JSON = 1 << 4
_THREAD = "ipnc-nft-netns"
_log = logging.getLogger(__name__)


class _Libnftables:
    """The few libnftables calls we need, typed for ctypes."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self.lib = lib
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.setns.restype = ctypes.c_int
        libc.unshare.argtypes = [ctypes.c_int]
        libc.unshare.restype = ctypes.c_int
        self.libc = libc


# libnftables keeps a command's state in its context (parser, scanner, cache, netlink socket,
# output buffers), so contexts in different threads run commands side by side. What is process-
# wide is set up on the first nft_ctx_new (mini-gmp's allocators, xtables, behind an unguarded
# "once" flag) and torn down around nft_ctx_free: those two take this lock, and nothing else does,
# so that one slow namespace (a tenant's churning commits restart a listing's dump) never holds
# up another's apply. Our scripts use no interface-index lookups (`iif`, `oif`), the one per-
# command path through a process-wide cache; a tenant's rules are never listed.
_LIB_LOCK = threading.Lock()


class _LibSession:
    """A libnftables context created inside the namespace of the thread that owns it.
    ``abandoned`` set (its apply ran out of time): no further command starts."""

    def __init__(self, api: _Libnftables, abandoned: threading.Event) -> None:
        self._api = api
        self._abandoned = abandoned
        with _LIB_LOCK:
            ctx = api.lib.nft_ctx_new(0)
            if not ctx:
                raise ApplyError("nft", "libnftables could not create a context")
            api.lib.nft_ctx_buffer_output(ctx)
            api.lib.nft_ctx_buffer_error(ctx)
        self._ctx: int | None = ctx

    def run(self, script: str, *, json_output: bool = False) -> Completed:
        if self._ctx is None:
            raise ApplyError("nft", "libnftables context already closed")
        if self._abandoned.is_set():
            raise ApplyError("nft", "apply ran out of time; no further nft command")
        lib = self._api.lib
        lib.nft_ctx_output_set_flags(self._ctx, _NFT_CTX_OUTPUT_JSON if json_output else 0)
        code = lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
        out = lib.nft_ctx_get_output_buffer(self._ctx) or b""
        err = lib.nft_ctx_get_error_buffer(self._ctx) or b""
        return Completed(
            ("nft",), 0 if code == 0 else 1, out.decode(errors="replace"), err.decode(errors="replace")
        )

    def close(self) -> None:
        if self._ctx is not None:
            with _LIB_LOCK:
                self._api.lib.nft_ctx_free(self._ctx)
            self._ctx = None


class LibRunner:
    """libnftables in process, each apply in a thread of its own that enters the namespace."""

    name = "libnftables"

    def __init__(self, path: str = "libnftables.so.1", *, timeout: float = LIB_TIMEOUT) -> None:
        try:
            self._api = _Libnftables(path)
        except (OSError, AttributeError) as exc:
            raise NodeError("nft", f"libnftables is not usable: {exc}") from None
        self.timeout = timeout
        # Threads whose apply ran out of time and that were left to end on their own (a call
        # into the library cannot be interrupted). Each was dedicated to its apply: nothing
        # reuses it, and it starts no further nft command once abandoned.
        self.abandoned = 0
        self._stuck: list[threading.Thread] = []
        self._count_guard = threading.Lock()

    def stuck(self) -> int:
        """Abandoned threads still running."""
        with self._count_guard:
            self._stuck = [t for t in self._stuck if t.is_alive()]
            return len(self._stuck)

    def within(self, ns: Netns, body: Callable[[Session], T]) -> T:
        fd = ns.fileno()
        return self._in_thread(lambda: self._api.libc.setns(fd, CLONE_NEWNET), body, f"enter {ns.path}")

    def scratch(self, body: Callable[[Session], T]) -> T:
        # unshare gives the calling thread alone a new, empty network namespace, which goes
        # away with the thread.
        return self._in_thread(lambda: self._api.libc.unshare(CLONE_NEWNET), body, "a scratch namespace")

    def _in_thread(self, enter: Callable[[], int], body: Callable[[Session], T], what: str) -> T:
        outcome: list[T] = []
        failure: list[BaseException] = []
        abandoned = threading.Event()

        def work() -> None:
            # This thread is never used for anything else: whether or not it entered, it ends here.
            try:
                if enter() != 0:
                    errno = ctypes.get_errno()
                    raise ApplyError("nft", f"cannot enter {what}: errno {errno}")
                session = _LibSession(self._api, abandoned)
                try:
                    outcome.append(body(session))
                finally:
                    session.close()
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=work, name=_THREAD, daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            abandoned.set()
            with self._count_guard:
                self.abandoned += 1
                self._stuck.append(thread)
            _log.warning(
                "libnftables in %s did not finish within %gs; its thread was abandoned "
                "(%d so far, %d still running)",
                what,
                self.timeout,
                self.abandoned,
                self.stuck(),
            )
            raise ApplyError(
                "nft",
                f"libnftables in {what} did not finish within {self.timeout:g}s "
                "(its ruleset is changing or huge); abandoned, no further nft command runs there",
            )
        if failure:
            raise failure[0]
        return outcome[0]


def default_runner() -> Runner:
    """libnftables in process when the node's image has it, else the nft binary."""
    try:
        return LibRunner()
    except NodeError:
        return ProcessRunner()


def read_owned(nft: Session, step: str) -> Owned:
    """Our tables in the session's namespace: one listing per table of ours, absent ones skipped;
    nothing else there is read."""
    texts: list[str] = []
    for command in LISTS:
        listed = nft.run(command, json_output=True)
        if listed.ok:
            texts.append(listed.stdout)
        elif _ABSENT not in listed.stderr:
            raise ApplyError(step, listed.reason())
    return Owned.from_listings(texts)


# -- the expected form, once per ruleset ------------------------------------------------------


class ExpectedCache:
    """Our tables as the kernel lists them after loading a ruleset into an empty namespace,
    cached per ruleset text: the reference that verification compares against."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._items: OrderedDict[str, Owned] = OrderedDict()
        self._guard = threading.Lock()

    def get(self, text: str) -> Owned | None:
        with self._guard:
            found = self._items.get(text)
            if found is not None:
                self._items.move_to_end(text)
            return found

    def compute(self, runner: Runner, text: str) -> Owned:
        found = self.get(text)
        if found is not None:
            return found

        def load(session: Session) -> Owned:
            loaded = session.run(text)
            if not loaded.ok:
                raise ApplyError("prepare", f"nftables ruleset does not load: {loaded.reason()}")
            return read_owned(session, "prepare")

        result = runner.scratch(load) if text else Owned()
        with self._guard:
            self._items[text] = result
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return result


# -- transactions -----------------------------------------------------------------------------


def create_transaction(plan: NftPlan) -> str:
    """For a namespace believed to hold nothing of ours: ``create table`` fails (and with it the
    whole batch, before anything is committed) if one of the plan's tables is there. Nothing is
    deleted: a deletion makes the kernel's release of our netlink socket wait a grace period
    (~10 ms); a table of ours the plan does not use shows in the read-back, which replaces it."""
    lines = [f"create table {FAMILY} {t}" for t in plan.tables()]
    return "\n".join(lines) + "\n" + plan.text


def _clear_lines() -> list[str]:
    # `add` first, so that the `delete` finds the table whether or not it was there.
    return [line for t in OUR_TABLES for line in (f"add table {FAMILY} {t}", f"delete table {FAMILY} {t}")]


def replace_transaction(plan: NftPlan) -> str:
    """Our tables, whatever they hold now, become exactly ``plan``'s, in one batch."""
    return "\n".join(_clear_lines()) + "\n" + plan.text


def restore_transaction(previous: Owned) -> str:
    """JSON commands that put back exactly ``previous`` (nothing of ours when it is empty)."""
    clear: list[dict[str, Any]] = []
    for name in OUR_TABLES:
        table = {"table": {"family": FAMILY, "name": name}}
        clear += [{"add": table}, {"delete": table}]
    return json.dumps({"nftables": [*clear, *previous.restore_commands()]})


# -- the other mode ---------------------------------------------------------------------------


# Our iptables-mode rules are a few KiB; a pod with NET_ADMIN may have any amount of its own. What
# is read of an iptables-save is capped so that it cannot exhaust the agent's memory.
MAX_SAVE_BYTES = 4 * 2**20


class _TooLarge(Exception):
    pass


def _bounded_output(ns: Netns, command: list[str], limit: int = MAX_SAVE_BYTES) -> str | None:
    """``command``'s stdout in ``ns``, or None when it fails or takes longer than a step may
    (netns.DEFAULT_TIMEOUT); _TooLarge (the command killed) past ``limit`` bytes."""
    fd = ns.fileno()
    try:
        proc = subprocess.Popen(  # noqa: S603 -- argv list from backend.tools
            ns.argv(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
        )
    except OSError:
        return None
    assert proc.stdout is not None
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while size <= limit:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return None
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        if size > limit:
            raise _TooLarge
        code = proc.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return b"".join(chunks).decode(errors="replace") if code == 0 else None


def remove_iptables_mode(ns: Netns, *, keep_routes: bool) -> list[str]:
    """Remove our iptables-mode rules from ``ns``, with either iptables backend installed here;
    and, unless ``keep_routes``, the TPROXY policy route they used. Notes on what was done."""
    notes: list[str] = []
    for backend in Backend:
        try:
            found = backend_tools(backend)
        except NodeError:
            continue
        for family in Family:
            try:
                saved = _bounded_output(ns, found.save_argv(family))
            except _TooLarge:
                notes.append(
                    f"{family.value} ({backend.value}) rules of iptables mode not looked for: "
                    f"the namespace's iptables ruleset is over {MAX_SAVE_BYTES // 2**20} MiB"
                )
                continue
            if saved is None:
                continue  # no such family here, or nothing loaded
            try:
                owned = tables.owned(tables.parse_save(saved))
            except tables.RulesetFormatError:
                continue
            if owned.is_empty():
                continue
            text = tables.replace_transaction(owned, tables.Desired())
            done = ns.run(found.restore_argv(family), stdin=text)
            what = f"{family.value} ({backend.value}) rules of iptables mode"
            notes.append(f"{what} removed" if done.ok else f"{what} not removed: {done.reason()}")
            if done.ok and not keep_routes and ("mangle", TPROXY_CHAIN_IPTABLES) in owned.chains:
                try:
                    routes.write(ns, family, routes.read_state(ns, family), routes.RouteState())
                except NodeError as exc:
                    notes.append(f"{family.name} policy route not removed: {exc.reason}")
    return notes


# -- the applier ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Work:
    """State of one apply, for the rollback."""

    before: Owned | None = None  # ours before this apply (None: not read, believed empty)
    written: bool = False
    route_before: dict[Family, routes.RouteState] = field(default_factory=dict)
    added_passthrough: bool = False
    replaced: list[str] = field(default_factory=list)


class NftApplier:
    """Applies native nftables rulesets. Thread-safe; share one per agent so that the
    per-namespace lock and the verification cache are shared too."""

    mode = MODE

    def __init__(
        self,
        runner: Runner | None = None,
        *,
        on_step: StepHook | None = None,
        locks: NamespaceLocks | None = None,
    ) -> None:
        self.runner = runner if runner is not None else default_runner()
        self.locks = locks if locks is not None else NamespaceLocks()
        self.expected = ExpectedCache()
        self._on_step = on_step

    @property
    def backend(self) -> str:
        return BACKEND

    def render(self, spec: RedirectSpec) -> NftPlan:
        return NftPlan.of(render_nftables(spec))

    def apply(self, ns: Netns, ruleset: NftPlan, *, fresh: bool = True) -> ApplyResult:
        """Make our tables in ``ns`` exactly ``ruleset``'s, verified; raise ApplyError otherwise,
        after putting back what we owned before. Nothing is written when they already are.

        ``fresh`` (a new sandbox) tries the create-only transaction first, which fails before
        committing anything when tables of ours are there; False reads first."""
        started = time.perf_counter()
        work = _Work()
        with self.locks.hold(ns.id):
            try:
                self._step("start", ns)
                want = self.expected.compute(self.runner, ruleset.text)
                changed = self.runner.within(
                    ns, lambda nft: self._apply_in(ns, nft, ruleset, want, fresh, work)
                )
            finally:
                self._step("done", ns)
        return ApplyResult(
            netns=ns.path,
            inode=ns.inode,
            backend=BACKEND,
            rules=ruleset.rule_count(),
            changed=changed,
            milliseconds=(time.perf_counter() - started) * 1000,
            replaced="; ".join(work.replaced),
            mode=MODE,
        )

    def _step(self, name: str, ns: Netns) -> None:
        if self._on_step is not None:
            self._on_step(name, ns)

    def _apply_in(
        self, ns: Netns, nft: Session, plan: NftPlan, want: Owned, fresh: bool, work: _Work
    ) -> bool:
        if fresh and plan.tproxy is None and self._create(ns, nft, plan, want, work):
            return True
        self._step("read", ns)
        work.before = before = self._read(nft, "read")
        route_families = self._route_families(plan, before)
        pending = not before.same_rules(want)
        if not pending and not route_families and not plan.ipv6:
            ns.check_still_there()
            return False
        if pending and not before.is_empty():
            work.replaced.append(f"nftables: {describe_difference(want, before)}")
        routes_written = False
        try:
            if plan.tproxy is not None:
                self._step("policy route", ns)
                target = routes.wanted(plan.tproxy)
                for family in route_families:
                    work.route_before[family] = routes.read_state(ns, family)
                    if routes.write(ns, family, work.route_before[family], target):
                        routes_written = True
                        work.replaced.append(
                            f"{family.name} policy route: {work.route_before[family]}, not {target}"
                        )
            if plan.ipv6:
                self._step("passthrough address", ns)
                # |=: the fresh path may have added it already, and what this apply added, its
                # rollback removes.
                work.added_passthrough |= routes.add_passthrough_v6(ns)
            if pending:
                self._step("write", ns)
                work.written = True
                done = nft.run(replace_transaction(plan))
                if not done.ok:
                    raise ApplyError("nft", done.reason())
            if plan.tproxy is None and route_families:
                self._step("policy route", ns)
                for family in route_families:
                    work.route_before[family] = routes.read_state(ns, family)
                    routes_written |= routes.write(ns, family, work.route_before[family], routes.RouteState())
            self._step("verify", ns)
            if pending:
                self._verify(nft, want)
            for family in route_families:
                want_routes, got_routes = routes.wanted(plan.tproxy), routes.read_state(ns, family)
                if not got_routes.same_as(want_routes):
                    raise ApplyError(
                        "verify", f"{family.name} policy route is {got_routes}, want {want_routes}"
                    )
            ns.check_still_there()
        except NodeError as exc:
            rollback = self._rollback(ns, nft, work)
            raise ApplyError(exc.step, ns.gone_or(exc.reason) + rollback) from None
        if pending and before.is_empty() and not fresh:
            # Nothing of ours in nftables mode, yet a re-check: perhaps programmed in iptables
            # mode before the agent's mode changed. Our tables are in place and verified; the
            # other mode's rules go now, so that the two never both stay.
            work.replaced += remove_iptables_mode(ns, keep_routes=plan.tproxy is not None)
        return pending or routes_written or work.added_passthrough

    def _create(self, ns: Netns, nft: Session, plan: NftPlan, want: Owned, work: _Work) -> bool:
        """A namespace believed new: one create-only transaction, no read first. False (nothing
        committed) when tables of ours are there: the read-first path takes over."""
        passthrough = None
        if plan.ipv6:
            # Side by side with the transaction: its own process, the one step that needs one.
            passthrough = ns.start([tool("ip"), "-6", "addr", "add", routes.PASSTHROUGH_V6, "dev", "lo"])
        self._step("write", ns)
        created = nft.run(create_transaction(plan))
        if passthrough is not None:
            added = passthrough.wait()
            exists = "exists" in added.stderr or "already assigned" in added.stderr
            work.added_passthrough = added.ok
            if not added.ok and not exists:
                if created.ok:
                    self._undo_create(nft, plan)
                raise ApplyError("passthrough address", added.reason())
        if not created.ok:
            return False
        work.before, work.written = Owned(), True
        self._step("verify", ns)
        try:
            got = self._read(nft, "verify")
            planned = set(plan.tables())
            if not got.within(planned).same_rules(want):
                difference = describe_difference(want, got.within(planned))
                raise ApplyError("verify", f"nftables differs from the intended: {difference}")
            strays = got.within(set(OUR_TABLES) - planned)
            if not strays.is_empty():
                # Tables of ours the plan does not use were there before (an older ruleset's):
                # what stood there is those, and one more batch replaces them.
                work.before = strays
                work.replaced.append(f"nftables: {describe_difference(want, got)}")
                self._step("write", ns)
                done = nft.run(replace_transaction(plan))
                if not done.ok:
                    raise ApplyError("nft", done.reason())
                self._step("verify", ns)
                self._verify(nft, want)
            ns.check_still_there()
        except NodeError as exc:
            rollback = self._rollback(ns, nft, work)
            raise ApplyError(exc.step, ns.gone_or(exc.reason) + rollback) from None
        return True

    def _undo_create(self, nft: Session, plan: NftPlan) -> None:
        nft.run("".join(f"delete table {FAMILY} {t}\n" for t in plan.tables()))

    def _read(self, nft: Session, step: str) -> Owned:
        return read_owned(nft, step)

    def _verify(self, nft: Session, want: Owned) -> None:
        got = self._read(nft, "verify")
        if not got.same_rules(want):
            raise ApplyError(
                "verify", f"nftables differs from the intended: {describe_difference(want, got)}"
            )

    def _route_families(self, plan: NftPlan, before: Owned) -> list[Family]:
        """Where a policy route of ours must be written (TPROXY) or may be left to remove (our
        old TPROXY chain diverted that family)."""
        if plan.tproxy is not None:
            return [Family.IPV4, Family.IPV6] if plan.ipv6 else [Family.IPV4]
        return before.tproxy_families()

    def _rollback(self, ns: Netns, nft: Session, work: _Work) -> str:
        """Put back what we owned before; "" or a note on what could not be restored."""
        problems: list[str] = []
        if work.written and work.before is not None:
            try:
                now = self._read(nft, "rollback")
                if not now.same_rules(work.before):
                    undone = nft.run(restore_transaction(work.before), json_output=True)
                    if not undone.ok:
                        problems.append(f"nftables: {undone.reason()}")
            except NodeError as exc:
                problems.append(f"nftables: {exc.reason}")
        for family, before in work.route_before.items():
            try:
                routes.write(ns, family, routes.read_state(ns, family), before)
            except NodeError as exc:
                problems.append(f"{family.name} route: {exc.reason}")
        if work.added_passthrough:
            routes.remove_passthrough_v6(ns)
        if problems:
            return "; rollback incomplete: " + "; ".join(problems)
        return "; previous rules restored"
