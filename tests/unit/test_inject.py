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
from istio_pod_network_controller.inject import (
    DEFAULT_WAITER_UID,
    Denied,
    Patch,
    Unchanged,
    WaiterSettings,
    mutate_pod,
)
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


def test_openshift_leaves_the_uid_to_the_platform() -> None:
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
    assert mutate_pod(host, None, SETTINGS) == Unchanged("host network pod")
    pod = injected("hello.yaml.injected", injected_dir)
    pod["metadata"]["namespace"] = "kube-system"
    assert isinstance(mutate_pod(pod, None, SETTINGS), Unchanged)


def test_a_pod_with_only_istios_status_annotation_is_not_given_a_waiter_that_would_wait_forever() -> None:
    pod = {"metadata": {"namespace": "shop", "annotations": {**OPT_IN, names.SIDECAR_STATUS: "{}"}},
           "spec": {"containers": [{"name": "app"}]}}  # fmt: skip
    mutation = mutate_pod(pod, None, SETTINGS)
    assert isinstance(mutation, Unchanged)
    assert "would not program" in mutation.reason


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
    if isinstance(mutation, Patch):
        after = apply_patch(pod, mutation.ops)
        assert init_names(after).count(names.WAITER_CONTAINER) == max(
            1, init_names(pod).count(names.WAITER_CONTAINER)
        )
        if names.WAITER_CONTAINER not in init_names(pod):
            assert init_names(after)[0] == names.WAITER_CONTAINER
        assert "istio-init" not in init_names(after)
        assert mutate_pod(after, None, SETTINGS) == Unchanged(f"already has {names.WAITER_CONTAINER}")


def test_the_waiter_has_cpu_and_memory_limits_so_quotas_on_limits_admit_it() -> None:
    from istio_pod_network_controller.inject import WAITER_RESOURCES

    assert set(WAITER_RESOURCES["limits"]) >= {"cpu", "memory"}
    assert set(WAITER_RESOURCES["requests"]) >= {"cpu", "memory"}
