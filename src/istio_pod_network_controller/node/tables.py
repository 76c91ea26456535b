"""Our part of a namespace's iptables state, and the one transaction that replaces it.

A pod's namespace may hold rules that are not ours (a CNI plugin's, an admin's), so re-applying
must touch only what we own: the chains named in ``OWN_CHAINS``, every rule that jumps into them,
and the rules we add to other chains, which carry a comment tag because nothing else marks them.
What we want comes in as structured rules (``render.rules``); what the kernel holds comes back as
``iptables-save`` text, the one text we parse here. Pure: tested without a kernel.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..render.rules import TABLES, FamilyRules, Rule, RulesetFormatError
from ..render.ruleset import OWN_CHAINS

__all__ = [
    "TABLES",
    "TAG",
    "Chain",
    "Desired",
    "Owned",
    "Placed",
    "RulesetFormatError",
    "SavedRule",
    "SavedState",
    "committed_tables",
    "create_transaction",
    "creates_nat_first",
    "describe_difference",
    "desired",
    "desired_from_owned",
    "owned",
    "parse_save",
    "replace_transaction",
    "without",
]

# Marks the rules we put into chains we do not own (PREROUTING, OUTPUT, ...), so that a later
# apply can find and remove exactly them. Unquoted in iptables-save output (letters and dashes).
TAG = "istio-pod-network-controller"


@dataclass(frozen=True, slots=True)
class Chain:
    """One chain as ``iptables-save`` shows it; ``policy`` is None for a user-defined chain."""

    name: str
    policy: str | None
    rules: tuple[str, ...]  # rule specs, the text after "-A NAME "


@dataclass(frozen=True, slots=True)
class SavedState:
    """One family's whole ruleset as read back with ``iptables-save``: table -> chains, in order."""

    tables: Mapping[str, tuple[Chain, ...]]

    def chain(self, table: str, name: str) -> Chain | None:
        for chain in self.tables.get(table, ()):
            if chain.name == name:
                return chain
        return None


@dataclass(frozen=True, slots=True)
class Placed:
    """One of our rules in a chain we do not own, with its 1-based position there."""

    position: int
    rule: str


@dataclass(frozen=True, slots=True)
class Owned:
    """What we own in one family's ruleset.

    ``chains``: (table, own chain) -> its rules. ``placed``: (table, foreign chain) -> our rules
    there with positions. Equality for verification ignores positions (others' rules move them).
    """

    chains: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    placed: Mapping[tuple[str, str], tuple[Placed, ...]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not self.chains and not self.placed

    def comparable(self) -> tuple[tuple[tuple[str, str, str], tuple[str, ...]], ...]:
        own = [((t, c, "chain"), rules) for (t, c), rules in self.chains.items()]
        foreign = [((t, c, "placed"), tuple(p.rule for p in ps)) for (t, c), ps in self.placed.items()]
        return tuple(sorted(own + foreign))

    def same_rules(self, other: Owned) -> bool:
        return self.comparable() == other.comparable()

    def rule_lines(self) -> list[str]:
        """Our rules as ``table CHAIN rule`` lines, for messages."""
        out = [f"{t} {c} {r}" for (t, c), rules in self.chains.items() for r in rules]
        out += [f"{t} {c} {p.rule}" for (t, c), ps in self.placed.items() for p in ps]
        return out


@dataclass(frozen=True, slots=True)
class SavedRule:
    """One of our rules as ``iptables-save`` printed it, written back verbatim on rollback: the
    kernel's own spelling (quotes included), so it is never split and re-joined."""

    table: str
    chain: str
    spec: str
    position: int | None = None

    def line(self) -> str:
        head = f"-A {self.chain}" if self.position is None else f"-I {self.chain} {self.position}"
        return f"{head} {self.spec}".rstrip()


@dataclass(frozen=True, slots=True)
class Desired:
    """What we want to own in one family: the own chains that must exist, as (table, chain), and
    the rules that fill them and others' chains, in order (those in others' chains carry the
    tag). Hashable: it keys the verification cache."""

    chains: tuple[tuple[str, str], ...] = ()
    rules: tuple[Rule | SavedRule, ...] = ()

    def tables(self) -> list[str]:
        used = {table for table, _ in self.chains} | {rule.table for rule in self.rules}
        return [t for t in TABLES if t in used]

    def chains_in(self, table: str) -> list[str]:
        return [chain for t, chain in self.chains if t == table]

    def lines_in(self, table: str) -> list[str]:
        """The rules of ``table`` as restore lines, in order."""
        return [rule.line() for rule in self.rules if rule.table == table]

    def is_empty(self) -> bool:
        return not self.chains and not self.rules


def parse_save(text: str) -> SavedState:
    """Parse ``iptables-save`` output (comments and counters ignored)."""
    tables: dict[str, list[Chain]] = {}
    table: str | None = None
    chains: dict[str, tuple[str | None, list[str]]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            chains = {}
        elif line == "COMMIT":
            if table is not None:
                tables[table] = [Chain(n, p, tuple(r)) for n, (p, r) in chains.items()]
            table = None
        elif table is None:
            raise RulesetFormatError(f"iptables-save line outside a table: {line!r}")
        elif line.startswith(":"):
            name, _, rest = line[1:].partition(" ")
            policy = rest.split(" ", 1)[0] if rest else "-"
            chains[name] = (None if policy == "-" else policy, [])
        elif line.startswith("-A "):
            _, name, spec = [*line.split(" ", 2), ""][:3]
            if name not in chains:
                raise RulesetFormatError(f"rule for an undeclared chain: {line!r}")
            chains[name][1].append(spec)
        else:
            raise RulesetFormatError(f"unexpected iptables-save line: {line!r}")
    return SavedState({t: tuple(c) for t, c in tables.items()})


def _tokens(spec: str) -> list[str]:
    try:
        return shlex.split(spec)
    except ValueError:
        return spec.split()


def _is_ours(table: str, spec: str) -> bool:
    tokens = _tokens(spec)
    own = OWN_CHAINS.get(table, ())
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "--jump", "-g", "--goto") and tokens[i + 1] in own:
            return True
        if tok == "--comment" and tokens[i + 1] == TAG:
            return True
    return False


def owned(state: SavedState) -> Owned:
    """Pick out our part of a saved ruleset."""
    chains: dict[tuple[str, str], tuple[str, ...]] = {}
    placed: dict[tuple[str, str], tuple[Placed, ...]] = {}
    for table, table_chains in state.tables.items():
        own = OWN_CHAINS.get(table, ())
        for chain in table_chains:
            if chain.policy is None and chain.name in own:
                chains[(table, chain.name)] = chain.rules
                continue
            ours = tuple(Placed(i, r) for i, r in enumerate(chain.rules, 1) if _is_ours(table, r))
            if ours:
                placed[(table, chain.name)] = ours
    return Owned(chains, placed)


def desired(rules: FamilyRules) -> Desired:
    """Our part of one family's rendered rules: the rules we add to chains we do not own get the
    tag. Refuses what we could not later undo: a chain we do not own, a rule into one of our
    chains that the ruleset does not create."""
    for table, chain in rules.chains:
        if table not in TABLES:
            raise RulesetFormatError(f"unknown table {table!r}")
        if chain not in OWN_CHAINS.get(table, ()):
            raise RulesetFormatError(f"chain {chain!r} in table {table} is not one we own")
    created = set(rules.chains)
    out: list[Rule | SavedRule] = []
    for rule in rules.rules:
        if rule.table not in TABLES:
            raise RulesetFormatError(f"unknown table {rule.table!r}")
        if rule.chain not in OWN_CHAINS.get(rule.table, ()):
            out.append(rule._replace(comment=TAG))
        elif (rule.table, rule.chain) in created:
            out.append(rule)
        else:
            raise RulesetFormatError(f"rule for a chain not created first: {rule.table} {rule.line()!r}")
    return Desired(rules.chains, tuple(out))


def desired_from_owned(current: Owned) -> Desired:
    """The Desired that recreates ``current`` exactly: used to roll back. Our rules in others'
    chains go back to their old positions (exact while the others' rules are unchanged)."""
    rules: list[SavedRule] = []
    for (table, name), specs in current.chains.items():
        rules += [SavedRule(table, name, spec) for spec in specs]
    for (table, name), placed in current.placed.items():
        in_order = sorted(placed, key=lambda p: p.position)
        rules += [SavedRule(table, name, p.rule, p.position) for p in in_order]
    return Desired(tuple(current.chains), tuple(sorted(rules, key=lambda rule: TABLES.index(rule.table))))


def replace_transaction(current: Owned, desired: Desired) -> str:
    """One ``iptables-restore --noflush`` text that turns our part of the namespace from
    ``current`` into ``desired``: remove our rules from others' chains, create or flush the
    chains we keep, flush and delete the ones we drop, then write the new rules. "" when there
    is nothing to do."""
    out: list[str] = []
    tables = {t for t, _ in current.chains} | {t for t, _ in current.placed} | set(desired.tables())
    for table in (t for t in TABLES if t in tables):
        body: list[str] = []
        for (t, name), placed in current.placed.items():
            if t == table:
                body += [f"-D {name} {p.rule}".rstrip() for p in placed]
        keep = desired.chains_in(table)
        body += [f":{name} - [0:0]" for name in keep]
        drop = [name for (t, name) in current.chains if t == table and name not in keep]
        body += [f"-F {name}" for name in drop]
        body += [f"-X {name}" for name in drop]
        body += desired.lines_in(table)
        if body:
            out += [f"*{table}", *body, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def describe_difference(want: Owned, got: Owned, limit: int = 4) -> str:
    """A short human account of how ``got`` differs from ``want``."""
    want_lines, got_lines = _multiset(want.rule_lines()), _multiset(got.rule_lines())
    missing = [line for line in want_lines if line not in got_lines]
    extra = [line for line in got_lines if line not in want_lines]
    parts: list[str] = []
    if missing:
        parts.append("missing " + "; ".join(missing[:limit]))
    if extra:
        parts.append("unexpected " + "; ".join(extra[:limit]))
    want_chains = {k for k in want.chains}
    got_chains = {k for k in got.chains}
    if want_chains != got_chains:
        parts.append(f"chains {sorted(got_chains)} instead of {sorted(want_chains)}")
    return ", ".join(parts) or "same rules in a different order"


def _multiset(lines: Iterable[str]) -> list[str]:
    seen: dict[str, int] = {}
    out: list[str] = []
    for line in lines:
        seen[line] = seen.get(line, 0) + 1
        out.append(f"{line} (#{seen[line]})" if seen[line] > 1 else line)
    return out


# nat first: every ruleset we write creates chains there, so in a namespace that already holds our
# rules the very first -N fails and iptables-restore stops before committing any table.
CREATE_ORDER = ("nat", "raw", "mangle", "filter", "security")


def create_transaction(desired: Desired) -> str:
    """A restore text for a namespace believed to hold nothing of ours: ``-N`` (which fails if
    the chain exists) instead of a create-or-flush, and no removals. Used without reading first;
    if the belief is wrong it fails in the nat table, before anything is committed."""
    out: list[str] = []
    used = desired.tables()
    for table in (t for t in CREATE_ORDER if t in used):
        out += [f"*{table}", *(f"-N {c}" for c in desired.chains_in(table))]
        out += [*desired.lines_in(table), "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def creates_nat_first(desired: Desired) -> bool:
    """Whether ``create_transaction`` of ``desired`` opens with a nat table that creates chains."""
    return bool(desired.chains_in("nat"))


def committed_tables(text: str, stderr: str) -> set[str]:
    """Tables of a failed restore ``text`` that were committed before the line the tool names."""
    match = re.search(r"line:? (\d+)", stderr)
    if match is None:
        return set()
    failed_at = int(match.group(1))
    done: set[str] = set()
    table = ""
    for number, line in enumerate(text.splitlines(), 1):
        if number >= failed_at:
            break
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.strip() == "COMMIT":
            done.add(table)
    return done


def without(current: Owned, added: Owned, in_tables: Iterable[str] | None = None) -> Owned:
    """``current`` minus ``added`` (chains we created, one copy of each rule we placed), in
    ``in_tables`` (all when None): what was ours before a create_transaction committed."""
    scope = set(in_tables) if in_tables is not None else None

    def touched(table: str) -> bool:
        return scope is None or table in scope

    chains = {k: v for k, v in current.chains.items() if not (touched(k[0]) and k in added.chains)}
    placed: dict[tuple[str, str], tuple[Placed, ...]] = {}
    for key, rules in current.placed.items():
        remove = [p.rule for p in added.placed.get(key, ())] if touched(key[0]) else []
        kept: list[Placed] = []
        removed = 0
        for p in rules:
            if p.rule in remove:
                remove.remove(p.rule)
                removed += 1
            else:
                kept.append(Placed(p.position - removed, p.rule))
        if kept:
            placed[key] = tuple(kept)
    return Owned(chains, placed)
