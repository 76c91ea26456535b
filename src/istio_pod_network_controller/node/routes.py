"""The non-iptables half of a ruleset: TPROXY's policy route and IPv6's ``::6`` on lo.

TPROXY marks inbound packets and needs ``ip rule fwmark MARK lookup TABLE`` plus a local default
route in TABLE so they are delivered to the proxy's transparent socket. We tag the rule and the
route with our own routing protocol number, so a re-apply or a rollback finds exactly them.
Everything runs through ``ip -batch`` inside the namespace, one process per family and step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..render.ruleset import TproxyRoute
from .backend import Family
from .errors import ApplyError
from .netns import Netns, tool

# Routing protocol number stamped on our rule and route ("proto 137" in ip's output).
RT_PROTO = 137
PASSTHROUGH_V6 = "::6/128"

_INT = re.compile(r"^(0x[0-9a-fA-F]+|[0-9]+)$")


@dataclass(frozen=True, slots=True, order=True)
class MarkRule:
    mark: int
    table: int
    priority: int | None = None


@dataclass(frozen=True, slots=True, order=True)
class LocalRoute:
    table: int


@dataclass(frozen=True, slots=True)
class RouteState:
    """Our policy rules and local routes in one family."""

    rules: tuple[MarkRule, ...] = ()
    routes: tuple[LocalRoute, ...] = ()

    def same_as(self, other: RouteState) -> bool:
        def key(s: RouteState) -> tuple[list[tuple[int, int]], list[LocalRoute]]:
            return sorted((r.mark, r.table) for r in s.rules), sorted(s.routes)

        return key(self) == key(other)

    def is_empty(self) -> bool:
        return not self.rules and not self.routes


def wanted(route: TproxyRoute | None) -> RouteState:
    if route is None:
        return RouteState()
    return RouteState((MarkRule(route.mark, route.table),), (LocalRoute(route.table),))


def _flag(family: Family) -> str:
    return "-4" if family is Family.IPV4 else "-6"


def _int(value: object) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.split("/", 1)[0]
        if _INT.match(text):
            return int(text, 0)
    return None


def parse_state(text: str) -> RouteState:
    """Parse the two JSON documents ``ip -j -d -batch`` prints for ``rule show`` and ``route show``."""
    decoder = json.JSONDecoder()
    docs: list[object] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        doc, end = decoder.raw_decode(text, pos)
        docs.append(doc)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    rules: list[MarkRule] = []
    routes: list[LocalRoute] = []
    for doc in docs:
        if not isinstance(doc, list):
            continue
        for entry in doc:
            if not isinstance(entry, dict):
                continue
            if "fwmark" in entry and str(entry.get("protocol")) == str(RT_PROTO):
                mark, table, prio = (
                    _int(entry.get("fwmark")),
                    _int(entry.get("table")),
                    _int(entry.get("priority")),
                )
                if mark is not None and table is not None:
                    rules.append(MarkRule(mark, table, prio))
            elif entry.get("type") == "local" and "dst" in entry and "fwmark" not in entry:
                table = _int(entry.get("table"))
                if table is not None and entry.get("dst") == "default" and entry.get("dev") == "lo":
                    routes.append(LocalRoute(table))
    return RouteState(tuple(rules), tuple(routes))


def read_state(ns: Netns, family: Family) -> RouteState:
    script = f"rule show\nroute show table all proto {RT_PROTO}\n"
    done = ns.run([tool("ip"), "-j", "-d", _flag(family), "-batch", "-"], stdin=script)
    if not done.ok:
        raise ApplyError("policy route", f"reading {family.name} rules: {done.reason()}")
    return parse_state(done.stdout)


def _rule_spec(rule: MarkRule) -> str:
    prio = f" priority {rule.priority}" if rule.priority is not None else ""
    return f"fwmark {rule.mark} lookup {rule.table}{prio} protocol {RT_PROTO}"


def transition(current: RouteState, target: RouteState) -> list[str]:
    """``ip -batch`` lines that turn ``current`` into ``target``."""
    lines: list[str] = []
    keep_rules = {(r.mark, r.table) for r in target.rules}
    have_rules = {(r.mark, r.table) for r in current.rules}
    for rule in current.rules:
        if (rule.mark, rule.table) not in keep_rules:
            lines.append(f"rule del {_rule_spec(rule)}")
    for route in current.routes:
        if route not in target.routes:
            lines.append(f"route del local default dev lo table {route.table} proto {RT_PROTO}")
    for route in target.routes:
        if route not in current.routes:
            lines.append(f"route replace local default dev lo table {route.table} proto {RT_PROTO}")
    for rule in target.rules:
        if (rule.mark, rule.table) not in have_rules:
            lines.append(f"rule add {_rule_spec(rule)}")
    return lines


def write(ns: Netns, family: Family, current: RouteState, target: RouteState) -> bool:
    """Turn ``current`` into ``target``; True when anything had to be written."""
    lines = transition(current, target)
    if not lines:
        return False
    done = ns.run([tool("ip"), _flag(family), "-batch", "-"], stdin="\n".join(lines) + "\n")
    if not done.ok:
        raise ApplyError("policy route", f"{family.name}: {done.reason()}")
    return True


def add_passthrough_v6(ns: Netns) -> bool:
    """Put ``::6/128`` on lo (Istio's inbound passthrough source); True if we added it."""
    done = ns.run([tool("ip"), "-6", "addr", "add", PASSTHROUGH_V6, "dev", "lo"])
    if done.ok:
        return True
    if "File exists" in done.stderr or "already assigned" in done.stderr:
        return False
    raise ApplyError("passthrough address", done.reason())


def remove_passthrough_v6(ns: Netns) -> None:
    ns.run([tool("ip"), "-6", "addr", "del", PASSTHROUGH_V6, "dev", "lo"])
