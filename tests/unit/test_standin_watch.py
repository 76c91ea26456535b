"""The node stand-in's own pod watch: after a broken watch (a 410 Gone, a dropped stream) it lists
again, reports what vanished meanwhile as deleted, does not report unchanged pods twice, and
watches on from the new list."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

from lightkube import AsyncClient

from ipnc_dev.standin.watch import follow_pods

JSON = dict[str, Any]


def _pod(uid: str, version: str) -> JSON:
    return {"metadata": {"uid": uid, "name": f"pod-{uid}", "resourceVersion": version}}


class _Model:
    def __init__(self, obj: JSON) -> None:
        self.obj = obj

    def to_dict(self) -> JSON:
        return self.obj


class _Listing:
    def __init__(self, pods: list[JSON], version: str) -> None:
        self.pods, self.resourceVersion = pods, version

    async def __aiter__(self) -> AsyncIterator[_Model]:
        for pod in self.pods:
            yield _Model(pod)


class _Client:
    """Answers lists and watches from scripts; a watch script ends in an exception, or in
    waiting forever (the test then cancels)."""

    def __init__(self, lists: list[_Listing], watches: list[list[tuple[str, JSON] | Exception]]) -> None:
        self.lists: Iterator[_Listing] = iter(lists)
        self.watches = iter(watches)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def list(self, res: object, **kwargs: Any) -> _Listing:
        self.calls.append(("list", kwargs))
        return next(self.lists)

    async def watch(self, res: object, **kwargs: Any) -> AsyncIterator[tuple[str, _Model]]:
        self.calls.append(("watch", kwargs))
        for step in next(self.watches):
            if isinstance(step, Exception):
                raise step
            yield step[0], _Model(step[1])
        await asyncio.Event().wait()


async def test_a_broken_watch_lists_again_and_reports_what_vanished_as_deleted() -> None:
    client = _Client(
        lists=[
            _Listing([_pod("a", "1"), _pod("b", "1")], "10"),
            _Listing([_pod("a", "2"), _pod("c", "1")], "20"),  # b went, c came while not watching
        ],
        watches=[
            [("MODIFIED", _pod("a", "2")), RuntimeError("410: too old resource version")],
            [("DELETED", _pod("c", "1"))],
        ],
    )
    seen: list[tuple[str, str | None]] = []
    synced = asyncio.Event()

    def on_change(uid: str, obj: JSON | None) -> None:
        seen.append((uid, None if obj is None else obj["metadata"]["resourceVersion"]))

    task = asyncio.create_task(
        follow_pods(cast(AsyncClient, client), "node-1", on_change, synced, backoff_max=0.01)
    )
    try:
        for _ in range(200):
            if len(seen) >= 6:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert synced.is_set()
    assert seen == [
        ("a", "1"),
        ("b", "1"),
        ("a", "2"),  # from the first watch
        ("b", None),  # vanished while the watch was broken
        ("c", "1"),  # a is not reported again: unchanged since the watch said so
        ("c", None),  # from the second watch
    ]
    fields = {"spec.nodeName": "node-1"}
    assert client.calls == [
        ("list", {"namespace": "*", "fields": fields}),
        ("watch", {"namespace": "*", "fields": fields, "resource_version": "10"}),
        ("list", {"namespace": "*", "fields": fields}),
        ("watch", {"namespace": "*", "fields": fields, "resource_version": "20"}),
    ]
