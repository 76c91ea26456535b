"""What the webhook does to a pod, as a pure function: pod (+ namespace) in, JSON patch out.

Kept apart from the admission server so every rule of the mutation is tested without a socket:
the membership decision is ``decide()`` (the agent's, not a copy); the waiter goes first among
the init containers, so the proxy (even a native sidecar) and the application start only after
the rules exist; an injected ``istio-init`` is removed and its arguments are kept in an
annotation, from which the agent builds exactly the spec istio-init would have applied (checked
here before anything is written). The patch is computed from the pod as it is, so a second call
on an already mutated pod changes nothing: safe under ``reinvocationPolicy: IfNeeded``.

The webhook owns the waiter: in a pod that is not ours it is removed (an earlier call may have
added it before another injector made the pod a gateway), and an init container named like it that
is not exactly the one it injects (up to the API server's defaults), wherever it stands, is
replaced by the real one placed first, and so is a volume named like the podinfo volume that is
not exactly its downward API volume; a pod author therefore never chooses the waiter's image,
command, IDs, environment or the file it reads. Replacing rather than refusing keeps pods copied
or restored from a mutated pod (``kubectl get -o yaml | kubectl create``, backups) working, with
the current waiter. An
application container of that name is refused: it cannot be replaced without changing the app.
The waiter's UID and GID are never the proxy's (its connections would not be captured, so it
could not prove the redirect): see ``waiter_ids_for``.

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
from .podfacts import (
    INIT_CONTAINER,
    MAX_ID,
    AnyNamespace,
    AnyPod,
    Container,
    NamespaceFacts,
    PodFacts,
    as_list,
    as_mapping,
    namespace_facts,
    pod_facts,
)
from .spec import RedirectSpec, SpecError, spec_from_pod
from .spec.model import DEFAULT_PROXY_UID
from .spec.pod import ANN_OPENSHIFT_UID_RANGE, ENV_DNS_CAPTURE, ENV_INVALID_DROP

DEFAULT_WAITER_UID = 65532  # the conventional "nonroot" UID of distroless images; not the proxy's
WAITER_RESOURCES: Mapping[str, Any] = {
    "requests": {"cpu": "10m", "memory": "32Mi"},
    # A CPU limit too: a namespace whose ResourceQuota covers limits.cpu refuses any container
    # without one (istio-init, which the waiter replaces, has one as well: 2 CPUs). One CPU, so
    # that the waiter's start (about 50 ms of one CPU, all of it Python's) is never throttled: at
    # 100m the kernel ran it 10 ms in every 100 ms and the waiter took 0.5 s to start on a real
    # node, most of our gap to istio-init.
    "limits": {"cpu": "1", "memory": "64Mi"},
}
# What the API server fills in on a container and a downward API volume that the webhook leaves
# unset: a second call must recognise its own waiter and volume with these added.
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
DEFAULT_VOLUME_MODE = 0o644
# istio-iptables reads these environment variables as defaults of these flags.
ENV_FLAGS = ((ENV_DNS_CAPTURE, "--redirect-dns"), (ENV_INVALID_DROP, "--drop-invalid"))

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


def _pointer(token: str) -> str:
    """One JSON Pointer reference token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


def _index_of(containers: Sequence[Any], name: str) -> int | None:
    for i, container in enumerate(containers):
        if as_mapping(container).get("name") == name:
            return i
    return None


def istio_init_args(container: Container) -> list[str]:
    """istio-init's arguments as one self-contained list: its args verbatim (the leading
    ``istio-iptables`` included), then the flags that istio-iptables would have taken from
    istio-init's environment, spelled out, since the annotation carries no environment."""
    args = list(container.args)
    for variable, flag in ENV_FLAGS:
        if variable in container.env and not any(a.startswith(flag) for a in args):
            args.append(f"{flag}={container.env[variable]}")
    return args


def _before(pod: PodFacts) -> PodFacts:
    """The pod as istio-init would have seen it: any stale copy of the args annotation dropped."""
    annotations = {k: v for k, v in pod.annotations.items() if k != names.IPTABLES_ARGS}
    return pod._replace(annotations=annotations)


def _after(pod: PodFacts, args: Sequence[str]) -> PodFacts:
    """The pod as the agent will see it: no istio-init, its arguments in the annotation."""
    annotations = {**pod.annotations, names.IPTABLES_ARGS: json.dumps(list(args))}
    return pod._replace(annotations=annotations, istio_init=None)


def _pod_ids(pod: PodFacts) -> set[int]:
    """The IDs of the pod's own securityContext, which a container that sets none inherits."""
    return {i for i in (pod.run_as_user.id, pod.run_as_group.id) if i is not None}


def _uid_range(namespace: NamespaceFacts | None) -> tuple[int, int] | str | None:
    """OpenShift's ``openshift.io/sa.scc.uid-range`` (``START/SIZE``) as (first, last), the
    problem with it as text, or None when the namespace has none."""
    raw = None if namespace is None else namespace.annotations.get(ANN_OPENSHIFT_UID_RANGE)
    if raw is None:
        return None
    start, slash, size = raw.strip().partition("/")
    if not (slash and start.isascii() and start.isdigit() and size.isascii() and size.isdigit()):
        return f"{ANN_OPENSHIFT_UID_RANGE} {raw[:80]!r} is not START/SIZE"
    first, count = int(start), int(size)
    if not (first >= 1 and count >= 1 and first + count - 1 <= MAX_ID):
        return f"{ANN_OPENSHIFT_UID_RANGE} {raw[:80]!r} is not a range of UIDs above 0"
    return first, first + count - 1


def _proxy_ids(spec: RedirectSpec | None, pod: PodFacts, namespace: NamespaceFacts | None) -> set[int]:
    """Every UID and GID the proxy may run as, generously: the spec's, the default proxy UID, the
    IDs the proxy container has (its own, else the pod's), and OpenShift's first UID of the namespace (what a
    container without runAsUser gets there). Being generous only costs the waiter another UID."""
    taken = {DEFAULT_PROXY_UID}
    if spec is not None:
        taken |= {*spec.proxy_uids, *spec.proxy_gids}
    taken |= pod.proxy.ids if pod.proxy is not None else _pod_ids(pod)
    found = _uid_range(namespace)
    if isinstance(found, tuple):
        taken.add(found[0])
    return taken


def waiter_ids_for(
    settings: WaiterSettings, pod: PodFacts, namespace: NamespaceFacts | None, taken: Collection[int]
) -> tuple[int | None, int | None] | Denied:
    """The waiter's runAsUser and runAsGroup (None: left to the platform), never one of ``taken``.

    With ``--waiter-run-as-user N``: N for both, or the next ID up that is not the proxy's.
    With ``none`` in a namespace with OpenShift's UID range: the first UID of the range after
    its start (the start is what the platform gives the proxy and every container without
    runAsUser) that is not the proxy's, for both; denied when the range has no such UID or is
    malformed (the platform could not admit the pod either). With ``none`` elsewhere: unset, so
    the platform decides, unless the pod's own securityContext, which the waiter inherits, names
    a proxy ID: then denied, since the waiter could not prove the redirect.
    """
    if settings.run_as_user is not None:
        uid = settings.run_as_user
        while uid in taken:
            uid += 1
        return uid, uid
    found = _uid_range(namespace)
    if isinstance(found, str):
        return Denied(f"cannot choose a UID for {names.WAITER_CONTAINER}: the namespace's {found}")
    if found is not None:
        first, last = found
        uid = first + 1
        while uid <= last and uid in taken:
            uid += 1
        if uid > last:
            return Denied(
                f"cannot choose a UID for {names.WAITER_CONTAINER}: the namespace's "
                f"{ANN_OPENSHIFT_UID_RANGE} {first}-{last} has no UID besides its first and the proxy's"
            )
        return uid, uid
    inherited = _pod_ids(pod) & set(taken)
    if inherited:
        return Denied(
            f"{names.WAITER_CONTAINER} would inherit the pod's securityContext ID "
            f"{','.join(map(str, sorted(inherited)))}, the proxy's, and could then not prove the "
            "redirect; give the pod other runAsUser/runAsGroup, or the webhook a --waiter-run-as-user"
        )
    return None, None


def waiter_container(
    settings: WaiterSettings, *, run_as: int | None, run_as_group: int | None
) -> dict[str, Any]:
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
    if run_as_group is not None:
        security["runAsGroup"] = run_as_group
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


def _default_pull_policy(image: str) -> str:
    """The API server's default imagePullPolicy: Always for ``:latest`` or no tag, else IfNotPresent."""
    if "@" in image:
        return "IfNotPresent"
    tag = image.rpartition("/")[2].partition(":")[2]
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def is_our_waiter(container: Any, expected: Mapping[str, Any], *, taken: Collection[int] = ()) -> bool:
    """Is ``container`` exactly ``expected``, up to what the API server fills in by default?

    Where ``expected`` leaves runAsUser or runAsGroup to the platform, any such ID that is not in
    ``taken`` (the proxy's) is the platform's choice, or one an earlier call made knowing the
    namespace's UID range, which a later call may not be shown: accepted too.
    """
    if not isinstance(container, Mapping):
        return False
    seen = dict(container)
    if seen.get("terminationMessagePath") == DEFAULT_TERMINATION_MESSAGE_PATH:
        del seen["terminationMessagePath"]
    if "imagePullPolicy" not in expected and seen.get("imagePullPolicy") == _default_pull_policy(
        str(expected["image"])
    ):
        del seen["imagePullPolicy"]
    wanted = as_mapping(expected.get("securityContext"))
    security = seen.get("securityContext")
    if isinstance(security, Mapping):
        security = dict(security)
        for key in ("runAsUser", "runAsGroup"):
            value = security.get(key)
            if key not in wanted and type(value) is int and 0 < value <= MAX_ID and value not in taken:
                del security[key]
        seen["securityContext"] = security
    return seen == dict(expected)


def is_our_volume(volume: Any) -> bool:
    """Is ``volume`` exactly our downward API volume, up to the API server's defaults?"""
    if not isinstance(volume, Mapping) or set(volume) != {"name", "downwardAPI"}:
        return False
    source = as_mapping(volume.get("downwardAPI"))
    if (
        set(source) - {"items", "defaultMode"}
        or source.get("defaultMode", DEFAULT_VOLUME_MODE) != DEFAULT_VOLUME_MODE
    ):
        return False
    items = as_list(source.get("items"))
    if len(items) != 1 or not isinstance(items[0], Mapping) or set(items[0]) != {"path", "fieldRef"}:
        return False
    ref = dict(as_mapping(items[0].get("fieldRef")))
    if ref.get("apiVersion") == "v1":
        del ref["apiVersion"]
    return items[0].get("path") == names.PODINFO_ANNOTATIONS and ref == {"fieldPath": "metadata.annotations"}


def podinfo_volume() -> dict[str, Any]:
    return {
        "name": names.PODINFO_VOLUME,
        "downwardAPI": {
            "items": [{"path": names.PODINFO_ANNOTATIONS, "fieldRef": {"fieldPath": "metadata.annotations"}}]
        },
    }


def mutate_pod(pod: AnyPod, namespace: AnyNamespace, settings: WaiterSettings) -> Mutation:
    """The patch for a pod being created, or why there is none. The facts decide; the patch's
    paths index into the raw object's lists."""
    pod = pod_facts(pod)
    namespace = namespace_facts(namespace)
    decision = decide(pod, namespace, excluded_namespaces=settings.excluded_namespaces)
    if not decision.ours:
        return _waiter_removed(pod, decision.reason) or Unchanged(decision.reason)
    spec_obj = as_mapping(pod.raw.get("spec"))
    istio_init = _index_of(as_list(spec_obj.get("initContainers")), INIT_CONTAINER)

    args: list[str] | None = None
    spec: RedirectSpec | None = None
    if pod.istio_init is not None:
        args = istio_init_args(pod.istio_init)
        try:
            spec = spec_from_pod(_before(pod), namespace)
        except SpecError as exc:
            return Denied(f"{names.WAITER_CONTAINER} cannot replace {INIT_CONTAINER}: {exc}")
        try:
            kept: RedirectSpec | str = spec_from_pod(_after(pod, args), namespace)
        except SpecError as exc:
            kept = str(exc)
        if kept != spec:
            return Denied(
                f"{INIT_CONTAINER}'s arguments would not mean the same once kept in {names.IPTABLES_ARGS} "
                f"({kept if isinstance(kept, str) else 'a different spec'}); please report this"
            )
    else:
        try:
            spec = spec_from_pod(pod, namespace)
        except SpecError:
            spec = None  # admitted: the agent reports it on the pod, and it can be fixed in place

    if names.WAITER_CONTAINER in pod.container_names:
        return Denied(
            f"the container name {names.WAITER_CONTAINER} is reserved for the waiting init container "
            "this webhook injects; please rename the application container"
        )
    taken = _proxy_ids(spec, pod, namespace)
    ids = waiter_ids_for(settings, pod, namespace, taken)
    if isinstance(ids, Denied):
        return ids
    waiter = waiter_container(settings, run_as=ids[0], run_as_group=ids[1])

    ops: JsonPatch = []
    done: list[str] = []
    if args is not None:
        annotations = as_mapping(pod.raw.get("metadata")).get("annotations")
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
        done.append(f"replaced {INIT_CONTAINER} (its arguments kept in {names.IPTABLES_ARGS})")
    ops += _init_container_ops(spec_obj.get("initContainers"), istio_init, waiter, taken, done)
    ops += _volume_ops(spec_obj.get("volumes"), done)
    if not ops:
        return Unchanged(f"already has {names.WAITER_CONTAINER}")
    return Patch(tuple(ops), "; ".join(done) + f" ({decision.reason})")


def _waiter_removed(pod: PodFacts, reason: str) -> Patch | None:
    """A waiter in a pod that is not ours is removed: the agent never marks such a pod, so the
    waiter would hold it until its timeout. This happens when an earlier call of this webhook saw
    a pod that looked like a sidecar's and a later injector made it something else: Istio's
    gateway chart asks for ``istio-proxy`` with ``image: auto`` and no arguments, which Istio's
    injector fills in with ``proxy router`` only after a webhook called before it saw the pod.
    The podinfo volume goes too, if it is exactly ours and nothing else mounts it."""
    spec_obj = as_mapping(pod.raw.get("spec"))
    inits = as_list(spec_obj.get("initContainers"))
    named = [i for i, c in enumerate(inits) if as_mapping(c).get("name") == names.WAITER_CONTAINER]
    if not named:
        return None
    ops: JsonPatch = [
        {"op": "remove", "path": f"/spec/initContainers/{i}"} for i in sorted(named, reverse=True)
    ]
    kept = [c for i, c in enumerate(inits) if i not in named] + as_list(spec_obj.get("containers"))
    mounted = any(
        as_mapping(m).get("name") == names.PODINFO_VOLUME
        for c in kept
        for m in as_list(as_mapping(c).get("volumeMounts"))
    )
    volumes = as_list(spec_obj.get("volumes"))
    if not mounted:
        ops += [
            {"op": "remove", "path": f"/spec/volumes/{i}"}
            for i in reversed(range(len(volumes)))
            if as_mapping(volumes[i]).get("name") == names.PODINFO_VOLUME and is_our_volume(volumes[i])
        ]
    return Patch(tuple(ops), f"removed {names.WAITER_CONTAINER}: the pod is not ours ({reason})")


def _init_container_ops(
    inits: Any, istio_init: int | None, waiter: Mapping[str, Any], taken: Collection[int], done: list[str]
) -> JsonPatch:
    """Remove istio-init and every impostor of the waiter, then put ours first (unless it is)."""
    if not isinstance(inits, list):
        done.append(f"added {names.WAITER_CONTAINER} first")
        return [{"op": "add", "path": "/spec/initContainers", "value": [waiter]}]
    keep = bool(inits) and is_our_waiter(inits[0], waiter, taken=taken)
    named = [i for i, c in enumerate(inits) if as_mapping(c).get("name") == names.WAITER_CONTAINER]
    impostors = [i for i in named if not (keep and i == 0)]
    gone = sorted({*impostors, *([istio_init] if istio_init is not None else [])}, reverse=True)
    ops: JsonPatch = [{"op": "remove", "path": f"/spec/initContainers/{i}"} for i in gone]
    if impostors:
        done.append(f"replaced an {names.WAITER_CONTAINER} that was not ours")
    if not keep:
        ops.append({"op": "add", "path": "/spec/initContainers/0", "value": dict(waiter)})
        if not impostors:
            done.append(f"added {names.WAITER_CONTAINER} first")
    return ops


def _volume_ops(volumes: Any, done: list[str]) -> JsonPatch:
    """Keep one podinfo volume that is exactly ours; remove any other of that name; add ours."""
    if not isinstance(volumes, list):
        done.append(f"added volume {names.PODINFO_VOLUME}")
        return [{"op": "add", "path": "/spec/volumes", "value": [podinfo_volume()]}]
    named = [i for i, v in enumerate(volumes) if as_mapping(v).get("name") == names.PODINFO_VOLUME]
    keep = next((i for i in named if is_our_volume(volumes[i])), None)
    ops: JsonPatch = [
        {"op": "remove", "path": f"/spec/volumes/{i}"} for i in sorted(named, reverse=True) if i != keep
    ]
    if keep is None:
        ops.append({"op": "add", "path": "/spec/volumes/-", "value": podinfo_volume()})
        done.append(f"{'replaced' if named else 'added'} volume {names.PODINFO_VOLUME}")
    elif ops:
        done.append(f"removed extra volumes named {names.PODINFO_VOLUME}")
    return ops
