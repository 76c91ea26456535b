"""What the agent writes back to the cluster: the pod's status annotations and its Events.

The bodies are built by pure functions (tested without a cluster); ``Reporter`` sends them. A
patch names the pod's UID as a precondition, so a pod deleted and recreated under the same name
is never marked with another pod's result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import names
from .api import Api, ApiError

log = logging.getLogger(__name__)

COMPONENT = "istio-pod-network-controller"
MAX_MESSAGE = 1024


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True, slots=True)
class PodRef:
    namespace: str
    name: str
    uid: str
    resource_version: str = ""

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> PodRef:
        meta = pod["metadata"]
        return cls(
            meta.get("namespace", "default"), meta["name"], meta["uid"], meta.get("resourceVersion", "")
        )

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"


def status_patch(ref: PodRef, status: str, detail: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "uid": ref.uid,  # precondition: fails with 409 if the name now belongs to another pod
            "annotations": {
                names.STATUS: status,
                names.DETAIL: json.dumps(dict(detail), sort_keys=True, separators=(",", ":")),
            },
        }
    }


def event_body(ref: PodRef, *, kind: str, reason: str, message: str, node: str) -> dict[str, Any]:
    stamp = now_rfc3339()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": ref.name,
            "namespace": ref.namespace,
            "uid": ref.uid,
            "resourceVersion": ref.resource_version,
        },
        "type": kind,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT,
        "reportingInstance": node,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def read_detail(pod: Mapping[str, Any]) -> dict[str, Any]:
    raw = (pod.get("metadata", {}).get("annotations") or {}).get(names.DETAIL)
    if not isinstance(raw, str):
        return {}
    try:
        detail = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return detail if isinstance(detail, dict) else {}


def read_status(pod: Mapping[str, Any]) -> str | None:
    value = (pod.get("metadata", {}).get("annotations") or {}).get(names.STATUS)
    return value if isinstance(value, str) else None


class PodGone(Exception):
    """The pod was deleted (404) or replaced by another of the same name (409)."""


class Reporter:
    def __init__(self, api: Api, node: str) -> None:
        self.api = api
        self.node = node

    async def set_status(self, ref: PodRef, status: str, detail: Mapping[str, Any]) -> str:
        """Patch the pod; returns the resourceVersion the patch produced."""
        try:
            patched = await self.api.merge_patch(ref.path, status_patch(ref, status, detail))
            return str(patched.get("metadata", {}).get("resourceVersion", ""))
        except ApiError as exc:
            # 404: deleted. Our UID in the patch no longer matching is a 409 or, for a merge patch,
            # a 422 on metadata.uid ("field is immutable"): the name belongs to another pod now.
            if exc.status in (404, 409) or (exc.status == 422 and "metadata.uid" in exc.message):
                raise PodGone(str(exc)) from None
            raise

    async def event(self, ref: PodRef, *, kind: str, reason: str, message: str) -> None:
        """Best effort: an Event that cannot be written is logged, never retried."""
        body = event_body(ref, kind=kind, reason=reason, message=message, node=self.node)
        try:
            await self.api.create(f"/api/v1/namespaces/{ref.namespace}/events", body)
        except ApiError as exc:
            log.warning(
                "could not write Event", extra={"pod": f"{ref.namespace}/{ref.name}", "error": str(exc)}
            )
