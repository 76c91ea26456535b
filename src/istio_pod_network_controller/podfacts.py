"""What the product reads of a Pod and of its Namespace, parsed once where the object comes in.

A pod reaches us from the agent's watch, the webhook's AdmissionReview or a manifest file, and any
field of it may be missing or of another type than the Pod schema gives: whoever can write pods
can write anything the API server lets through, and a file can hold anything at all. Walking the
raw nested dicts defensively in every module that reads them is how the same few facts (the
proxy container, the IPs, the annotations) came to be looked up in several slightly different
ways. So one function here turns the raw object into a frozen value of known types, and never
raises: a field of the wrong type reads as absent. Everything else reads these values.

Two things stay raw on purpose: the object itself (``PodFacts.raw``), because the webhook's JSON
patch paths index into the raw lists; and a securityContext ID, because an ID of the wrong type
must be reported as an error by the spec layer (a quietly defaulted proxy UID would capture the
proxy's own traffic), so ``RunAs`` keeps the value as written next to the validated one.

The values are named tuples rather than frozen dataclasses: the agent builds one for every event
of every pod on its node, most of them pods it leaves alone, and a frozen dataclass of this many
fields costs several times more to build than the lookups it replaces.

Pure and standard-library only: the waiter imports it (through ``probe``) and must start fast.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, TypeGuard

from .names import WAITER_CONTAINER

PROXY_CONTAINER = "istio-proxy"
INIT_CONTAINER = "istio-init"
MAX_ID = 2**32 - 2  # (uid_t)-1 is "no user"
EMPTY: Mapping[str, str] = MappingProxyType({})


def as_mapping(value: object) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty one."""
    if type(value) is dict:  # what JSON and YAML give: skips the slower abstract-class check
        return value
    return value if isinstance(value, Mapping) else {}


def as_list(value: object) -> list[Any]:
    """``value`` when it is a list, else an empty one."""
    return value if isinstance(value, list) else []


def is_id(value: object) -> TypeGuard[int]:
    """A UID or GID: a whole number (not a bool) from 0 to MAX_ID."""
    return type(value) is int and 0 <= value <= MAX_ID


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _string_map(value: object) -> dict[str, str]:
    """Annotations or labels as text. Values are made text rather than dropped: a manifest file
    may hold ``port: 80`` unquoted, which the spec layer then parses like the string."""
    return {str(k): str(v) for k, v in as_mapping(value).items()}


class RunAs(NamedTuple):
    """A container's runAsUser or runAsGroup as the pod spec gives it: its own securityContext's,
    else the pod's (what the kubelet does). ``value`` is as written, unchecked."""

    value: object = None  # None: neither securityContext sets it
    from_pod: bool = False  # taken from the pod's securityContext

    @property
    def id(self) -> int | None:
        """The ID, or None when unset or not a valid ID."""
        return self.value if is_id(self.value) else None


UNSET = RunAs()


def _run_as(key: str, own: Mapping[str, Any], pod: Mapping[str, Any]) -> RunAs:
    if own.get(key) is not None:
        return RunAs(own[key])
    if pod.get(key) is not None:
        return RunAs(pod[key], from_pod=True)
    return UNSET


class Container(NamedTuple):
    name: str
    args: tuple[str, ...]  # the string arguments; any other value is skipped
    env: Mapping[str, str]  # literal values (a valueFrom cannot be resolved here, so it is skipped)
    run_as_user: RunAs
    run_as_group: RunAs

    @property
    def ids(self) -> set[int]:
        """Its valid runAsUser and runAsGroup."""
        return {i for i in (self.run_as_user.id, self.run_as_group.id) if i is not None}

    @property
    def proxy_type(self) -> str:
        """The proxy's type as Istio's CNI plugin reads it: the word after ``proxy`` in the args
        (``sidecar``, or ``router`` for gateways); empty when the args do not say."""
        for word, following in itertools.pairwise(self.args):
            if word == "proxy":
                return following
        return ""


def _container(raw: Mapping[str, Any], pod_security: Mapping[str, Any]) -> Container:
    env: dict[str, str] = {}
    for item in as_list(raw.get("env")):
        entry = as_mapping(item)
        name, value = entry.get("name"), entry.get("value")
        if isinstance(name, str) and isinstance(value, str):
            env[name] = value
    own = as_mapping(raw.get("securityContext"))
    return Container(
        name=_text(raw.get("name")),
        args=tuple(a for a in as_list(raw.get("args")) if isinstance(a, str)),
        env=env,
        run_as_user=_run_as("runAsUser", own, pod_security),
        run_as_group=_run_as("runAsGroup", own, pod_security),
    )


def _named(
    containers: list[Any], name: str, *, restart_policy: str | None = None
) -> Mapping[str, Any] | None:
    for item in containers:
        c = as_mapping(item)
        if c.get("name") == name and (restart_policy is None or c.get("restartPolicy") == restart_policy):
            return c
    return None


class PodFacts(NamedTuple):
    """One pod, as the agent, the webhook and the CLI read it."""

    raw: Mapping[str, Any]
    name: str = ""
    generate_name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    annotations: Mapping[str, str] = EMPTY
    labels: Mapping[str, str] = EMPTY
    host_network: bool = False
    ips: tuple[str, ...] = ()  # podIPs, then podIP when it is not among them
    phase: str = ""
    deleting: bool = False  # it has a deletionTimestamp
    container_names: tuple[str, ...] = ()  # of spec.containers (init containers not included)
    # The Istio proxy: a container named istio-proxy, or a native sidecar of that name (an init
    # container with restartPolicy Always).
    proxy: Container | None = None
    istio_init: Container | None = None  # the first init container named istio-init
    waiter: Container | None = None  # the first init container named like ours
    # The state the pod's status reports for that init container: "running", "waiting",
    # "terminated", or "" when the status has none (or not one of these). Written by the kubelet;
    # whoever may write pods/status can write it too, so it is only a hint of when to look again.
    waiter_state: str = ""
    # The pod's own securityContext IDs: what a container that sets none inherits.
    run_as_user: RunAs = UNSET
    run_as_group: RunAs = UNSET


CONTAINER_STATES = ("running", "waiting", "terminated")


def _container_state(statuses: object, name: str) -> str:
    """The state (one of CONTAINER_STATES) of the first container status named ``name``, or "".
    A status with several states set reads as none: the kubelet sets exactly one."""
    for item in as_list(statuses):
        entry = as_mapping(item)
        if entry.get("name") != name:
            continue
        state = as_mapping(entry.get("state"))
        found = [s for s in CONTAINER_STATES if isinstance(state.get(s), Mapping)]
        return found[0] if len(found) == 1 else ""
    return ""


def pod_facts(obj: object) -> PodFacts:
    """The facts of a raw pod (anything at all: never raises); facts are returned as they are."""
    if isinstance(obj, PodFacts):
        return obj
    raw = as_mapping(obj)
    metadata = as_mapping(raw.get("metadata"))
    spec = as_mapping(raw.get("spec"))
    status = as_mapping(raw.get("status"))
    security = as_mapping(spec.get("securityContext"))
    containers = as_list(spec.get("containers"))
    inits = as_list(spec.get("initContainers"))
    proxy = _named(containers, PROXY_CONTAINER) or _named(inits, PROXY_CONTAINER, restart_policy="Always")
    istio_init = _named(inits, INIT_CONTAINER)
    waiter = _named(inits, WAITER_CONTAINER)
    ips = [as_mapping(item).get("ip") for item in as_list(status.get("podIPs"))]
    ips.append(status.get("podIP"))
    return PodFacts(
        raw=raw,
        name=_text(metadata.get("name")),
        generate_name=_text(metadata.get("generateName")),
        namespace=_text(metadata.get("namespace")),
        uid=_text(metadata.get("uid")),
        resource_version=_text(metadata.get("resourceVersion")),
        annotations=_string_map(metadata.get("annotations")),
        labels=_string_map(metadata.get("labels")),
        host_network=spec.get("hostNetwork") is True,
        ips=tuple(dict.fromkeys(ip for ip in ips if isinstance(ip, str) and ip)),
        phase=_text(status.get("phase")),
        deleting=bool(metadata.get("deletionTimestamp")),
        container_names=tuple(
            n for n in (as_mapping(c).get("name") for c in containers) if isinstance(n, str)
        ),
        proxy=None if proxy is None else _container(proxy, security),
        istio_init=None if istio_init is None else _container(istio_init, security),
        waiter=None if waiter is None else _container(waiter, security),
        waiter_state=_container_state(status.get("initContainerStatuses"), WAITER_CONTAINER),
        run_as_user=_run_as("runAsUser", {}, security),
        run_as_group=_run_as("runAsGroup", {}, security),
    )


class NamespaceFacts(NamedTuple):
    """A pod's namespace, as far as the decision and the spec read it."""

    name: str = ""
    annotations: Mapping[str, str] = EMPTY
    labels: Mapping[str, str] = EMPTY


def namespace_facts(obj: object) -> NamespaceFacts | None:
    """The facts of a raw Namespace (never raises); None stays None (the namespace is not known),
    facts are returned as they are."""
    if obj is None or isinstance(obj, NamespaceFacts):
        return obj
    metadata = as_mapping(as_mapping(obj).get("metadata"))
    return NamespaceFacts(
        name=_text(metadata.get("name")),
        annotations=_string_map(metadata.get("annotations")),
        labels=_string_map(metadata.get("labels")),
    )


# What the pure entry points (``decide``, ``spec_from_pod``, ``mutate_pod``) take: the facts an
# event's handler built once, or a raw object (a manifest, a test's dict), parsed on the way in.
AnyPod = PodFacts | Mapping[str, Any]
AnyNamespace = NamespaceFacts | Mapping[str, Any] | None
