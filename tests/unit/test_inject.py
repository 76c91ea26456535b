"""The webhook's mutation as a pure function: Istio's real injected pods in, JSON patches out.

Patches are applied with a small RFC 6902 applier below (add/remove, as the webhook emits them);
the cluster tests apply them with the real API server.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from istio_pod_network_controller import names
from istio_pod_network_controller.decide import decide, scope_problem
from istio_pod_network_controller.inject import (
    DEFAULT_WAITER_UID,
    Denied,
    Patch,
    Unchanged,
    WaiterSettings,
    mutate_pod,
    podinfo_volume,
    waiter_container,
)
from istio_pod_network_controller.probe import waiter_ids
from istio_pod_network_controller.spec import spec_from_pod
from istio_pod_network_controller.spec.manifest import load_pod

SETTINGS = WaiterSettings(image="registry.example/ipnc:1.0")
OPT_IN = {names.OPT_IN: "true"}
WITH_ISTIO_INIT = [
    "hello.yaml.injected",
    "hello-tproxy.yaml.injected",
    "native-sidecar.yaml.injected",
    "traffic-annotations.yaml.injected",
    "traffic-annotations-empty-includes.yaml.injected",
    "traffic-annotations-wildcards.yaml.injected",
    "traffic-params.yaml.injected",
]


# -- a minimal RFC 6902 applier ----------------------------------------------------------------------


def _tokens(path: str) -> list[str]:
    assert path.startswith("/")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def apply_patch(doc: dict[str, Any], ops: Any) -> dict[str, Any]:
    result = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _tokens(op["path"])
        target: Any = result
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        if op["op"] == "add":
            if isinstance(target, list):
                target.insert(len(target) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                target[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del target[int(last) if isinstance(target, list) else last]
        else:
            raise AssertionError(f"unexpected op {op['op']}")
    return result


# -- helpers -------------------------------------------------------------------------------------------


def injected(name: str, injected_dir: Path, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    pod = load_pod(str(injected_dir / name))
    pod["metadata"].setdefault("namespace", "shop")
    pod["metadata"].setdefault("annotations", {}).update(OPT_IN if annotations is None else annotations)
    return pod


def patched(pod: dict[str, Any], settings: WaiterSettings = SETTINGS) -> dict[str, Any]:
    mutation = mutate_pod(pod, None, settings)
    assert isinstance(mutation, Patch), mutation
    return apply_patch(pod, mutation.ops)


def init_names(pod: dict[str, Any]) -> list[str]:
    inits = pod["spec"].get("initContainers")
    return [c.get("name") for c in inits if isinstance(c, dict)] if isinstance(inits, list) else []


def capabilities_added(pod: dict[str, Any]) -> list[str]:
    found = []
    for key in ("initContainers", "containers"):
        for c in pod["spec"].get(key) or []:
            found += ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
    return found


# -- istio-init becomes the waiter ---------------------------------------------------------------------


@pytest.mark.parametrize("name", WITH_ISTIO_INIT)
def test_istio_init_is_replaced_by_the_waiter_with_the_same_spec(name: str, injected_dir: Path) -> None:
    pod = injected(name, injected_dir)
    istio_init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    after = patched(pod)
    assert init_names(after)[0] == names.WAITER_CONTAINER
    assert init_names(after)[1:] == [n for n in init_names(pod) if n != "istio-init"]
    if spec_from_pod(pod).mode.value == "REDIRECT":  # Istio's TPROXY proxy itself holds NET_ADMIN
        assert capabilities_added(after) == []
    assert json.loads(after["metadata"]["annotations"][names.IPTABLES_ARGS]) == istio_init["args"]
    assert spec_from_pod(after) == spec_from_pod(pod)  # the agent applies what istio-init would have


def test_the_native_sidecar_proxy_starts_after_the_waiter(injected_dir: Path) -> None:
    pod = injected("native-sidecar.yaml.injected", injected_dir)
    after = patched(pod)
    assert init_names(pod)[:2] == ["istio-init", "istio-proxy"]
    assert init_names(after)[:2] == [names.WAITER_CONTAINER, "istio-proxy"]


def test_the_waiter_is_restricted_and_reads_the_downward_api_volume(injected_dir: Path) -> None:
    after = patched(injected("hello.yaml.injected", injected_dir))
    waiter = after["spec"]["initContainers"][0]
    assert waiter["image"] == SETTINGS.image
    assert waiter["args"] == ["init", "--file", "/etc/podinfo/annotations"]
    assert waiter["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": DEFAULT_WAITER_UID,
        "runAsGroup": DEFAULT_WAITER_UID,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert waiter["volumeMounts"] == [
        {"name": names.PODINFO_VOLUME, "mountPath": names.PODINFO_PATH, "readOnly": True}
    ]
    assert waiter["terminationMessagePolicy"] == "FallbackToLogsOnError"
    volume = next(v for v in after["spec"]["volumes"] if v["name"] == names.PODINFO_VOLUME)
    assert volume["downwardAPI"]["items"] == [
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
    ]


def test_waiter_settings_become_its_arguments() -> None:
    pod = minimal_pod()
    settings = WaiterSettings(image="i", timeout=45, verify=True, image_pull_policy="IfNotPresent")
    waiter = patched(pod, settings)["spec"]["initContainers"][0]
    assert waiter["args"] == ["init", "--file", "/etc/podinfo/annotations", "--timeout", "45", "--verify"]
    assert waiter["imagePullPolicy"] == "IfNotPresent"


def test_the_waiter_never_runs_as_the_proxy() -> None:
    pod = minimal_pod(istio_init_args=["istio-iptables", "-u", "65532", "-g", "65533"])
    waiter = patched(pod)["spec"]["initContainers"][0]
    assert waiter["securityContext"]["runAsUser"] == 65534


def test_without_a_uid_range_none_leaves_the_ids_to_the_platform() -> None:
    waiter = patched(minimal_pod(), WaiterSettings(image="i", run_as_user=None))["spec"]["initContainers"][0]
    assert "runAsUser" not in waiter["securityContext"]
    assert "runAsGroup" not in waiter["securityContext"]
    assert waiter["securityContext"]["runAsNonRoot"] is True


def test_istio_init_environment_is_kept_as_explicit_flags() -> None:
    pod = minimal_pod(istio_init_args=["istio-iptables", "-p", "15001"])
    pod["spec"]["initContainers"][0]["env"] = [
        {"name": "ISTIO_META_DNS_CAPTURE", "value": "true"},
        {"name": "INVALID_DROP", "value": "true"},
    ]
    after = patched(pod)
    kept = json.loads(after["metadata"]["annotations"][names.IPTABLES_ARGS])
    assert kept == ["istio-iptables", "-p", "15001", "--redirect-dns=true", "--drop-invalid=true"]
    spec = spec_from_pod(after)
    assert spec == spec_from_pod(pod)
    assert spec.redirect_dns and spec.drop_invalid


def test_a_flag_given_in_args_wins_over_the_environment() -> None:
    pod = minimal_pod(istio_init_args=["istio-iptables", "--redirect-dns=false"])
    pod["spec"]["initContainers"][0]["env"] = [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}]
    after = patched(pod)
    assert json.loads(after["metadata"]["annotations"][names.IPTABLES_ARGS]) == [
        "istio-iptables",
        "--redirect-dns=false",
    ]
    assert not spec_from_pod(after).redirect_dns


def test_a_stale_args_annotation_is_replaced_by_istio_inits_args() -> None:
    pod = minimal_pod(istio_init_args=["istio-iptables", "-p", "15001"])
    pod["metadata"]["annotations"][names.IPTABLES_ARGS] = '["-p", "9999"]'
    after = patched(pod)
    assert json.loads(after["metadata"]["annotations"][names.IPTABLES_ARGS]) == [
        "istio-iptables",
        "-p",
        "15001",
    ]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["istio-iptables", "-p", "99999"], "'99999'"),
        (["istio-iptables", "-i", "10.0.0.0/33"], "-i"),
        (["istio-iptables", "--no-such-flag"], "--no-such-flag"),
        (["istio-iptables", "-m", "MAGIC"], "MAGIC"),
    ],
)
def test_invalid_istio_init_args_are_denied_naming_the_flag_and_value(args: list[str], named: str) -> None:
    mutation = mutate_pod(minimal_pod(istio_init_args=args), None, SETTINGS)
    assert isinstance(mutation, Denied)
    assert named in mutation.message
    assert mutation.message.startswith(f"{names.WAITER_CONTAINER} cannot replace istio-init: istio-init args")
    assert "\n" not in mutation.message


def test_a_bad_dns_capture_environment_is_denied() -> None:
    pod = minimal_pod(istio_init_args=["istio-iptables"])
    pod["spec"]["initContainers"][0]["env"] = [{"name": "ISTIO_META_DNS_CAPTURE", "value": "maybe"}]
    mutation = mutate_pod(pod, None, SETTINGS)
    assert isinstance(mutation, Denied)
    assert "ISTIO_META_DNS_CAPTURE" in mutation.message


# -- CNI-mode pods: only the waiter is added ---------------------------------------------------------


def test_cni_mode_pod_gets_the_waiter_before_istio_validation(injected_dir: Path) -> None:
    pod = injected("hello.yaml.cni.injected", injected_dir)
    after = patched(pod)
    assert init_names(after) == [names.WAITER_CONTAINER, *init_names(pod)]
    assert names.IPTABLES_ARGS not in after["metadata"]["annotations"]


def test_bad_traffic_annotations_are_admitted_for_the_agent_to_report(injected_dir: Path) -> None:
    pod = injected("hello.yaml.cni.injected", injected_dir)
    pod["metadata"]["annotations"]["traffic.sidecar.istio.io/includeInboundPorts"] = "http"
    after = patched(pod)
    assert init_names(after)[0] == names.WAITER_CONTAINER


# -- idempotency -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*WITH_ISTIO_INIT, "hello.yaml.cni.injected"])
def test_a_second_call_changes_nothing(name: str, injected_dir: Path) -> None:
    after = patched(injected(name, injected_dir))
    assert mutate_pod(after, None, SETTINGS) == Unchanged(f"already has {names.WAITER_CONTAINER}")


def test_an_istio_init_added_again_after_us_is_removed_without_a_second_waiter(injected_dir: Path) -> None:
    pod = injected("hello.yaml.injected", injected_dir)
    istio_init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    after = patched(pod)
    after["spec"]["initContainers"].append(istio_init)  # another injector ran after us
    again = patched(after)
    assert init_names(again) == init_names(patched(pod))
    assert [v["name"] for v in again["spec"]["volumes"]].count(names.PODINFO_VOLUME) == 1


def test_a_missing_volume_is_added_to_a_pod_that_has_the_waiter() -> None:
    after = patched(minimal_pod())
    after["spec"]["volumes"] = []
    again = patched(after)
    assert init_names(again) == [names.WAITER_CONTAINER]
    assert [v["name"] for v in again["spec"]["volumes"]] == [names.PODINFO_VOLUME]


# -- pods left alone -----------------------------------------------------------------------------------


def test_a_pod_not_opted_in_is_unchanged(injected_dir: Path) -> None:
    pod = injected("hello.yaml.injected", injected_dir, annotations={})
    assert mutate_pod(pod, None, SETTINGS) == Unchanged("not opted in")


def test_a_namespace_opt_in_counts(injected_dir: Path) -> None:
    pod = injected("hello.yaml.injected", injected_dir, annotations={})
    namespace = {"metadata": {"name": "shop", "labels": OPT_IN}}
    assert isinstance(mutate_pod(pod, namespace, SETTINGS), Patch)


def test_host_network_and_excluded_namespaces_are_unchanged(injected_dir: Path) -> None:
    host = injected("hello-host-network.yaml.injected", injected_dir)
    assert mutate_pod(host, None, SETTINGS) == Unchanged(scope_problem(host) or "")
    pod = injected("hello.yaml.injected", injected_dir)
    pod["metadata"]["namespace"] = "kube-system"
    assert isinstance(mutate_pod(pod, None, SETTINGS), Unchanged)


def test_a_pod_with_only_istios_status_annotation_is_not_given_a_waiter_that_would_wait_forever() -> None:
    pod = {"metadata": {"namespace": "shop", "annotations": {**OPT_IN, names.SIDECAR_STATUS: "{}"}},
           "spec": {"containers": [{"name": "app"}]}}  # fmt: skip
    mutation = mutate_pod(pod, None, SETTINGS)
    assert isinstance(mutation, Unchanged)
    assert "no Istio sidecar" in mutation.reason


# -- patch shapes --------------------------------------------------------------------------------------


def minimal_pod(istio_init_args: list[str] | None = None) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"name": "p", "namespace": "shop", "annotations": dict(OPT_IN)},
        "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]},
    }
    if istio_init_args is not None:
        pod["spec"]["initContainers"] = [{"name": "istio-init", "args": istio_init_args}]
    return pod


def test_a_pod_without_init_containers_volumes_or_annotations_gets_whole_lists() -> None:
    pod = minimal_pod()
    del pod["metadata"]["annotations"]
    mutation = mutate_pod(pod, {"metadata": {"name": "shop", "labels": OPT_IN}}, SETTINGS)
    assert isinstance(mutation, Patch)
    assert [(op["op"], op["path"]) for op in mutation.ops] == [
        ("add", "/spec/initContainers"),
        ("add", "/spec/volumes"),
    ]


def test_the_annotation_key_is_escaped_in_the_json_pointer() -> None:
    mutation = mutate_pod(minimal_pod(istio_init_args=["istio-iptables"]), None, SETTINGS)
    assert isinstance(mutation, Patch)
    assert mutation.ops[0]["path"] == "/metadata/annotations/pod-network-controller.istio.io~1iptables-args"


def test_a_pod_whose_only_init_container_was_istio_init_ends_with_just_the_waiter() -> None:
    after = patched(minimal_pod(istio_init_args=["istio-iptables", "-p", "15001"]))
    assert init_names(after) == [names.WAITER_CONTAINER]


# -- hostile pods --------------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
_ARGS = st.lists(st.sampled_from(["istio-iptables", "-p", "15001", "-u", "x", "--ipv6"]))
_CONTAINER = st.fixed_dictionaries(
    {"name": st.sampled_from(["istio-init", "istio-proxy", "app", names.WAITER_CONTAINER])},
    optional={"args": _ARGS | _JSON, "env": _JSON, "securityContext": _JSON},
)
_POD = st.fixed_dictionaries(
    {
        "metadata": st.fixed_dictionaries(
            {"namespace": st.sampled_from(["shop", "kube-system"])},
            optional={
                "annotations": st.dictionaries(
                    st.sampled_from(
                        [
                            names.OPT_IN,
                            names.IPTABLES_ARGS,
                            names.SIDECAR_STATUS,
                            "traffic.sidecar.istio.io/includeOutboundIPRanges",
                        ]
                    ),
                    st.sampled_from(["true", "*", "[]", "x", "10.0.0.0/8"]),
                )
            },
        ),
        "spec": st.fixed_dictionaries(
            {},
            optional={
                "containers": st.lists(_CONTAINER, max_size=3) | _JSON,
                "initContainers": st.lists(_CONTAINER, max_size=3) | _JSON,
                "volumes": st.lists(st.fixed_dictionaries({"name": st.text(max_size=5)}), max_size=2) | _JSON,
                "hostNetwork": st.booleans(),
            },
        ),
    }
)


@settings(max_examples=300, deadline=None)
@given(_POD)
def test_any_pod_gets_an_answer_and_a_patch_that_applies_once(pod: dict[str, Any]) -> None:
    mutation = mutate_pod(pod, None, SETTINGS)
    assert isinstance(mutation, Patch | Unchanged | Denied)
    if isinstance(mutation, Patch) and not decide(pod, None).ours:
        # A pod that is not ours loses the waiter an earlier call may have given it.
        after = apply_patch(pod, mutation.ops)
        assert names.WAITER_CONTAINER not in init_names(after)
        assert isinstance(mutate_pod(after, None, SETTINGS), Unchanged)
    elif isinstance(mutation, Patch):
        after = apply_patch(pod, mutation.ops)
        assert init_names(after).count(names.WAITER_CONTAINER) == 1
        assert init_names(after)[0] == names.WAITER_CONTAINER
        assert only_our_waiter_and_volume(after)
        assert "istio-init" not in init_names(after)
        assert mutate_pod(after, None, SETTINGS) == Unchanged(f"already has {names.WAITER_CONTAINER}")


def test_the_waiter_has_cpu_and_memory_limits_so_quotas_on_limits_admit_it() -> None:
    from istio_pod_network_controller.inject import WAITER_RESOURCES

    assert set(WAITER_RESOURCES["limits"]) >= {"cpu", "memory"}
    assert set(WAITER_RESOURCES["requests"]) >= {"cpu", "memory"}


# -- the webhook owns the waiter and its volume -------------------------------------------------------

EXPECTED = waiter_container(SETTINGS, run_as=DEFAULT_WAITER_UID, run_as_group=DEFAULT_WAITER_UID)


def only_our_waiter_and_volume(pod: dict[str, Any], waiter: dict[str, Any] = EXPECTED) -> bool:
    inits = pod["spec"]["initContainers"]
    named = [
        v for v in pod["spec"]["volumes"] if isinstance(v, dict) and v.get("name") == names.PODINFO_VOLUME
    ]
    return (
        inits[0] == waiter
        and init_names(pod).count(names.WAITER_CONTAINER) == 1
        and named == [podinfo_volume()]
    )


def _impostor(**changes: Any) -> dict[str, Any]:
    fake = copy.deepcopy(EXPECTED)
    for key, value in changes.items():
        if value is None:
            fake.pop(key, None)
        else:
            fake[key] = value
    return fake


IMPOSTORS = {
    "another image": _impostor(image="evil.example/pass:1"),
    "a command": _impostor(command=["sh", "-c", "exit 0"]),
    "other args": _impostor(args=["init", "--file", "/tmp/fake-annotations"]),
    "an environment": _impostor(env=[{"name": "PYTHONPATH", "value": "/etc/podinfo"}]),
    "another mount": _impostor(volumeMounts=[{"name": "fake", "mountPath": names.PODINFO_PATH}]),
    "a native sidecar": _impostor(restartPolicy="Always"),
    "the proxy's UID": _impostor(securityContext={**EXPECTED["securityContext"], "runAsUser": 1337}),
    "no security context": _impostor(securityContext=None),
    "just a name": {"name": names.WAITER_CONTAINER},
}


@pytest.mark.parametrize("where", [0, 1, 3])
@pytest.mark.parametrize("impostor", list(IMPOSTORS), ids=list(IMPOSTORS))
@pytest.mark.parametrize("with_istio_init", [True, False], ids=["istio-init", "cni"])
def test_a_pod_supplied_waiter_is_replaced_by_ours_placed_first(
    impostor: str, where: int, with_istio_init: bool
) -> None:
    pod = minimal_pod(istio_init_args=["istio-iptables", "-p", "15001"] if with_istio_init else None)
    inits = pod["spec"].setdefault("initContainers", [])
    inits += [{"name": "setup"}, {"name": "migrate"}]
    inits.insert(min(where, len(inits)), copy.deepcopy(IMPOSTORS[impostor]))
    after = patched(pod)
    assert only_our_waiter_and_volume(after)
    assert init_names(after) == [names.WAITER_CONTAINER, "setup", "migrate"]
    assert mutate_pod(after, None, SETTINGS) == Unchanged(f"already has {names.WAITER_CONTAINER}")


def test_our_own_waiter_misplaced_by_another_webhook_is_put_first_again() -> None:
    after = patched(minimal_pod())
    after["spec"]["initContainers"].insert(0, {"name": "vault-agent-init"})
    again = patched(after)
    assert init_names(again) == [names.WAITER_CONTAINER, "vault-agent-init"]
    assert only_our_waiter_and_volume(again)


def test_our_waiter_and_volume_with_the_api_servers_defaults_are_left_alone() -> None:
    after = patched(minimal_pod())
    after["spec"]["initContainers"][0].update(
        terminationMessagePath="/dev/termination-log", imagePullPolicy="IfNotPresent"
    )
    volume = next(v for v in after["spec"]["volumes"] if v["name"] == names.PODINFO_VOLUME)
    volume["downwardAPI"]["defaultMode"] = 420
    volume["downwardAPI"]["items"][0]["fieldRef"]["apiVersion"] = "v1"
    assert mutate_pod(after, None, SETTINGS) == Unchanged(f"already has {names.WAITER_CONTAINER}")


def test_a_pull_policy_the_api_server_would_not_default_to_is_not_ours() -> None:
    after = patched(minimal_pod())
    after["spec"]["initContainers"][0]["imagePullPolicy"] = (
        "Never"  # registry.example/ipnc:1.0 defaults to IfNotPresent
    )
    assert only_our_waiter_and_volume(patched(after))


def _downward(*items: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": names.PODINFO_VOLUME, "downwardAPI": {"items": list(items), **extra}}


OUR_ITEM = {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
FAKE_VOLUMES = {
    "emptyDir": {"name": names.PODINFO_VOLUME, "emptyDir": {}},
    "hostPath": {"name": names.PODINFO_VOLUME, "hostPath": {"path": "/var/fake-podinfo"}},
    "configMap": {"name": names.PODINFO_VOLUME, "configMap": {"name": "fake-annotations"}},
    "labels": _downward({"path": "annotations", "fieldRef": {"fieldPath": "metadata.labels"}}),
    "extra item": _downward(OUR_ITEM, {"path": "x", "fieldRef": {"fieldPath": "metadata.name"}}),
    "mode": _downward(OUR_ITEM, defaultMode=0o600),
    "item mode": _downward({**OUR_ITEM, "mode": 0o600}),
    "two sources": {**podinfo_volume(), "emptyDir": {}},
}  # fmt: skip


@pytest.mark.parametrize("volume", list(FAKE_VOLUMES.values()), ids=list(FAKE_VOLUMES))
def test_a_pod_supplied_podinfo_volume_is_replaced_by_ours(volume: dict[str, Any]) -> None:
    pod = minimal_pod()
    pod["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}, volume, copy.deepcopy(volume)]
    after = patched(pod)
    assert only_our_waiter_and_volume(after)
    assert after["spec"]["volumes"][0] == {"name": "data", "emptyDir": {}}
    assert mutate_pod(after, None, SETTINGS) == Unchanged(f"already has {names.WAITER_CONTAINER}")


def test_an_application_container_with_the_waiters_name_is_denied() -> None:
    pod = minimal_pod()
    pod["spec"]["containers"].append({"name": names.WAITER_CONTAINER, "image": "evil"})
    mutation = mutate_pod(pod, None, SETTINGS)
    assert isinstance(mutation, Denied)
    assert mutation.message.startswith(f"the container name {names.WAITER_CONTAINER} is reserved")


# -- the waiter's IDs are never the proxy's ------------------------------------------------------------


def _ids(pod: dict[str, Any], namespace: dict[str, Any] | None = None,
         settings: WaiterSettings = SETTINGS) -> tuple[int | None, int | None]:  # fmt: skip
    mutation = mutate_pod(pod, namespace, settings)
    assert isinstance(mutation, Patch), mutation
    after = apply_patch(pod, mutation.ops)
    security = after["spec"]["initContainers"][0]["securityContext"]
    if "runAsUser" in security:  # what the webhook chose is what the agent sees
        assert waiter_ids(after) == (security["runAsUser"], security["runAsGroup"])
    return waiter_ids(after)


def test_the_waiter_gid_is_never_a_proxy_gid() -> None:
    assert _ids(minimal_pod(istio_init_args=["istio-iptables", "-u", "1337", "-g", "65532"])) == (
        65533,
        65533,
    )
    cni = minimal_pod()
    cni["spec"]["containers"][1]["securityContext"] = {"runAsUser": 1337, "runAsGroup": 65532}
    assert _ids(cni) == (65533, 65533)


def test_a_proxy_inheriting_the_pods_ids_keeps_the_waiter_off_them() -> None:
    pod = minimal_pod()
    pod["spec"]["securityContext"] = {"runAsUser": 65532, "runAsGroup": 65533}
    assert _ids(pod) == (65534, 65534)


NONE = WaiterSettings(image="i", run_as_user=None)


def openshift(uid_range: str) -> dict[str, Any]:
    return {"metadata": {"name": "shop", "annotations": {"openshift.io/sa.scc.uid-range": uid_range}}}


def test_openshift_gives_the_waiter_the_next_uid_of_the_namespace_range() -> None:
    # The platform gives the proxy (no runAsUser) the range's first UID.
    assert _ids(minimal_pod(), openshift("1000620000/10000"), NONE) == (1000620001, 1000620001)


def test_openshift_skips_a_uid_the_proxy_was_given_explicitly() -> None:
    pod = minimal_pod()
    pod["spec"]["containers"][1]["securityContext"] = {"runAsUser": 1000620001}
    assert _ids(pod, openshift("1000620000/10000"), NONE) == (1000620002, 1000620002)


@pytest.mark.parametrize(
    ("uid_range", "said"),
    [
        ("1000620000/1", "has no UID besides its first and the proxy's"),
        ("1000620000-1000629999", "is not START/SIZE"),
        ("0/10000", "is not a range of UIDs above 0"),
        ("1000620000/", "is not START/SIZE"),
    ],
)
def test_openshift_without_a_free_uid_in_the_range_is_denied(uid_range: str, said: str) -> None:
    mutation = mutate_pod(minimal_pod(), openshift(uid_range), NONE)
    assert isinstance(mutation, Denied)
    assert mutation.message.startswith(f"cannot choose a UID for {names.WAITER_CONTAINER}: the namespace's")
    assert said in mutation.message


def test_without_a_range_a_pod_whose_ids_are_the_proxys_is_denied() -> None:
    pod = minimal_pod()
    pod["spec"]["containers"][1]["securityContext"] = {
        "runAsUser": 1337,
        "runAsGroup": 1337,
    }  # as Istio injects
    pod["spec"]["securityContext"] = {"runAsGroup": 1337}  # the waiter would inherit it
    mutation = mutate_pod(pod, None, NONE)
    assert isinstance(mutation, Denied)
    assert "would inherit the pod's securityContext ID 1337, the proxy's" in mutation.message
    pod["spec"]["securityContext"] = {"runAsUser": 1000}
    assert _ids(pod, None, NONE) == (1000, None)  # not the proxy's: left to the pod and platform


def test_a_second_call_that_is_not_shown_the_namespace_keeps_the_uid_the_first_chose() -> None:
    # The webhook reads the namespace only when its opt-in matters; on the second call the waiter
    # itself opts the pod in, so the range is not known then.
    pod = minimal_pod()
    del pod["metadata"]["annotations"]
    namespace = openshift("1000620000/10000")
    namespace["metadata"]["labels"] = OPT_IN
    first = mutate_pod(pod, namespace, NONE)
    assert isinstance(first, Patch)
    after = apply_patch(pod, first.ops)
    assert waiter_ids(after) == (1000620001, 1000620001)
    assert mutate_pod(after, {"metadata": {"name": "shop"}}, NONE) == Unchanged(
        f"already has {names.WAITER_CONTAINER}"
    )


def test_a_platform_uid_on_the_waiter_is_kept_but_never_the_proxys() -> None:
    after = patched(minimal_pod(), NONE)
    after["spec"]["initContainers"][0]["securityContext"]["runAsUser"] = 1000620003  # as an SCC sets it
    assert mutate_pod(after, None, NONE) == Unchanged(f"already has {names.WAITER_CONTAINER}")
    after["spec"]["initContainers"][0]["securityContext"]["runAsUser"] = 1337
    again = patched(after, NONE)
    assert "runAsUser" not in again["spec"]["initContainers"][0]["securityContext"]


# -- both injectors, in either order ----------------------------------------------------------------


def _gateway_before_istio() -> dict[str, Any]:
    """What Istio's gateway chart's Deployment creates: istio-proxy as a placeholder (image auto,
    no arguments) that Istio's injector turns into a `proxy router` gateway."""
    return {
        "metadata": {
            "namespace": "shop",
            "annotations": {"inject.istio.io/templates": "gateway", **OPT_IN},
            "labels": {"sidecar.istio.io/inject": "true"},
        },
        "spec": {"containers": [{"name": "istio-proxy", "image": "auto"}]},
    }


def test_a_gateway_seen_before_istios_injector_loses_the_waiter_when_called_again() -> None:
    first = mutate_pod(_gateway_before_istio(), None, SETTINGS)
    assert isinstance(first, Patch)  # it looks like a sidecar's pod now
    after_ours = apply_patch(_gateway_before_istio(), first.ops)
    # Istio's injector fills in the gateway, and its own volumes.
    after_istio = copy.deepcopy(after_ours)
    after_istio["spec"]["containers"][0] |= {"image": "proxyv2:1", "args": ["proxy", "router"]}
    after_istio["spec"]["volumes"].append({"name": "istio-envoy", "emptyDir": {}})
    second = mutate_pod(after_istio, None, SETTINGS)
    assert isinstance(second, Patch) and "not ours" in second.summary
    final = apply_patch(after_istio, second.ops)
    assert names.WAITER_CONTAINER not in init_names(final)
    assert final["spec"]["volumes"] == [{"name": "istio-envoy", "emptyDir": {}}]
    assert mutate_pod(final, None, SETTINGS) == Unchanged(
        "its proxy is of type 'router', not a sidecar (a gateway): capture would break it"
    )


def test_a_podinfo_volume_that_a_container_mounts_is_kept_when_the_waiter_goes() -> None:
    pod = _gateway_before_istio()
    pod["spec"]["containers"][0] |= {
        "args": ["proxy", "router"],
        "volumeMounts": [{"name": names.PODINFO_VOLUME, "mountPath": "/x"}],
    }
    pod["spec"]["initContainers"] = [{"name": names.WAITER_CONTAINER, "image": "x"}]
    pod["spec"]["volumes"] = [podinfo_volume()]
    mutation = mutate_pod(pod, None, SETTINGS)
    assert isinstance(mutation, Patch)
    after = apply_patch(pod, mutation.ops)
    assert init_names(after) == [] and after["spec"]["volumes"] == [podinfo_volume()]


def test_a_pod_not_ours_without_a_waiter_is_unchanged() -> None:
    pod = _gateway_before_istio()
    pod["spec"]["containers"][0]["args"] = ["proxy", "router"]
    assert isinstance(mutate_pod(pod, None, SETTINGS), Unchanged)
