"""The API behaviour the agent, the waiter and the webhook rely on, checked against the real
kube-apiserver of the test control plane (issue 4, acceptance points 1, 2 and 4), and the
harness's own promises: a clear failure with both logs, and nothing left behind."""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import os
import time
from collections.abc import AsyncIterable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from lightkube import ApiError, AsyncClient, Client, KubeConfig
from lightkube.models.core_v1 import Container, EventSource, ObjectReference, PodSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.models.rbac_v1 import PolicyRule, RoleRef, Subject
from lightkube.resources.core_v1 import ConfigMap, Event, Namespace, Pod
from lightkube.resources.events_v1 import Event as EventsV1Event
from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding
from lightkube.types import PatchType

from ipnc_dev.controlplane import ControlPlane, ControlPlaneError

pytestmark = pytest.mark.cluster

WATCH_TIMEOUT = 15.0


def _meta(obj: Any) -> ObjectMeta:
    meta = obj.metadata
    assert isinstance(meta, ObjectMeta)
    return meta


def _spec(pod: Pod) -> PodSpec:
    assert pod.spec is not None
    return pod.spec


def _annotations(obj: Any) -> dict[str, str]:
    return dict(_meta(obj).annotations or {})


def _pod(name: str, namespace: str, node: str) -> Pod:
    return Pod(
        metadata=ObjectMeta(name=name, namespace=namespace),
        spec=PodSpec(nodeName=node, containers=[Container(name="app", image="example.invalid/app:1")]),
    )


async def _watch_until(
    client: AsyncClient,
    namespace: str,
    node: str,
    resource_version: str,
    done: Callable[[list[tuple[str, Pod]]], bool],
) -> list[tuple[str, Pod]]:
    """Collect the events of a node-scoped pod watch from ``resource_version`` until ``done``."""
    seen: list[tuple[str, Pod]] = []
    stream: AsyncIterable[tuple[str, Pod]] = client.watch(
        Pod, namespace=namespace, fields={"spec.nodeName": node}, resource_version=resource_version
    )
    async with asyncio.timeout(WATCH_TIMEOUT):
        async for kind, pod in stream:
            seen.append((kind, pod))
            if done(seen):
                break
    return seen


async def test_node_scoped_watch_sees_only_its_pods_and_merge_patches(
    control_plane: ControlPlane, kube: Client, namespace: str
) -> None:
    kube.create(_pod("a-on-1", namespace, "node-1"))
    kube.create(_pod("b-on-2", namespace, "node-2"))

    listed = kube.list(Pod, namespace=namespace, fields={"spec.nodeName": "node-1"})
    assert [_meta(p).name for p in listed] == ["a-on-1"]
    rv = listed.resourceVersion

    async with AsyncClient(control_plane.admin_client_config, trust_env=False) as aclient:
        watch = asyncio.create_task(
            _watch_until(
                aclient,
                namespace,
                "node-1",
                rv,
                lambda seen: any(
                    k == "MODIFIED" and _annotations(p).get("ipnc.test/mark") == "c" for k, p in seen
                ),
            )
        )
        await asyncio.sleep(0.2)  # the watch need not be connected: it resumes from rv anyway
        kube.create(_pod("c-on-1", namespace, "node-1"))
        kube.create(_pod("d-on-2", namespace, "node-2"))
        for name in ("b-on-2", "a-on-1", "d-on-2", "c-on-1"):
            kube.patch(
                Pod,
                name,
                {"metadata": {"annotations": {"ipnc.test/mark": name[0]}}},
                namespace=namespace,
                patch_type=PatchType.MERGE,
            )
        seen = await watch

    events = [(kind, _meta(pod).name, _annotations(pod).get("ipnc.test/mark")) for kind, pod in seen]
    assert {name for _, name, _ in events} <= {"a-on-1", "c-on-1"}, events
    assert ("ADDED", "c-on-1", None) in events
    assert ("MODIFIED", "a-on-1", "a") in events
    assert ("MODIFIED", "c-on-1", "c") in events
    # The patch kept what it did not name.
    assert _spec(kube.get(Pod, "a-on-1", namespace=namespace)).nodeName == "node-1"


def test_merge_patch_null_removes_an_annotation(kube: Client, namespace: str) -> None:
    pod = _pod("p", namespace, "node-1")
    _meta(pod).annotations = {"keep": "1", "drop": "2"}
    kube.create(pod)
    kube.patch(
        Pod,
        "p",
        {"metadata": {"annotations": {"drop": None}}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    assert _annotations(kube.get(Pod, "p", namespace=namespace)) == {"keep": "1"}


def test_event_is_created_and_listed(kube: Client, namespace: str) -> None:
    pod = kube.create(_pod("evented", namespace, "node-1"))
    ref = ObjectReference(
        kind="Pod", namespace=namespace, name="evented", uid=_meta(pod).uid, apiVersion="v1"
    )
    # The classic core/v1 Event, as client-go's record.EventRecorder writes it.
    kube.create(
        Event(
            metadata=ObjectMeta(name=f"evented.{time.time_ns():x}", namespace=namespace),
            involvedObject=ref,
            reason="Initialized",
            message="redirect rules in place",
            type="Normal",
            source=EventSource(component="istio-pod-network-controller", host="node-1"),
        )
    )
    # The events.k8s.io/v1 Event, as client-go's newer events.EventRecorder writes it.
    kube.create(
        EventsV1Event(
            metadata=ObjectMeta(name=f"evented.{time.time_ns():x}", namespace=namespace),
            eventTime=datetime.datetime.now(datetime.UTC),
            regarding=ref,
            reason="Failed",
            note="netns not found",
            action="Initialize",
            type="Warning",
            reportingController="istio-pod-network-controller",
            reportingInstance="node-1",
        )
    )
    listed = kube.list(Event, namespace=namespace, fields={"involvedObject.name": "evented"})
    assert sorted((e.type, e.reason, e.message) for e in listed) == [
        ("Normal", "Initialized", "redirect rules in place"),
        ("Warning", "Failed", "netns not found"),
    ]
    assert kube.list(
        Event, namespace=namespace, fields={"involvedObject.name": "other"}
    ).__class__  # lazily empty
    assert list(kube.list(Event, namespace=namespace, fields={"involvedObject.name": "other"})) == []
    # Reading events.k8s.io/v1 through lightkube needs eventTime on every listed Event (its
    # decoder rejects the null eventTime of core/v1-written ones), so list the new-style one only.
    listed_v1 = kube.list(
        EventsV1Event, namespace=namespace, fields={"reportingController": "istio-pod-network-controller"}
    )
    assert [(e.reason, e.note) for e in listed_v1] == [("Failed", "netns not found")]


def _sa_client(control_plane: ControlPlane, namespace: str, name: str) -> Client:
    path = control_plane.write_service_account_kubeconfig(namespace, name)
    return control_plane.client(KubeConfig.from_file(path))


def test_service_account_token_needs_rbac_to_patch_pods(
    control_plane: ControlPlane, kube: Client, namespace: str
) -> None:
    kube.create(_pod("target", namespace, "node-1"))
    patch = {"metadata": {"annotations": {"pod-network-controller.istio.io/status": "initialized"}}}

    with _sa_client(control_plane, namespace, "agent") as sa:
        with pytest.raises(ApiError) as denied:
            sa.patch(Pod, "target", patch, namespace=namespace, patch_type=PatchType.MERGE)
        assert denied.value.status.code == 403
        assert f"system:serviceaccount:{namespace}:agent" in (denied.value.status.message or "")

        kube.create(
            Role(
                metadata=ObjectMeta(name="pod-patcher", namespace=namespace),
                rules=[PolicyRule(apiGroups=[""], resources=["pods"], verbs=["get", "patch"])],
            )
        )
        kube.create(
            RoleBinding(
                metadata=ObjectMeta(name="agent-pod-patcher", namespace=namespace),
                roleRef=RoleRef(apiGroup="rbac.authorization.k8s.io", kind="Role", name="pod-patcher"),
                subjects=[Subject(kind="ServiceAccount", name="agent", namespace=namespace)],
            )
        )
        # RBAC is served from the API server's informer cache: allow a moment for it to catch up.
        deadline = time.monotonic() + 10
        while True:
            try:
                sa.patch(Pod, "target", patch, namespace=namespace, patch_type=PatchType.MERGE)
                break
            except ApiError as e:
                if e.status.code != 403 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        # Granted only what the Role says: listing pods is still denied.
        with pytest.raises(ApiError) as still_denied:
            list(sa.list(Pod, namespace=namespace))
        assert still_denied.value.status.code == 403

    annotations = _annotations(kube.get(Pod, "target", namespace=namespace))
    assert annotations == {"pod-network-controller.istio.io/status": "initialized"}


def test_server_side_dry_run_apply(control_plane: ControlPlane, kube: Client, namespace: str) -> None:
    manifest = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "dry", "namespace": namespace},
            "data": {"k": "v"},
        }
    )
    out = control_plane.kubectl(
        "apply", "--server-side", "--dry-run=server", "-o", "json", "-f", "-", input=manifest
    )
    applied = json.loads(out.stdout)
    assert applied["data"] == {"k": "v"}
    with pytest.raises(ApiError) as missing:
        kube.get(ConfigMap, "dry", namespace=namespace)
    assert missing.value.status.code == 404

    # A dry run still goes through validation and admission: an invalid object is refused.
    bad = manifest.replace("name: dry", "name: Not_A_Valid_Name")
    refused = control_plane.kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", "-", input=bad, check=False
    )
    assert refused.returncode != 0
    assert "Invalid value" in refused.stderr

    # The same through lightkube, which the agent uses.
    cm = ConfigMap(metadata=ObjectMeta(name="dry2", namespace=namespace), data={"a": "b"})
    result = kube.apply(cm, field_manager="ipnc-test", dry_run=True)
    assert result.data == {"a": "b"}
    assert [(f.manager, f.operation) for f in _meta(result).managedFields or []] == [("ipnc-test", "Apply")]
    with pytest.raises(ApiError):
        kube.get(ConfigMap, "dry2", namespace=namespace)


# --- PodSecurity (acceptance point 2) --------------------------------------------------------


def _hello_pod(shared_dir: Path, namespace: str) -> dict[str, Any]:
    """The pod template of Istio's injected hello Deployment, with the application side made
    compliant with the `restricted` Pod Security level."""
    docs = [
        d for d in yaml.safe_load_all((shared_dir / "istio/injected/hello.yaml.injected").read_text()) if d
    ]
    template = copy.deepcopy(docs[0]["spec"]["template"])
    spec = template["spec"]
    spec.setdefault("securityContext", {})["seccompProfile"] = {"type": "RuntimeDefault"}
    for container in spec["containers"]:
        container["securityContext"] = {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
    spec["nodeName"] = "node-1"
    # What the ServiceAccount admission plugin would set (it is off: no controller-manager makes
    # the `default` ServiceAccount); the projected istio-token volume requires it.
    spec["serviceAccountName"] = "default"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": "hello", "namespace": namespace},
        "spec": spec,
    }


@pytest.fixture
def restricted_namespace(kube: Client, namespace: str) -> str:
    kube.patch(
        Namespace,
        namespace,
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
        patch_type=PatchType.MERGE,
    )
    return namespace


def test_pod_security_restricted_rejects_istio_init(
    kube: Client, shared_dir: Path, restricted_namespace: str
) -> None:
    pod = _hello_pod(shared_dir, restricted_namespace)
    assert "istio-init" in [c["name"] for c in pod["spec"]["initContainers"]]
    with pytest.raises(ApiError) as rejected:
        kube.create(cast(Pod, Pod.from_dict(pod)))
    message = rejected.value.status.message or ""
    assert rejected.value.status.code == 403, message
    assert 'violates PodSecurity "restricted:latest"' in message
    assert (
        'container "istio-init" must not include "NET_ADMIN", "NET_RAW" in securityContext.capabilities.add'
        in (message)
    )
    # Only istio-init is at fault: no other container is named.
    for other in ("hello", "istio-proxy"):
        assert f'container "{other}"' not in message, message


def test_pod_security_restricted_admits_the_pod_without_istio_init(
    kube: Client, shared_dir: Path, restricted_namespace: str
) -> None:
    pod = _hello_pod(shared_dir, restricted_namespace)
    pod["spec"]["initContainers"] = [c for c in pod["spec"]["initContainers"] if c["name"] != "istio-init"]
    created = kube.create(cast(Pod, Pod.from_dict(pod)))
    assert _meta(created).name == "hello"
    assert [c.name for c in _spec(created).initContainers or []] == ["istio-proxy"]


# --- the harness itself (acceptance point 4, teardown, failures) ------------------------------


def test_ready_time_is_recorded(control_plane: ControlPlane) -> None:
    assert 0 < control_plane.ready_seconds < 60
    assert control_plane.timings["etcd"] <= control_plane.ready_seconds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes, but Popen.wait() reaps ours, so there should be none.
    return True


def test_teardown_leaves_no_process_or_folder(tmp_path: Path) -> None:
    lines: list[str] = []
    with ControlPlane.start(workdir_parent=tmp_path, log=lines.append) as cp:
        pids, workdir = cp.pids, cp.workdir
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        with cp.client() as client:
            assert _meta(client.get(Namespace, "default")).name == "default"
    assert not any(_alive(p) for p in pids)
    assert not workdir.exists()
    assert list(tmp_path.iterdir()) == []
    assert lines and lines[0].startswith("control plane ready in ")


def test_failed_start_shows_both_logs_and_cleans_up(tmp_path: Path) -> None:
    with pytest.raises(ControlPlaneError) as failed:
        ControlPlane.start(
            workdir_parent=tmp_path, extra_apiserver_args=["--no-such-flag=1"], log=lambda _: None
        )
    message = str(failed.value)
    assert "kube-apiserver exited with status" in message
    assert "last lines of etcd's log" in message
    assert "last lines of kube-apiserver's log" in message
    assert "no-such-flag" in message
    assert list(tmp_path.iterdir()) == []
