"""The rule model: one iptables rule as a value, and one family's rules with the chains they need.

Rules stay structured from the renderer to the node, as in istio-iptables' builder: the same
values print the ``rules`` command's restore text, hash into the ruleset's SHA-256, and become
the node's transactions (which add a marker comment to some of them). Text is parsed back into
this model in one place only, ``FamilyRules.from_restore_text``, for rulesets written by hand.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

# Tables in the order iptables-save lists them; every table the model may name.
TABLES = ("raw", "mangle", "nat", "filter", "security")
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})

# The table of a rule or of a (table, chain) pair: the key that groups both by table.
_TABLE = operator.itemgetter(0)
_CHAIN = r"[A-Za-z0-9_.-]{1,28}"
_DECLARE = re.compile(rf"^(?:-N\s+({_CHAIN})|:({_CHAIN})\s+-(?:\s+\[\d+:\d+\])?)$")
_RULE = re.compile(rf"^(-A|-I)\s+({_CHAIN})(?:\s+(\d+))?\s+(\S.*)$")


class RulesetFormatError(ValueError):
    """A ruleset uses a form the node side does not apply: it accepts what the renderer writes
    (``*table``, ``-N``, ``:chain -``, ``-A``, ``-I``, ``COMMIT``; unquoted tokens; a ``-j``
    target in every rule), and only chains it could later remove again."""


class Rule(NamedTuple):
    """One rule: ``-A CHAIN`` (``position`` None) or ``-I CHAIN POSITION``, its match tokens,
    ``-j JUMP`` and the target's options. ``comment`` is the marker the node side adds to the
    rules it puts into chains it does not own; the renderer never sets it.

    An immutable, hashable value like a frozen dataclass; a NamedTuple because the renderer
    builds a few dozen per pod and a frozen dataclass takes twice as long to construct."""

    table: str
    chain: str
    match: tuple[str, ...]
    jump: str
    options: tuple[str, ...] = ()
    position: int | None = None
    comment: str | None = None

    def spec(self) -> tuple[str, ...]:
        """The tokens after the chain (and position): what ``iptables -A CHAIN`` takes."""
        marker = ("-m", "comment", "--comment", self.comment) if self.comment is not None else ()
        return (*marker, *self.match, "-j", self.jump, *self.options)

    def argv(self) -> tuple[str, ...]:
        """The rule as ``iptables -t TABLE`` arguments."""
        head = ("-A", self.chain) if self.position is None else ("-I", self.chain, str(self.position))
        return (*head, *self.spec())

    def line(self) -> str:
        """The rule as a line of iptables-restore text (``argv`` joined, spelled out for speed)."""
        _, chain, match, jump, options, position, comment = self
        if position is None and comment is None:
            return " ".join(("-A", chain, *match, "-j", jump, *options))
        return " ".join(self.argv())

    def jumps_to_chain(self) -> bool:
        """Whether the target is one of our chains (chains are only ever jumped to bare)."""
        return not self.options and self.jump.startswith("ISTIO_")


@dataclass(frozen=True, slots=True)
class FamilyRules:
    """One family's rules, in order, and the user-defined chains they need, as (table, chain)
    in the order they are created; both grouped by table in alphabetical order, the order of the
    restore text (order between tables means nothing). A value: hashable, so it can key a cache."""

    chains: tuple[tuple[str, str], ...] = ()
    rules: tuple[Rule, ...] = ()

    @classmethod
    def of(cls, rules: Iterable[Rule]) -> FamilyRules:
        """The rules with the chains istio-iptables declares for them: per table, the chains
        that hold rules in order of appearance, then those only jumped to."""
        ordered = sorted(rules, key=_TABLE)
        filled: dict[tuple[str, str], None] = {}
        jumped: dict[tuple[str, str], None] = {}
        for table, chain, _, jump, options, _, _ in ordered:
            if chain not in BUILTIN_CHAINS:
                filled[table, chain] = None
            if not options and jump.startswith("ISTIO_"):  # as in Rule.jumps_to_chain
                jumped[table, jump] = None
        # A dict union keeps the left's order and appends the right's new keys.
        return cls(tuple(sorted(filled | jumped, key=_TABLE)), tuple(ordered))

    @classmethod
    def grouped(cls, chains: Iterable[tuple[str, str]], rules: Iterable[Rule]) -> FamilyRules:
        """Chains and rules, each grouped by table (a stable sort: order within a table kept)."""
        return cls(tuple(sorted(chains, key=_TABLE)), tuple(sorted(rules, key=_TABLE)))

    def is_empty(self) -> bool:
        return not self.chains and not self.rules

    def by_table(self) -> list[tuple[str, list[str], list[Rule]]]:
        """(table, chains to create, rules) per table, tables in alphabetical order."""
        used = {table for table, _ in self.chains}
        used.update(rule.table for rule in self.rules)
        return [
            (
                table,
                [chain for t, chain in self.chains if t == table],
                [rule for rule in self.rules if rule.table == table],
            )
            for table in sorted(used)
        ]

    def restore_text(self) -> str:
        """iptables-restore ``--noflush`` text: per table its ``-N`` lines, then its rules; ""
        when there are no rules."""
        out: list[str] = []
        for table, chains, rules in self.by_table():
            out.append(f"* {table}")
            out += [f"-N {chain}" for chain in chains]
            out += [rule.line() for rule in rules]
            out.append("COMMIT")
        return "\n".join(out) + "\n" if out else ""

    @classmethod
    def from_restore_text(cls, text: str) -> FamilyRules:
        """Parse restore text in the forms the renderer writes (see ``RulesetFormatError``).
        ``restore_text`` of the result gives back the renderer's text byte for byte."""
        chains: dict[tuple[str, str], None] = {}
        rules: list[Rule] = []
        table: str | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "\0" in line:
                raise RulesetFormatError("control character in a rule line")
            if line.startswith("*"):
                if table is not None:
                    raise RulesetFormatError(f"table {table} not committed before {line!r}")
                table = line[1:].strip()
                if table not in TABLES:
                    raise RulesetFormatError(f"unknown table {table!r}")
                continue
            if table is None:
                raise RulesetFormatError(f"line outside a table: {line!r}")
            if line == "COMMIT":
                table = None
                continue
            declared = _DECLARE.match(line)
            if declared:
                chains.setdefault((table, declared.group(1) or declared.group(2)), None)
                continue
            rules.append(_parse_rule(table, line))
        if table is not None:
            raise RulesetFormatError(f"table {table} not committed")
        return cls.grouped(chains, rules)


def _parse_rule(table: str, line: str) -> Rule:
    found = _RULE.match(line)
    if not found:
        raise RulesetFormatError(f"unsupported restore line: {line!r}")
    verb, chain, number, rest = found.groups()
    tokens = rest.split()
    position: int | None = None
    if verb == "-I":
        position = int(number) if number is not None else 1
        if position < 1:
            raise RulesetFormatError(f"rule position must be 1 or more: {line!r}")
    elif number is not None:
        tokens.insert(0, number)  # -A takes no position: a number here belongs to the spec
    if any('"' in t or "'" in t for t in tokens):
        raise RulesetFormatError(f"quoted arguments are not supported: {line!r}")
    if "-j" not in tokens or tokens.index("-j") == len(tokens) - 1:
        raise RulesetFormatError(f"rule without a -j target: {line!r}")
    at = tokens.index("-j")
    return Rule(table, chain, tuple(tokens[:at]), tokens[at + 1], tuple(tokens[at + 2 :]), position)
