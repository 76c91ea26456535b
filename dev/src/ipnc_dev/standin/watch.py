"""The node stand-in's own list+watch of the pods bound to its node, on lightkube's client.

Deliberately not the agent's reflector (``cluster/reflector.py``) nor its API client's watch: the
stand-in plays the kubelet in tests of the agent, and a bug in the agent's list+watch must not act
on both sides of such a test at once. lightkube resumes a watch that the server ended from the last
resourceVersion it saw; any error (410 Gone, an ERROR event, a broken stream) makes this loop list
again, report the pods that vanished meanwhile as deleted, and watch on from the new list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from lightkube import AsyncClient
from lightkube.resources.core_v1 import Pod

log = logging.getLogger(__name__)

JSON = dict[str, Any]
OnChange = Callable[[str, JSON | None], None]  # pod UID, pod (None: deleted)


def _uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid", ""))


def _version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


async def follow_pods(
    client: AsyncClient,
    node_name: str,
    on_change: OnChange,
    synced: asyncio.Event,
    *,
    backoff_max: float = 2.0,
) -> None:
    """Report every change to the pods with ``spec.nodeName=node_name`` until cancelled; set
    ``synced`` once the first list has been reported."""
    fields: dict[str, Any] = {"spec.nodeName": node_name}
    reported: dict[str, str] = {}  # UID -> resourceVersion last handed to on_change
    failures = 0
    while True:
        try:
            listing = client.list(Pod, namespace="*", fields=fields)
            current = {}
            async for pod in listing:
                obj: JSON = pod.to_dict()
                current[_uid(obj)] = obj
            # Recorded only once handed over: a change whose handling failed is handed over again
            # by the next list.
            for uid in reported.keys() - current.keys():
                on_change(uid, None)
                del reported[uid]
            for uid, obj in current.items():
                if reported.get(uid) != _version(obj):
                    on_change(uid, obj)
                    reported[uid] = _version(obj)
            synced.set()
            failures = 0
            stream = client.watch(Pod, namespace="*", fields=fields, resource_version=listing.resourceVersion)
            async for event, pod in stream:
                obj = pod.to_dict()
                uid = _uid(obj)
                if event == "DELETED":
                    if uid in reported:
                        on_change(uid, None)
                        del reported[uid]
                elif event in ("ADDED", "MODIFIED"):
                    on_change(uid, obj)
                    reported[uid] = _version(obj)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # lightkube's ApiError (410 Gone too), httpx's errors: list again
            failures += 1
            delay = min(backoff_max, 0.05 * 2 ** min(failures, 10))
            log.warning("node stand-in %s: pod watch: %r; listing again in %.2fs", node_name, exc, delay)
            await asyncio.sleep(delay)
