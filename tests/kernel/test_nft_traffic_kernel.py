"""Real traffic through native nftables rules the node side applied: the same pod (an app as UID
1000, a stub proxy as UID 1337), peer and random tokens as tests/kernel/test_redirect_traffic.py,
with the rules written by NftApplier instead of iptables."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ipnc_dev.netlab import APP_UID, PROXY_UID, Netlab, Pod, Probe
from istio_pod_network_controller.node.apply import ApplyResult
from istio_pod_network_controller.node.errors import NodeError
from istio_pod_network_controller.node.netns import Netns
from istio_pod_network_controller.node.nft import LibRunner, NftApplier, ProcessRunner, Runner
from istio_pod_network_controller.spec import parse_flags

from .conftest import SIDECAR, _needs_root
from .test_redirect_traffic import CLUSTER_DNS, ELSEWHERE, FAMILIES, at, served

pytestmark = pytest.mark.kernel


def runners() -> list[object]:
    found: list[object] = [pytest.param(ProcessRunner, id="nft-binary")]
    try:
        LibRunner()
    except NodeError:  # not installed here: only the binary is tested
        return found
    return [pytest.param(LibRunner, id="libnftables"), *found]


@dataclass
class World:
    lab: Netlab
    pod: Pod
    peer: Pod
    ns: Netns
    applier: NftApplier
    app: Probe
    proxy: Probe
    outside: Probe

    def apply(self, *extra: str) -> ApplyResult:
        """Apply the default sidecar flags plus ``extra`` (later flags win), as the agent would."""
        return self.applier.apply(self.ns, self.applier.render(parse_flags([*SIDECAR, *extra])))


@pytest.fixture(params=runners())
def world(request: pytest.FixtureRequest, lab: Netlab) -> Iterator[World]:
    _needs_root()
    runner: Runner = request.param()
    pod, peer = lab.add_pod("pod"), lab.add_pod("peer")
    lab.stub_proxy([pod.path], tcp=(15001, 15006, 15053), udp=(15053,), transparent=(15006,))
    lab.stub_proxy([pod.path], name="app", tcp=(8080, 9090, 15020, 15021, 15090), user=APP_UID)
    lab.stub_proxy([peer.path], name="peer", tcp=(8080, 9090, 53), udp=(53,), user=None)
    app = lab.probe([pod.path], user=APP_UID)
    proxy = lab.probe([pod.path], user=PROXY_UID)
    outside = lab.probe([peer.path], user=None)
    with Netns(pod.path) as ns:
        yield World(lab, pod, peer, ns, NftApplier(runner), app, proxy, outside)


def tables_in(world: World) -> str:
    listed = world.ns.run(["nft", "list", "tables"])
    assert listed.ok, listed.reason()
    return listed.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_app_outbound_tcp_to_any_address_reaches_15001_with_original_destination(
    world: World, family: int
) -> None:
    result = world.apply("--ipv6")
    assert (result.mode, result.changed) == ("nftables", True)
    assert "table inet istio-proxy-nat" in tables_in(world)
    peer = at(world.peer, family)
    for host, port in [(ELSEWHERE[family], 80), (peer, 8080), (peer, 9090)]:
        reply = served(world.app.tcp(host, port))
        assert (reply["server"], reply["port"]) == ("proxy", 15001)
        assert reply["orig"] == [host, port]


def test_no_iptables_rule_is_written(world: World) -> None:
    world.apply("--ipv6", "-m", "TPROXY", "--redirect-dns")
    for save in ("iptables-nft-save", "ip6tables-nft-save"):
        saved = world.ns.run([save])
        assert saved.ok and "ISTIO" not in saved.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_proxy_own_outbound_is_not_redirected(world: World, family: int) -> None:
    world.apply("--ipv6")
    reply = served(world.proxy.tcp(at(world.peer, family), 8080))
    assert reply["server"] == "peer"
    assert reply["uid"] != PROXY_UID
    assert not world.proxy.tcp(ELSEWHERE[family], 80, timeout=0.5)["ok"]


@pytest.mark.parametrize("family", FAMILIES)
def test_inbound_to_application_port_arrives_at_15006_with_original_port(world: World, family: int) -> None:
    world.apply("--ipv6")
    reply = served(world.outside.tcp(at(world.pod, family), 8080))
    assert (reply["server"], reply["port"]) == ("proxy", 15006)
    assert reply["orig"] == [at(world.pod, family), 8080]


@pytest.mark.parametrize("family", FAMILIES)
def test_excluded_inbound_ports_are_not_redirected(world: World, family: int) -> None:
    world.apply("--ipv6", "-d", "15090,15021,15020")
    for port in (15020, 15021, 15090):
        reply = served(world.outside.tcp(at(world.pod, family), port))
        assert (reply["server"], reply["port"]) == ("app", port)


@pytest.mark.parametrize("family", FAMILIES)
def test_excluded_outbound_port_and_cidr_are_not_redirected(world: World, family: int) -> None:
    world.apply("--ipv6", "-o", "9090", "-x", f"{world.peer.ipv4}/32,{world.peer.ipv6}/128")
    assert served(world.app.tcp(at(world.peer, family), 9090))["server"] == "peer"
    assert served(world.app.tcp(at(world.peer, family), 8080))["server"] == "peer"
    assert served(world.app.tcp(ELSEWHERE[family], 80))["port"] == 15001


@pytest.mark.parametrize("family", FAMILIES)
def test_only_included_outbound_cidrs_are_redirected(world: World, family: int) -> None:
    world.apply("--ipv6", "-i", "192.0.2.0/24,2001:db8::/32")
    assert served(world.app.tcp(ELSEWHERE[family], 80))["port"] == 15001
    assert served(world.app.tcp(at(world.peer, family), 8080))["server"] == "peer"


@pytest.mark.parametrize("family", FAMILIES)
def test_dns_capture_sends_udp_and_tcp_port_53_to_15053(world: World, family: int) -> None:
    world.apply("--ipv6", "--redirect-dns", "--capture-all-dns")
    assert "table inet istio-proxy-raw" in tables_in(world)
    server = CLUSTER_DNS[family]
    over_udp = served(world.app.udp(server, 53))
    assert (over_udp["server"], over_udp["proto"], over_udp["port"]) == ("proxy", "udp", 15053)
    assert over_udp["sender"] == [server, 53]
    over_tcp = served(world.app.tcp(server, 53))
    assert (over_tcp["server"], over_tcp["port"], over_tcp["orig"]) == ("proxy", 15053, [server, 53])
    assert served(world.proxy.udp(at(world.peer, family), 53))["server"] == "peer"


def test_dns_capture_of_listed_servers_leaves_other_servers_alone(world: World) -> None:
    world.apply("--redirect-dns", "--dns-servers-v4", CLUSTER_DNS[4])
    assert served(world.app.udp(CLUSTER_DNS[4], 53))["port"] == 15053
    assert served(world.app.udp(world.peer.ipv4, 53))["server"] == "peer"


@pytest.mark.parametrize("family", FAMILIES)
def test_tproxy_delivers_inbound_to_15006_with_destination_intact(world: World, family: int) -> None:
    world.apply("--ipv6", "-m", "TPROXY", "-d", "15021")
    assert "table inet istio-proxy-mangle" in tables_in(world)
    reply = served(world.outside.tcp(at(world.pod, family), 8080))
    assert (reply["server"], reply["port"]) == ("proxy", 15006)
    assert reply["local"] == [at(world.pod, family), 8080]  # no NAT: the original destination
    assert served(world.outside.tcp(at(world.pod, family), 15021))["server"] == "app"
    assert served(world.app.tcp(ELSEWHERE[family], 80))["port"] == 15001


def test_switching_from_tproxy_back_to_redirect_removes_the_policy_route_and_mangle(world: World) -> None:
    world.apply("--ipv6", "-m", "TPROXY")
    for flag in ("-4", "-6"):
        assert "lookup 133" in world.ns.run(["ip", flag, "rule", "show"]).stdout
    world.apply("--ipv6")
    for flag in ("-4", "-6"):
        assert "lookup 133" not in world.ns.run(["ip", flag, "rule", "show"]).stdout
        assert world.ns.run(["ip", flag, "route", "show", "table", "133"]).stdout.strip() == ""
    assert "istio-proxy-mangle" not in tables_in(world)
    reply = served(world.outside.tcp(world.pod.ipv4, 8080))
    assert (reply["port"], reply["orig"]) == (15006, [world.pod.ipv4, 8080])
