"""The webhook owns the waiter, behind a real kube-apiserver: a pod author's own
`istio-pod-network-init` or podinfo volume never reaches the stored pod as written, the real
waiter the webhook stores is recognised as its own on a second call (with every default the API
server added), and on OpenShift-style namespaces the waiter gets a UID of the namespace's range
other than the proxy's.

The webhook is registered twice, so every pod is also sent to it a second time after its own
patch (what `reinvocationPolicy: IfNeeded` relies on); its log shows whether that call patched.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from lightkube import ApiError, Client
from lightkube.resources.core_v1 import Namespace, Pod
from lightkube.types import PatchType

from ipnc_dev.controlplane import ControlPlane
from ipnc_dev.webhookproc import WebhookProcess, webhook_kubeconfig
from istio_pod_network_controller import names
from istio_pod_network_controller.inject import Unchanged, WaiterSettings, is_our_volume, mutate_pod
from istio_pod_network_controller.probe import waiter_ids

pytestmark = pytest.mark.cluster

WAITER_IMAGE = "registry.example/istio-pod-network-controller:test"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
CONTAINER_RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
UID_RANGE = "openshift.io/sa.scc.uid-range"
W = names.WAITER_CONTAINER
EFFECTIVE_TIMEOUT = 20.0


def meshed_pod(namespace: str, name: str) -> dict[str, Any]:
    """A meshed pod that PodSecurity `restricted` admits (the proxy without runAsUser: the
    platform's choice, as on OpenShift)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}, "runAsNonRoot": True},
            "containers": [
                {
                    "name": n,
                    "image": "registry.example/x",
                    "securityContext": copy.deepcopy(CONTAINER_RESTRICTED),
                }
                for n in ("app", "istio-proxy")
            ],
        },
    }


def init_names(pod: dict[str, Any]) -> list[str]:
    return [c["name"] for c in pod["spec"].get("initContainers") or []]


def create(kube: Client, pod: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = kube.create(cast(Pod, Pod.from_dict(copy.deepcopy(pod)))).to_dict()
    return created


def namespace_object(kube: Client, name: str) -> dict[str, Any]:
    found: dict[str, Any] = kube.get(Namespace, name).to_dict()
    return found


def patches_for(webhook: WebhookProcess, namespace: str, name: str) -> list[str]:
    """The changes the webhook logged for this pod, one entry per call that patched it."""
    found = []
    for line in webhook.logs().splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("msg") == "pod mutated" and record.get("pod") == f"{namespace}/{name}":
            found.append(str(record.get("changes")))
    return found


Start = Callable[..., tuple[WebhookProcess, WaiterSettings]]


@pytest.fixture
def meshed_namespace(kube: Client, namespace: str) -> str:
    """`restricted` and opted in by label (so the webhook reads the namespace object)."""
    labels = {**RESTRICTED, names.OPT_IN: names.OPT_IN_VALUE}
    kube.patch(Namespace, namespace, {"metadata": {"labels": labels}}, patch_type=PatchType.MERGE)
    return namespace


@pytest.fixture
def start_webhook(
    kube: Client, control_plane: ControlPlane, meshed_namespace: str, tmp_path: Path
) -> Iterator[Start]:
    """Starts the real webhook (under the chart's RBAC) with extra flags, registered twice for the
    test's namespace; returns it with the settings those flags mean."""
    started: list[tuple[WebhookProcess, str]] = []

    def start(*extra: str, settings: WaiterSettings) -> tuple[WebhookProcess, WaiterSettings]:
        kubeconfig = webhook_kubeconfig(control_plane, f"{meshed_namespace}-ipnc", tmp_path / "kubeconfig")
        flags = [f"--waiter-image={WAITER_IMAGE}", "--waiter-verify", "--namespace-cache-seconds=1", *extra]
        process = WebhookProcess(kubeconfig, extra=flags, folder=tmp_path).start()
        config = process.configuration(
            f"ipnc-own-{meshed_namespace}", [meshed_namespace], entries=("inject", "again")
        )
        started.append((process, config["metadata"]["name"]))
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(config))
        deadline = time.monotonic() + EFFECTIVE_TIMEOUT
        for attempt in range(1000):
            probe = create(kube, meshed_pod(meshed_namespace, f"probe-{attempt}"))
            kube.delete(Pod, probe["metadata"]["name"], namespace=meshed_namespace, grace_period=0)
            if W in init_names(probe):
                break
            assert time.monotonic() < deadline, "the MutatingWebhookConfiguration never took effect"
            time.sleep(0.2)
        return process, settings

    try:
        yield start
    finally:
        for process, name in started:
            control_plane.kubectl("delete", "mutatingwebhookconfiguration", name, check=False)
            process.stop()


DEFAULT = WaiterSettings(image=WAITER_IMAGE, verify=True)


def test_a_pod_supplied_waiter_and_podinfo_volume_never_reach_the_pod(
    kube: Client, start_webhook: Start, meshed_namespace: str
) -> None:
    webhook, settings = start_webhook(settings=DEFAULT)
    pod = meshed_pod(meshed_namespace, "impostor")
    pod["spec"]["initContainers"] = [
        {
            "name": "setup",
            "image": "registry.example/setup",
            "securityContext": copy.deepcopy(CONTAINER_RESTRICTED),
        },
        {  # passes at once, whatever the agent did
            "name": W,
            "image": "registry.example/always-pass",
            "command": ["/bin/true"],
            "securityContext": copy.deepcopy(CONTAINER_RESTRICTED),
            "volumeMounts": [{"name": names.PODINFO_VOLUME, "mountPath": names.PODINFO_PATH}],
        },
    ]
    pod["spec"]["volumes"] = [{"name": names.PODINFO_VOLUME, "emptyDir": {}}]  # a file the pod could write

    created = create(kube, pod)
    assert init_names(created) == [W, "setup"]
    waiter = created["spec"]["initContainers"][0]
    assert waiter["image"] == WAITER_IMAGE
    assert "command" not in waiter
    assert waiter["args"] == ["init", "--file", names.ANNOTATIONS_FILE, "--verify"]
    assert waiter["volumeMounts"] == [
        {"name": names.PODINFO_VOLUME, "mountPath": names.PODINFO_PATH, "readOnly": True}
    ]
    assert waiter_ids(created) == (65532, 65532)
    podinfo = [v for v in created["spec"]["volumes"] if v["name"] == names.PODINFO_VOLUME]
    assert len(podinfo) == 1 and "emptyDir" not in podinfo[0] and is_our_volume(podinfo[0]), podinfo

    # The stored pod, with every default the API server added, is the webhook's own: the second
    # registration did not patch it, and the same pod sent again would not be.
    assert len(patches_for(webhook, meshed_namespace, "impostor")) == 1, webhook.logs()[-3000:]
    assert (
        "replaced an istio-pod-network-init that was not ours"
        in patches_for(webhook, meshed_namespace, "impostor")[0]
    )
    again = mutate_pod(created, namespace_object(kube, meshed_namespace), settings)
    assert isinstance(again, Unchanged), again


def test_an_ordinary_pod_is_patched_once_and_recognised_again(
    kube: Client, start_webhook: Start, meshed_namespace: str
) -> None:
    webhook, settings = start_webhook(settings=DEFAULT)
    created = create(kube, meshed_pod(meshed_namespace, "plain"))
    assert init_names(created) == [W]
    assert len(patches_for(webhook, meshed_namespace, "plain")) == 1, webhook.logs()[-3000:]
    again = mutate_pod(created, namespace_object(kube, meshed_namespace), settings)
    assert isinstance(again, Unchanged), again


def test_an_application_container_named_like_the_waiter_is_refused(
    kube: Client, start_webhook: Start, meshed_namespace: str
) -> None:
    start_webhook(settings=DEFAULT)
    pod = meshed_pod(meshed_namespace, "named-like-it")
    pod["spec"]["containers"][0]["name"] = W
    with pytest.raises(ApiError) as denied:
        create(kube, pod)
    message = denied.value.status.message or ""
    assert 'admission webhook "inject.pod-network-controller.istio.io" denied the request' in message
    assert f"the container name {W} is reserved" in message


def test_with_run_as_user_none_an_openshift_namespace_gives_the_waiter_a_uid_of_its_range(
    kube: Client, start_webhook: Start, meshed_namespace: str
) -> None:
    # The platform would give the proxy (no runAsUser) the range's first UID.
    kube.patch(Namespace, meshed_namespace, {"metadata": {"annotations": {UID_RANGE: "1000620000/10000"}}},
               patch_type=PatchType.MERGE)  # fmt: skip
    webhook, settings = start_webhook(
        "--waiter-run-as-user=none",
        settings=WaiterSettings(image=WAITER_IMAGE, verify=True, run_as_user=None),
    )
    created = create(kube, meshed_pod(meshed_namespace, "on-openshift"))
    assert init_names(created) == [W]
    assert waiter_ids(created) == (1000620001, 1000620001), (created["spec"], webhook.logs()[-3000:])
    assert len(patches_for(webhook, meshed_namespace, "on-openshift")) == 1, webhook.logs()[-3000:]
    again = mutate_pod(created, namespace_object(kube, meshed_namespace), settings)
    assert isinstance(again, Unchanged), again

    kube.patch(Namespace, meshed_namespace, {"metadata": {"annotations": {UID_RANGE: "1000620000/1"}}},
               patch_type=PatchType.MERGE)  # fmt: skip
    time.sleep(1.2)  # the webhook's namespace cache holds a read for one second here
    with pytest.raises(ApiError) as denied:
        create(kube, meshed_pod(meshed_namespace, "no-room"))
    assert "has no UID besides its first and the proxy's" in (denied.value.status.message or "")
