"""A spec written back as istio-iptables flags, so that it can be kept and rebuilt exactly.

The agent stores these flags in its detail annotation when it programs a sandbox. The rules
belong to that sandbox: after a restart the agent rebuilds them from here (through the same flag
parser every other input goes through), not from the pod's traffic annotations, which a tenant
may have changed since. ``parse_flags(to_args(spec)) == spec`` for every spec; the tests hold it.
"""

from __future__ import annotations

from .model import RedirectSpec


def _join(items: tuple[object, ...]) -> str:
    return ",".join(str(item) for item in items)


def to_args(spec: RedirectSpec) -> list[str]:
    """Every option, spelled ``--long-name=value``; booleans only when on."""
    inbound = "*" if spec.inbound_ports.wildcard else _join(spec.inbound_ports.ports)
    outbound = "*" if spec.outbound_cidrs.wildcard else _join(spec.outbound_cidrs.cidrs)
    args = [
        f"--envoy-port={spec.proxy_port}",
        f"--inbound-capture-port={spec.inbound_capture_port}",
        f"--inbound-tunnel-port={spec.inbound_tunnel_port}",
        f"--proxy-uid={_join(spec.proxy_uids)}",
        f"--proxy-gid={_join(spec.proxy_gids)}",
        f"--istio-inbound-interception-mode={spec.mode.value}",
        f"--istio-inbound-ports={inbound}",
        f"--istio-local-exclude-ports={_join(spec.inbound_ports_exclude)}",
        f"--istio-service-cidr={outbound}",
        f"--istio-service-exclude-cidr={_join(spec.outbound_cidrs_exclude)}",
        f"--istio-outbound-ports={_join(spec.outbound_ports_include)}",
        f"--istio-local-outbound-ports-exclude={_join(spec.outbound_ports_exclude)}",
        f"--kube-virt-interfaces={_join(spec.reroute_virtual_interfaces)}",
        f"--istio-exclude-interfaces={_join(spec.exclude_interfaces)}",
        f"--istio-inbound-tproxy-mark={spec.tproxy_mark}",
        f"--istio-inbound-tproxy-route-table={spec.tproxy_route_table}",
        f"--dns-servers-v4={','.join(s.text for s in spec.dns_servers_v4)}",
        f"--dns-servers-v6={','.join(s.text for s in spec.dns_servers_v6)}",
        f"--host-ipv4-loopback-cidr={spec.host_ipv4_loopback_cidr}",
    ]
    if spec.owner_groups.except_:
        args += ["--owner-groups-include=*", f"--owner-groups-exclude={_join(spec.owner_groups.values)}"]
    else:
        args.append(f"--owner-groups-include={_join(spec.owner_groups.values)}")
    for on, flag in (
        (spec.redirect_dns, "--redirect-dns"),
        (spec.capture_all_dns, "--capture-all-dns"),
        (spec.drop_invalid, "--drop-invalid"),
        (spec.ipv6, "--ipv6"),
    ):
        if on:
            args.append(flag)
    return args
