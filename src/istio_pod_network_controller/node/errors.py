"""Errors of the node side, each naming the step that failed and why.

The agent turns them into a pod status and an Event, the ``apply`` command into a one-line
message and exit code 1, so the step and the reason travel as fields, not only as text.
"""

from __future__ import annotations


class NodeError(Exception):
    """A step on the node failed; ``step`` is a short name (``"iptables-restore"``), ``reason``
    says why, in words a cluster admin can act on."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class LocateError(NodeError):
    """The pod's network namespace could not be found, or is not one we may program."""


class ApplyError(NodeError):
    """Applying or verifying a ruleset failed; the namespace was rolled back when possible."""


class BackendError(NodeError):
    """No usable iptables backend (nft or legacy) on this node."""
