"""The agent's writes against the real API server: the UID precondition protects a pod that
replaced another of the same name, and repeated Events become one Event with a count."""

from __future__ import annotations

import asyncio
import json

import pytest

from ipnc_dev.controlplane import ControlPlane
from istio_pod_network_controller import names
from istio_pod_network_controller.cluster.api import Api
from istio_pod_network_controller.cluster.report import EventRecorder, PodGone, PodRef, Reporter

pytestmark = pytest.mark.cluster


def test_status_patch_for_a_replaced_pod_is_refused_and_reported_as_gone(
    control_plane: ControlPlane, namespace: str
) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "same-name"},
           "spec": {"containers": [{"name": "app", "image": "app"}]}}  # fmt: skip
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod))
    live = json.loads(control_plane.kubectl("get", "pod", "same-name", "-n", namespace, "-o", "json").stdout)

    async def patch(uid: str) -> None:
        api = Api.from_kubeconfig(str(control_plane.kubeconfig_path))
        try:
            await Reporter(api, "node-x").set_status(
                PodRef(namespace, "same-name", uid), names.STATUS_INITIALIZED, {"netnsInode": 1}
            )
        finally:
            await api.close()

    with pytest.raises(PodGone):
        asyncio.run(patch("00000000-0000-0000-0000-000000000000"))  # the pod we saw was replaced
    after = json.loads(control_plane.kubectl("get", "pod", "same-name", "-n", namespace, "-o", "json").stdout)
    assert names.STATUS not in (after["metadata"].get("annotations") or {})

    asyncio.run(patch(live["metadata"]["uid"]))
    after = json.loads(control_plane.kubectl("get", "pod", "same-name", "-n", namespace, "-o", "json").stdout)
    assert after["metadata"]["annotations"][names.STATUS] == names.STATUS_INITIALIZED


def test_repeated_events_are_one_event_whose_count_says_how_often(
    control_plane: ControlPlane, namespace: str
) -> None:
    ref = PodRef(namespace, "web-0", "11111111-1111-1111-1111-111111111111")
    message = "verify: ISTIO_OUTPUT missing"

    async def record() -> EventRecorder:
        api = Api.from_kubeconfig(str(control_plane.kubeconfig_path))
        events = EventRecorder(api, "node-x")
        events.start()

        def fail() -> None:
            events.record(ref, kind="Warning", reason="ApplyFailed", message=message)

        try:
            fail()
            async with asyncio.timeout(30):  # written: the repeats below must PATCH it
                while not (await api.get(f"/api/v1/namespaces/{namespace}/events"))["items"]:
                    await asyncio.sleep(0.05)
            for _ in range(4):
                fail()
                await asyncio.sleep(0.05)
            events.record(ref, kind="Normal", reason="Initialized", message="redirect rules applied")
            await events.stop(timeout=30)
        finally:
            await api.close()
        return events

    events = asyncio.run(record())
    assert sum(events.dropped.values()) == 0, events.dropped
    listed = json.loads(control_plane.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)
    by_reason = {item["reason"]: item for item in listed["items"]}
    assert len(listed["items"]) == 2, [item["reason"] for item in listed["items"]]
    warning = by_reason["ApplyFailed"]
    assert warning["count"] == 5
    assert warning["type"] == "Warning"
    assert warning["message"] == message
    assert warning["involvedObject"]["uid"] == ref.uid
    assert warning["lastTimestamp"] >= warning["firstTimestamp"]
    assert by_reason["Initialized"]["count"] == 1
