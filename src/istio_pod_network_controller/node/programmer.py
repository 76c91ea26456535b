"""What the agent needs of a node-side applier, whatever the mode (iptables or native nftables).

The agent plans a sandbox's rules with ``render`` (pure, from the spec) and makes them so with
``apply``; it keeps the planned value only to hash, count and apply again. One implementation per
mode: ``node.apply.Applier`` (iptables-restore, per family) and the native nftables one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from ..spec import RedirectSpec
    from .apply import ApplyResult
    from .netns import Netns


class Planned(Protocol):
    """Rendered rules for one sandbox, in the applier's own form."""

    def sha256(self) -> str: ...

    def rule_count(self) -> int: ...


P = TypeVar("P", bound=Planned)


class NodeApplier(Protocol[P]):
    # "iptables" or "nftables": which of Istio's modes the rules follow.
    mode: str

    @property
    def backend(self) -> str:
        """The tool family the rules are written with ("nft", "legacy", "nftables")."""
        ...

    def render(self, spec: RedirectSpec) -> P: ...

    def apply(self, ns: Netns, ruleset: P, *, fresh: bool = True) -> ApplyResult: ...
