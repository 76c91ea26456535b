"""List, then watch, one kind of object into a local store, forever: the agent's eyes.

Level-triggered: consumers get the key of what changed and read the store, never the event.
Continuity is kept with resourceVersions (bookmarks keep ours fresh on quiet streams); a 410
Gone or an ERROR event means our version is too old, so we list again and report objects that
vanished in between as deleted. A broken or silent stream reconnects with capped exponential
backoff from the last version seen. Nothing here survives a restart, and nothing needs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .api import JSON, Api, ApiError, Gone

log = logging.getLogger(__name__)

KeyFn = Callable[[Mapping[str, Any]], str]
OnChange = Callable[[str, JSON | None], None]  # key, object (None: deleted)


def uid_key(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["uid"])


def name_key(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["name"])


@dataclass
class Reflector:
    api: Api
    path: str  # collection path, e.g. /api/v1/pods
    kind: str  # for logs and metrics
    key: KeyFn
    on_change: OnChange
    field_selector: str | None = None
    page_size: int = 500
    watch_timeout_s: int = 300  # server closes the watch after this; we reconnect
    idle_timeout_s: float = 330.0  # no byte for this long (bookmarks come every minute): reconnect
    backoff_max_s: float = 30.0
    on_restart: Callable[[str], None] = lambda reason: None
    store: dict[str, JSON] = field(default_factory=dict)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    resource_version: str = ""

    def _params(self) -> dict[str, str]:
        return {"fieldSelector": self.field_selector} if self.field_selector else {}

    async def list(self) -> None:
        """Full list (paged); replaces the store and reports every difference."""
        items: list[JSON] = []
        params = {**self._params(), "limit": str(self.page_size)}
        while True:
            body = await self.api.get(self.path, params)
            items += body.get("items") or []
            cont = body.get("metadata", {}).get("continue")
            if not cont:
                break
            params["continue"] = cont
        self.resource_version = str(body.get("metadata", {}).get("resourceVersion", ""))
        fresh = {self.key(item): item for item in items}
        gone = [key for key in self.store if key not in fresh]
        self.store = fresh
        for key in gone:
            self.on_change(key, None)
        for key, item in fresh.items():
            self.on_change(key, item)
        self.synced.set()
        log.info(
            "listed %s", self.kind, extra={"count": len(fresh), "resourceVersion": self.resource_version}
        )

    async def run(self) -> None:
        """List then watch until cancelled."""
        failures = 0
        must_list = True
        while True:
            try:
                if must_list:
                    await self.list()
                    must_list = False
                await self._watch_once()
                failures = 0  # a clean server-side timeout: reconnect at once
            except asyncio.CancelledError:
                raise
            except Gone as exc:
                log.info("%s watch expired, listing again", self.kind, extra={"reason": exc.message})
                self.on_restart("gone")
                must_list = True
            except Exception as exc:  # any failure of one attempt: log, back off, go on watching
                failures += 1
                delay = min(self.backoff_max_s, 0.2 * 2 ** min(failures, 8)) * (0.5 + random.random() / 2)
                log.warning(
                    "%s watch broken, reconnecting",
                    self.kind,
                    extra={"error": str(exc), "retryIn": round(delay, 2)},
                )
                self.on_restart("error")
                await asyncio.sleep(delay)

    async def _watch_once(self) -> None:
        params = {
            **self._params(),
            "watch": "1",
            "allowWatchBookmarks": "true",
            "resourceVersion": self.resource_version,
            "timeoutSeconds": str(self.watch_timeout_s),
        }
        async for event in self.api.watch(self.path, params, idle_timeout=self.idle_timeout_s):
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone(410, str(obj.get("message", "")))
                raise ApiError(int(obj.get("code") or 0), str(obj.get("message", "watch error")))
            version = obj.get("metadata", {}).get("resourceVersion")
            if version:
                self.resource_version = str(version)
            if kind == "BOOKMARK":
                continue
            key = self.key(obj)
            if kind == "DELETED":
                self.store.pop(key, None)
                self.on_change(key, None)
            elif kind in ("ADDED", "MODIFIED"):
                self.store[key] = obj
                self.on_change(key, obj)


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
