"""The facts of a pod: read once from whatever the object holds, never raising."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from istio_pod_network_controller import names
from istio_pod_network_controller.podfacts import (
    INIT_CONTAINER,
    PROXY_CONTAINER,
    NamespaceFacts,
    RunAs,
    namespace_facts,
    pod_facts,
)

PROXY = {
    "name": PROXY_CONTAINER,
    "args": ["proxy", "sidecar", 7],
    "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {}}, "junk", {"name": "A", "value": "2"}],
}
POD: dict[str, Any] = {
    "metadata": {
        "name": "web-1",
        "namespace": "shop",
        "uid": "u-1",
        "resourceVersion": "42",
        "annotations": {"a": "b", "port": 80},
        "labels": {"app": "web"},
    },
    "spec": {
        "securityContext": {"runAsUser": 1000, "runAsGroup": 2000},
        "containers": [{"name": "app"}, PROXY],
        "initContainers": [
            {"name": names.WAITER_CONTAINER, "securityContext": {"runAsUser": 65532}},
            {"name": INIT_CONTAINER, "args": ["istio-iptables", "-p", "15001"]},
        ],
    },
    "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]},
}


def test_the_facts_of_a_well_formed_pod() -> None:
    pod = pod_facts(POD)
    assert (pod.name, pod.namespace, pod.uid, pod.resource_version) == ("web-1", "shop", "u-1", "42")
    assert pod.annotations == {"a": "b", "port": "80"}  # a manifest's unquoted number reads as its text
    assert pod.labels == {"app": "web"}
    assert pod.ips == ("10.0.0.1", "fd00::1") and pod.phase == "Running" and not pod.deleting
    assert pod.container_names == ("app", PROXY_CONTAINER)
    assert pod.proxy is not None and pod.proxy.proxy_type == "sidecar"
    assert pod.proxy.args == ("proxy", "sidecar")  # a non-string argument is skipped
    assert pod.proxy.env == {"A": "2"}  # literal values only; the last of a name wins
    assert pod.istio_init is not None and pod.istio_init.args == ("istio-iptables", "-p", "15001")
    assert pod.waiter is not None


def test_a_container_runs_as_its_own_ids_else_the_pods() -> None:
    pod = pod_facts(POD)
    assert pod.waiter is not None and pod.proxy is not None
    assert pod.waiter.run_as_user == RunAs(65532) and pod.waiter.run_as_group == RunAs(2000, from_pod=True)
    assert pod.proxy.ids == {1000, 2000}
    assert (pod.run_as_user.id, pod.run_as_group.id) == (1000, 2000)


@pytest.mark.parametrize("value", ["1000", True, -1, 2**32, 1.0, [1]])
def test_an_id_that_is_not_one_is_kept_as_written_but_has_no_id(value: Any) -> None:
    pod = copy.deepcopy(POD)
    pod["spec"]["containers"][1]["securityContext"] = {"runAsUser": value}
    proxy = pod_facts(pod).proxy
    assert proxy is not None and proxy.run_as_user.value == value and proxy.run_as_user.id is None


def test_a_native_sidecar_is_the_proxy_only_with_restart_policy_always() -> None:
    pod = {"spec": {"initContainers": [{"name": PROXY_CONTAINER, "args": ["proxy", "router"]}]}}
    assert pod_facts(pod).proxy is None
    pod["spec"]["initContainers"][0]["restartPolicy"] = "Always"
    proxy = pod_facts(pod).proxy
    assert proxy is not None and proxy.proxy_type == "router"


def test_pod_ip_is_read_when_pod_ips_lacks_it() -> None:
    pod = {"status": {"podIP": "10.0.0.2", "podIPs": [{"ip": "10.0.0.1"}, {"ip": ""}, {"ip": 5}, "x"]}}
    assert pod_facts(pod).ips == ("10.0.0.1", "10.0.0.2")


def test_a_deletion_timestamp_means_deleting() -> None:
    assert pod_facts({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}}).deleting


def test_facts_are_returned_as_they_are_and_none_stays_unknown() -> None:
    pod = pod_facts(POD)
    assert pod_facts(pod) is pod
    assert namespace_facts(None) is None
    namespace = NamespaceFacts("shop")
    assert namespace_facts(namespace) is namespace
    assert namespace_facts({"metadata": {"name": "shop", "labels": {"x": 1}}}) == NamespaceFacts(
        "shop", labels={"x": "1"}
    )


HOSTILE: list[Any] = [None, 0, -1, 1.5, True, "", "x", [], {}, [None], [{}], {"name": 3}, 2**70]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in items:
        found += _paths(value, (*prefix, key))
    return found


def test_any_field_of_any_type_never_raises() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        pod = copy.deepcopy(POD)
        for _ in range(rng.randint(1, 4)):
            path = rng.choice(_paths(pod))
            if not path:
                pod = rng.choice(HOSTILE)
                break
            parent = pod
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = copy.deepcopy(rng.choice(HOSTILE))
        facts = pod_facts(pod)
        assert all(isinstance(v, str) for v in (*facts.annotations.values(), *facts.labels.values()))
        assert all(isinstance(ip, str) and ip for ip in facts.ips)
        for container in (facts.proxy, facts.istio_init, facts.waiter):
            assert container is None or all(isinstance(a, str) for a in container.args)
        namespace_facts(pod)
