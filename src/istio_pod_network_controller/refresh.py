"""When the agent writes a pod's mark once more: the kubelet has not shown it to the waiter yet.

The waiter reads the mark from its downward API file, which the kubelet rewrites when an update
to the pod's annotations reaches it: the sync the update starts asks the volume manager for a
remount. A remount asked for while an earlier one of the same volume is still running is lost
(marking the earlier one mounted clears the request), and the file then keeps the old
annotations until the pod's next periodic sync, 60 to 90 s later with the kubelet's defaults.
Any later change to the annotations starts another sync and another remount.

So, for a sandbox it marked, the agent looks at the waiter's state in the pod's status a little
after each write of the mark; while the waiter still runs, it writes the mark again with a changed
detail (a *nudge*), a bounded number of times, each wait longer than the one before, counted per
sandbox. The waiter's state is only a hint of when to nudge (whoever may write pods/status can
write it): the worst it can cause is ``max_nudges`` writes per sandbox. The Programmed record,
not the waiter, stays the answer to "is this pod done?".

Pure: the agent passes what it knows; the answer is whether to nudge now, or when to look again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The detail's key that counts the nudges of a mark (the waiter reads no such key).
DETAIL_KEY = "refresh"


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """The first nudge ``first_after`` seconds after the mark was written, each next one ``factor``
    times as long after the previous write, at most ``max_nudges`` per sandbox (0: never)."""

    first_after: float = 2.0
    factor: float = 2.0
    max_nudges: int = 3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.first_after) and self.first_after > 0):
            raise ValueError(f"first_after must be a positive number of seconds, not {self.first_after!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"factor must be a number of at least 1, not {self.factor!r}")
        if self.max_nudges < 0:
            raise ValueError(f"max_nudges must not be negative, not {self.max_nudges!r}")

    def wait_after(self, nudges: int) -> float:
        """Seconds from the latest write of the mark to the next nudge, ``nudges`` done so far."""
        return self.first_after * self.factor**nudges


@dataclass(frozen=True, slots=True)
class Nudge:
    """Write the mark again now; this is nudge number ``number`` (from 1) of the sandbox."""

    number: int


@dataclass(frozen=True, slots=True)
class LookAgain:
    """Nothing to write yet: look again in ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Leave:
    """Nothing to do until the pod changes; ``gave_up``: the waiter still runs but every nudge
    is spent (the kubelet's periodic sync will rewrite the file)."""

    gave_up: bool = False


Step = Nudge | LookAgain | Leave


def refresh_step(*, waiter_running: bool, since_write: float, nudges: int, policy: RefreshPolicy) -> Step:
    """What to do for a sandbox whose latest mark (or nudge) the watch has brought back,
    ``since_write`` seconds after that write, with ``nudges`` done so far.

    A waiter that is not running (done, not started yet, or the status does not say) needs
    nothing: the status update that shows it running queues the pod again.
    """
    if not waiter_running:
        return Leave()
    if nudges >= policy.max_nudges:
        return Leave(gave_up=True)
    remaining = policy.wait_after(nudges) - max(0.0, since_write)
    if remaining > 0:
        return LookAgain(remaining)
    return Nudge(nudges + 1)
