"""Build a redirect spec from a pod (and optionally its namespace), the way Istio would.

Three sources, in order of precedence:
1. ``pod-network-controller.istio.io/iptables-args``: the injected istio-init's args, kept by our
   webhook when it removed that container;
2. an injected ``istio-init`` init container: its args are the spec (we do exactly what it would);
3. otherwise Istio CNI's semantics: sidecar defaults, ``traffic.sidecar.istio.io/*`` and
   ``sidecar.istio.io/interceptionMode`` annotations, the proxy's UID/GID and env.
IPv6 is on when the pod has an IPv6 address.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence

from .. import names
from ..bounded import BoundedJsonError, loads_bounded, utf8_size
from ..podfacts import (
    MAX_ID,
    PROXY_CONTAINER,
    AnyNamespace,
    AnyPod,
    Container,
    NamespaceFacts,
    PodFacts,
    RunAs,
    namespace_facts,
    pod_facts,
)
from . import values as v
from .errors import SpecError, check_limit
from .flags import check_arg_count, owner_groups_from, parse_flags
from .limits import (
    MAX_ANNOTATION_VALUE_BYTES,
    MAX_IPTABLES_ARGS_ANNOTATION_BYTES,
    MAX_IPTABLES_ARGS_DEPTH,
)
from .model import DEFAULT_PROXY_UID, InterceptionMode, RedirectSpec

ISTIO_IPTABLES = "istio-iptables"

ANN_IPTABLES_ARGS = names.IPTABLES_ARGS
ANN_INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
ANN_INCLUDE_CIDRS = "traffic.sidecar.istio.io/includeOutboundIPRanges"
ANN_EXCLUDE_CIDRS = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
ANN_INCLUDE_INBOUND = "traffic.sidecar.istio.io/includeInboundPorts"
ANN_EXCLUDE_INBOUND = "traffic.sidecar.istio.io/excludeInboundPorts"
ANN_INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
ANN_EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
ANN_EXCLUDE_INTERFACES = "traffic.sidecar.istio.io/excludeInterfaces"
ANN_KUBEVIRT_INTERFACES = "traffic.sidecar.istio.io/kubevirtInterfaces"
ANN_REROUTE_VIRTUAL_INTERFACES = "istio.io/reroute-virtual-interfaces"
ANN_OPENSHIFT_UID_RANGE = "openshift.io/sa.scc.uid-range"

ENV_DNS_CAPTURE = "ISTIO_META_DNS_CAPTURE"
ENV_INVALID_DROP = "INVALID_DROP"
ENV_DISABLE_ENVOY = "DISABLE_ENVOY"

# Istio CNI's fixed inbound exclusions (status, health, Prometheus) and default outbound one.
ALWAYS_EXCLUDED_INBOUND = (15020, 15021, 15090)
DEFAULT_EXCLUDED_OUTBOUND = "15020"

# Every annotation that shapes the rules: the agent re-plans a pod when one of them changes.
TRAFFIC_ANNOTATIONS = (
    ANN_IPTABLES_ARGS,
    ANN_INTERCEPTION_MODE,
    ANN_INCLUDE_CIDRS,
    ANN_EXCLUDE_CIDRS,
    ANN_INCLUDE_INBOUND,
    ANN_EXCLUDE_INBOUND,
    ANN_INCLUDE_OUTBOUND_PORTS,
    ANN_EXCLUDE_OUTBOUND_PORTS,
    ANN_EXCLUDE_INTERFACES,
    ANN_KUBEVIRT_INTERFACES,
    ANN_REROUTE_VIRTUAL_INTERFACES,
)


def envoy_disabled(proxy: Container) -> bool:
    """``DISABLE_ENVOY`` set true on the proxy (proxyless gRPC): no Envoy, nothing to redirect to."""
    value = proxy.env.get(ENV_DISABLE_ENVOY, "")
    try:
        return v.parse_bool(ENV_DISABLE_ENVOY, value) if value.strip() else False
    except SpecError:
        return False  # as Istio's CNI plugin, which ignores a value it cannot parse


def _has_ipv6(ips: Sequence[str]) -> bool:
    for ip in ips:
        try:
            if ipaddress.ip_address(ip).version == 6:
                return True
        except ValueError:
            continue
    return False


def spec_from_pod(pod: AnyPod, namespace: AnyNamespace = None) -> RedirectSpec:
    """Pod -> spec, for a pod in scope (``decide.scope_problem`` says which are).
    Raises SpecError naming the annotation or flag."""
    facts = pod_facts(pod)
    ns = namespace_facts(namespace)
    annotations = facts.annotations
    if ANN_IPTABLES_ARGS in annotations:
        args = _args_from_annotation(annotations[ANN_IPTABLES_ARGS])
        spec = _from_istio_iptables_args(args, where=f"annotation {ANN_IPTABLES_ARGS}", env={})
    elif facts.istio_init is not None:
        init = facts.istio_init
        spec = _from_istio_iptables_args(init.args, where="istio-init args", env=init.env)
    else:
        spec = _from_cni_semantics(facts, ns)
    if not spec.ipv6 and _has_ipv6(facts.ips):
        spec = dataclasses.replace(spec, ipv6=True)
    return spec


def _args_from_annotation(text: str) -> list[str]:
    """The annotation's JSON list of strings; its size is checked before it is decoded, and a
    list nested in it is refused before decoding too (the decoder then never recurses)."""
    check_limit(ANN_IPTABLES_ARGS, utf8_size(text), "bytes", MAX_IPTABLES_ARGS_ANNOTATION_BYTES)
    try:
        args = loads_bounded(
            text,
            max_bytes=MAX_IPTABLES_ARGS_ANNOTATION_BYTES,
            max_depth=MAX_IPTABLES_ARGS_DEPTH,
            what="the value",
        )
    except BoundedJsonError as exc:
        raise SpecError(ANN_IPTABLES_ARGS, text, f"not a JSON list of strings: {exc}") from None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpecError(ANN_IPTABLES_ARGS, text, "not a JSON list of strings")
    return args


def _from_istio_iptables_args(args: Sequence[str], *, where: str, env: Mapping[str, str]) -> RedirectSpec:
    """The spec istio-iptables would build from ``args`` (the program name first, or not)."""
    check_arg_count(where, args)
    args = list(args)
    if args and args[0] == ISTIO_IPTABLES:
        args = args[1:]
    try:
        spec = parse_flags(args)
        # istio-iptables takes these defaults from its own environment.
        if ENV_DNS_CAPTURE in env and not any(a.startswith("--redirect-dns") for a in args):
            spec = dataclasses.replace(spec, redirect_dns=v.parse_bool(ENV_DNS_CAPTURE, env[ENV_DNS_CAPTURE]))
        if ENV_INVALID_DROP in env and not any(a.startswith("--drop-invalid") for a in args):
            spec = dataclasses.replace(
                spec, drop_invalid=v.parse_bool(ENV_INVALID_DROP, env[ENV_INVALID_DROP])
            )
    except SpecError as exc:
        raise exc.within(where) from None
    if spec.redirect_dns and not spec.capture_all_dns and not (spec.dns_servers_v4 or spec.dns_servers_v6):
        # istio-iptables would read the pod's /etc/resolv.conf, which the node agent cannot see:
        # capture all port-53 traffic instead, as Istio's CNI plugin does.
        spec = dataclasses.replace(spec, capture_all_dns=True)
    return spec


def _proxy_id(run_as: RunAs, key: str) -> int | None:
    """The proxy's runAsUser/runAsGroup (its container's, else the pod's), validated like any
    input: a value that is not an ID is an error, never a silent default."""
    if run_as.value is None:
        return None
    if run_as.id is None:
        where = "pod" if run_as.from_pod else PROXY_CONTAINER
        raise SpecError(
            f"{where} securityContext.{key}", run_as.value, f"must be a whole number from 0 to {MAX_ID}"
        )
    return run_as.id


def _openshift_uid_range_start(namespace: NamespaceFacts | None) -> int | None:
    """OpenShift's restricted SCCs run a container without runAsUser as the first UID of the
    namespace's range (``openshift.io/sa.scc.uid-range: 1000620000/10000``)."""
    raw = None if namespace is None else namespace.annotations.get(ANN_OPENSHIFT_UID_RANGE)
    if raw is None:
        return None
    check_limit(ANN_OPENSHIFT_UID_RANGE, utf8_size(raw), "bytes", MAX_ANNOTATION_VALUE_BYTES)
    start, _, _ = raw.partition("/")
    return v.parse_int(ANN_OPENSHIFT_UID_RANGE, start, low=1, high=MAX_ID, what="a UID")


def _from_cni_semantics(pod: PodFacts, namespace: NamespaceFacts | None) -> RedirectSpec:
    ann = pod.annotations

    def get(key: str, default: str) -> str:
        value = ann.get(key, default)
        check_limit(key, utf8_size(value), "bytes", MAX_ANNOTATION_VALUE_BYTES)
        return value

    mode_text = get(ANN_INTERCEPTION_MODE, "REDIRECT")
    try:
        mode = InterceptionMode(mode_text)
    except ValueError:
        raise SpecError(ANN_INTERCEPTION_MODE, mode_text, "interception mode is REDIRECT or TPROXY") from None

    # Out of scope pods have no proxy (``rules --pod`` still checks their annotations): the pod's IDs.
    runs_as = pod.proxy or pod
    uid = _proxy_id(runs_as.run_as_user, "runAsUser")
    if uid is None:
        uid = _openshift_uid_range_start(namespace)
    gid = _proxy_id(runs_as.run_as_group, "runAsGroup")
    proxy_uid = uid if uid else DEFAULT_PROXY_UID  # 0 or unset: the default proxy UID
    proxy_gid = gid if gid else DEFAULT_PROXY_UID

    excluded_inbound = v.parse_ports_no_wildcard(ANN_EXCLUDE_INBOUND, get(ANN_EXCLUDE_INBOUND, ""))
    excluded_inbound = v.Ports(dict.fromkeys((*excluded_inbound, *ALWAYS_EXCLUDED_INBOUND)))

    if ANN_REROUTE_VIRTUAL_INTERFACES in ann:
        virtual = v.parse_interfaces(ANN_REROUTE_VIRTUAL_INTERFACES, get(ANN_REROUTE_VIRTUAL_INTERFACES, ""))
    else:
        virtual = v.parse_interfaces(ANN_KUBEVIRT_INTERFACES, get(ANN_KUBEVIRT_INTERFACES, ""))

    env = pod.proxy.env if pod.proxy is not None else {}
    dns = (
        v.parse_bool(f"{PROXY_CONTAINER} env {ENV_DNS_CAPTURE}", env[ENV_DNS_CAPTURE])
        if ENV_DNS_CAPTURE in env
        else False
    )
    drop = (
        v.parse_bool(f"{PROXY_CONTAINER} env {ENV_INVALID_DROP}", env[ENV_INVALID_DROP])
        if ENV_INVALID_DROP in env
        else False
    )

    return RedirectSpec(
        proxy_uids=(proxy_uid,),
        proxy_gids=(proxy_gid,),
        mode=mode,
        inbound_ports=v.parse_port_selection(ANN_INCLUDE_INBOUND, get(ANN_INCLUDE_INBOUND, "*")),
        inbound_ports_exclude=excluded_inbound,
        outbound_cidrs=v.parse_cidr_selection(ANN_INCLUDE_CIDRS, get(ANN_INCLUDE_CIDRS, "*")),
        outbound_cidrs_exclude=v.parse_cidrs(ANN_EXCLUDE_CIDRS, get(ANN_EXCLUDE_CIDRS, "")),
        outbound_ports_include=v.parse_ports_no_wildcard(
            ANN_INCLUDE_OUTBOUND_PORTS, get(ANN_INCLUDE_OUTBOUND_PORTS, "")
        ),
        outbound_ports_exclude=v.parse_ports_no_wildcard(
            ANN_EXCLUDE_OUTBOUND_PORTS, get(ANN_EXCLUDE_OUTBOUND_PORTS, DEFAULT_EXCLUDED_OUTBOUND)
        ),
        reroute_virtual_interfaces=virtual,
        exclude_interfaces=v.parse_interfaces(ANN_EXCLUDE_INTERFACES, get(ANN_EXCLUDE_INTERFACES, "")),
        redirect_dns=dns,
        capture_all_dns=dns,
        drop_invalid=drop,
        owner_groups=owner_groups_from("*", "", include_field="", exclude_field=""),
    )
