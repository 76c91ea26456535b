"""The agent's writes against the real API server: the UID precondition protects a pod that
replaced another of the same name."""

from __future__ import annotations

import asyncio
import json

import pytest

from istio_pod_network_controller import names
from istio_pod_network_controller.cluster.api import Api
from istio_pod_network_controller.cluster.report import PodGone, PodRef, Reporter
from istio_pod_network_controller.testing.controlplane import ControlPlane

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
