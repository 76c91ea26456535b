"""What the webhook does to a pod, as a pure function: pod (+ namespace) in, JSON patch out.

Kept apart from the admission server so every rule of the mutation is tested without a socket:
the membership decision is ``decide()`` (the agent's, not a copy); the waiter goes first among
the init containers, so the proxy (even a native sidecar) and the application start only after
the rules exist; an injected ``istio-init`` is removed and its arguments are kept in an
annotation, from which the agent builds exactly the spec istio-init would have applied (checked
here before anything is written). The patch is computed from the pod as it is, so a second call
on an already mutated pod changes nothing: safe under ``reinvocationPolicy: IfNeeded``.

Invalid istio-init arguments are denied, with the flag and value in the message: at admission is
where Istio's own injector rejects bad traffic annotations, where ``kubectl apply`` and the
ReplicaSet's events show it, and the alternative -- admitting the pod with its NET_ADMIN
istio-init -- would only meet a less helpful PodSecurity rejection in a restricted namespace.
Bad ``traffic.sidecar.istio.io/*`` annotations without istio-init are admitted: the agent puts
the reason on the pod, the waiter prints it, and correcting the annotation fixes the pod in place.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import names
from .decide import DEFAULT_EXCLUDED_NAMESPACES, decide
from .spec import OutOfScope, RedirectSpec, SpecError, spec_from_pod
from .spec.model import DEFAULT_PROXY_UID
from .spec.pod import (
    ENV_DNS_CAPTURE,
    ENV_INVALID_DROP,
    INIT_CONTAINER,
    env_of,
)

DEFAULT_WAITER_UID = 65532  # the conventional "nonroot" UID of distroless images; not the proxy's
WAITER_RESOURCES: Mapping[str, Any] = {
    "requests": {"cpu": "10m", "memory": "32Mi"},
    # A CPU limit too: a namespace whose ResourceQuota covers limits.cpu refuses any container
    # without one (istio-init, which the waiter replaces, had one as well).
    "limits": {"cpu": "100m", "memory": "64Mi"},
}
# istio-iptables reads these environment variables as defaults of these flags.
ENV_FLAGS = ((ENV_DNS_CAPTURE, "--redirect-dns"), (ENV_INVALID_DROP, "--drop-invalid"))

Pod = Mapping[str, Any]
JsonPatch = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class WaiterSettings:
    """How the webhook builds the waiting init container (the webhook's flags)."""

    image: str
    run_as_user: int | None = DEFAULT_WAITER_UID  # None: leave it to the platform (OpenShift SCCs)
    timeout: float | None = None  # None: the waiter's default
    verify: bool = False
    image_pull_policy: str | None = None
    excluded_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED_NAMESPACES


@dataclass(frozen=True, slots=True)
class Patch:
    ops: tuple[dict[str, Any], ...]
    summary: str


@dataclass(frozen=True, slots=True)
class Unchanged:
    reason: str


@dataclass(frozen=True, slots=True)
class Denied:
    message: str


Mutation = Patch | Unchanged | Denied


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _pointer(token: str) -> str:
    """One JSON Pointer reference token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


def _index_of(containers: Sequence[Any], name: str) -> int | None:
    for i, container in enumerate(containers):
        if _mapping(container).get("name") == name:
            return i
    return None


def istio_init_args(container: Mapping[str, Any]) -> list[str]:
    """istio-init's arguments as one self-contained list: its args verbatim (the leading
    ``istio-iptables`` included), then the flags that istio-iptables would have taken from
    istio-init's environment, spelled out, since the annotation carries no environment."""
    args = [a for a in _list(container.get("args")) if isinstance(a, str)]
    env = env_of(container)
    for variable, flag in ENV_FLAGS:
        if variable in env and not any(a.startswith(flag) for a in args):
            args.append(f"{flag}={env[variable]}")
    return args


def _with_annotations(pod: Pod, annotations: Mapping[str, str], inits: list[Any]) -> dict[str, Any]:
    copied: dict[str, Any] = copy.deepcopy(dict(pod))
    copied["metadata"] = {**_mapping(copied.get("metadata")), "annotations": dict(annotations)}
    copied["spec"] = {**_mapping(copied.get("spec")), "initContainers": inits}
    return copied


def _before(pod: Pod) -> dict[str, Any]:
    """The pod as istio-init would have seen it: any stale copy of the args annotation dropped."""
    annotations = {k: str(v) for k, v in _mapping(_mapping(pod.get("metadata")).get("annotations")).items()}
    annotations.pop(names.IPTABLES_ARGS, None)
    return _with_annotations(pod, annotations, list(_list(_mapping(pod.get("spec")).get("initContainers"))))


def _after(pod: Pod, args: Sequence[str]) -> dict[str, Any]:
    """The pod as the agent will see it: no istio-init, its arguments in the annotation."""
    annotations = {k: str(v) for k, v in _mapping(_mapping(pod.get("metadata")).get("annotations")).items()}
    annotations[names.IPTABLES_ARGS] = json.dumps(list(args))
    inits = _list(_mapping(pod.get("spec")).get("initContainers"))
    return _with_annotations(
        pod, annotations, [c for c in inits if _mapping(c).get("name") != INIT_CONTAINER]
    )


def _proxy_ids(spec: RedirectSpec | None) -> set[int]:
    if spec is None:
        return {DEFAULT_PROXY_UID}
    return {*spec.proxy_uids, *spec.proxy_gids}


def waiter_container(settings: WaiterSettings, *, run_as: int | None) -> dict[str, Any]:
    args = [names.WAITER_SUBCOMMAND, "--file", names.ANNOTATIONS_FILE]
    if settings.timeout is not None:
        args += ["--timeout", f"{settings.timeout:g}"]
    if settings.verify:
        args.append("--verify")
    security: dict[str, Any] = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if run_as is not None:
        security["runAsUser"] = run_as
        security["runAsGroup"] = run_as
    container: dict[str, Any] = {
        "name": names.WAITER_CONTAINER,
        "image": settings.image,
        "args": args,
        "resources": copy.deepcopy(dict(WAITER_RESOURCES)),
        "securityContext": security,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": names.PODINFO_VOLUME, "mountPath": names.PODINFO_PATH, "readOnly": True}],
    }
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    return container


def podinfo_volume() -> dict[str, Any]:
    return {
        "name": names.PODINFO_VOLUME,
        "downwardAPI": {
            "items": [{"path": names.PODINFO_ANNOTATIONS, "fieldRef": {"fieldPath": "metadata.annotations"}}]
        },
    }


def _waiter_uid(settings: WaiterSettings, taken: Collection[int]) -> int | None:
    uid = settings.run_as_user
    if uid is None:
        return None
    while uid in taken:
        uid += 1
    return uid


def mutate_pod(pod: Pod, namespace: Mapping[str, Any] | None, settings: WaiterSettings) -> Mutation:
    """The patch for a pod being created, or why there is none."""
    decision = decide(pod, namespace, excluded_namespaces=settings.excluded_namespaces)
    if not decision.ours:
        return Unchanged(decision.reason)
    spec_obj = _mapping(pod.get("spec"))
    inits = _list(spec_obj.get("initContainers"))
    istio_init = _index_of(inits, INIT_CONTAINER)

    args: list[str] | None = None
    spec: RedirectSpec | None = None
    if istio_init is not None:
        args = istio_init_args(_mapping(inits[istio_init]))
        try:
            spec = spec_from_pod(_before(pod), namespace)
        except OutOfScope as exc:
            return Unchanged(f"the agent would not program it: {exc.reason}")
        except SpecError as exc:
            return Denied(f"{names.WAITER_CONTAINER} cannot replace {INIT_CONTAINER}: {exc}")
        try:
            kept: RedirectSpec | str = spec_from_pod(_after(pod, args), namespace)
        except (SpecError, OutOfScope) as exc:
            kept = str(exc)
        if kept != spec:
            return Denied(
                f"{INIT_CONTAINER}'s arguments would not mean the same once kept in {names.IPTABLES_ARGS} "
                f"({kept if isinstance(kept, str) else 'a different spec'}); please report this"
            )
    else:
        try:
            spec = spec_from_pod(pod, namespace)
        except OutOfScope as exc:
            return Unchanged(f"the agent would not program it: {exc.reason}")
        except SpecError:
            spec = None  # admitted: the agent reports it on the pod, and it can be fixed in place

    ops: JsonPatch = []
    done: list[str] = []
    if args is not None and istio_init is not None:
        annotations = _mapping(pod.get("metadata")).get("annotations")
        value = json.dumps(args)
        if isinstance(annotations, Mapping):
            ops.append(
                {
                    "op": "add",
                    "path": f"/metadata/annotations/{_pointer(names.IPTABLES_ARGS)}",
                    "value": value,
                }
            )
        else:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {names.IPTABLES_ARGS: value}})
        ops.append({"op": "remove", "path": f"/spec/initContainers/{istio_init}"})
        done.append(f"replaced {INIT_CONTAINER} (its arguments kept in {names.IPTABLES_ARGS})")
    if _index_of(inits, names.WAITER_CONTAINER) is None:
        waiter = waiter_container(settings, run_as=_waiter_uid(settings, _proxy_ids(spec)))
        if isinstance(spec_obj.get("initContainers"), list):
            ops.append({"op": "add", "path": "/spec/initContainers/0", "value": waiter})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [waiter]})
        done.append(f"added {names.WAITER_CONTAINER} first")
    volumes = spec_obj.get("volumes")
    if _index_of(_list(volumes), names.PODINFO_VOLUME) is None:
        if isinstance(volumes, list):
            ops.append({"op": "add", "path": "/spec/volumes/-", "value": podinfo_volume()})
        else:
            ops.append({"op": "add", "path": "/spec/volumes", "value": [podinfo_volume()]})
        done.append(f"added volume {names.PODINFO_VOLUME}")
    if not ops:
        return Unchanged(f"already has {names.WAITER_CONTAINER}")
    return Patch(tuple(ops), "; ".join(done) + f" ({decision.reason})")
