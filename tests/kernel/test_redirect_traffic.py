"""Real traffic through rules the node side applied: a pod namespace with an app (UID 1000) and a
stub proxy (UID 1337), a peer pod on the same bridge, and random tokens in every exchange."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ipnc_dev.netlab import APP_UID, PROXY_UID, Netlab, Pod, Probe
from istio_pod_network_controller.node.apply import Applier, ApplyResult
from istio_pod_network_controller.node.backend import Tools
from istio_pod_network_controller.node.netns import Netns
from istio_pod_network_controller.render import Ruleset

from .conftest import ruleset

pytestmark = pytest.mark.kernel

# Never reached: either redirected inside the pod or dropped in the lab's node namespace.
ELSEWHERE = {4: "192.0.2.10", 6: "2001:db8::10"}
CLUSTER_DNS = {4: "10.96.0.10", 6: "fd00:96::10"}
FAMILIES = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]


@dataclass
class World:
    lab: Netlab
    pod: Pod
    peer: Pod
    ns: Netns
    applier: Applier
    app: Probe  # the pod's application, UID 1000
    proxy: Probe  # the pod's proxy, UID 1337
    outside: Probe  # a client in the peer pod

    def apply(self, rules: Ruleset) -> ApplyResult:
        return self.applier.apply(self.ns, rules)


def at(pod: Pod, family: int) -> str:
    address = pod.ipv4 if family == 4 else pod.ipv6
    assert address is not None
    return address


def served(answer: dict[str, object]) -> dict[str, object]:
    assert answer.get("ok"), f"no reply: {answer.get('error')}"
    reply = answer["reply"]
    assert isinstance(reply, dict)
    return reply


@pytest.fixture
def world(lab: Netlab, applier: Applier) -> Iterator[World]:
    pod, peer = lab.add_pod("pod"), lab.add_pod("peer")
    lab.stub_proxy([pod.path], tcp=(15001, 15006, 15053), udp=(15053,), transparent=(15006,))
    lab.stub_proxy([pod.path], name="app", tcp=(8080, 9090, 15020, 15021, 15090), user=APP_UID)
    lab.stub_proxy([peer.path], name="peer", tcp=(8080, 9090, 53), udp=(53,), user=None)
    app = lab.probe([pod.path], user=APP_UID)
    proxy = lab.probe([pod.path], user=PROXY_UID)
    outside = lab.probe([peer.path], user=None)
    with Netns(pod.path) as ns:
        yield World(lab, pod, peer, ns, applier, app, proxy, outside)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_rules_nothing_is_redirected(world: World, family: int) -> None:
    assert served(world.app.tcp(at(world.peer, family), 8080))["server"] == "peer"
    assert served(world.outside.tcp(at(world.pod, family), 8080))["server"] == "app"


@pytest.mark.parametrize("family", FAMILIES)
def test_app_outbound_tcp_to_any_address_reaches_15001_with_original_destination(
    world: World, family: int
) -> None:
    world.apply(ruleset("--ipv6"))
    peer = at(world.peer, family)
    for host, port in [(ELSEWHERE[family], 80), (peer, 8080), (peer, 9090)]:
        reply = served(world.app.tcp(host, port))
        assert (reply["server"], reply["port"]) == ("proxy", 15001)
        assert reply["orig"] == [host, port]


def test_redirect_works_with_each_backend(world: World, backend_tools: Tools) -> None:
    Applier(backend_tools).apply(world.ns, ruleset())
    reply = served(world.app.tcp(ELSEWHERE[4], 80))
    assert (reply["port"], reply["orig"]) == (15001, [ELSEWHERE[4], 80])


@pytest.mark.parametrize("family", FAMILIES)
def test_proxy_own_outbound_is_not_redirected(world: World, family: int) -> None:
    world.apply(ruleset("--ipv6"))
    reply = served(world.proxy.tcp(at(world.peer, family), 8080))
    assert reply["server"] == "peer"
    assert reply["uid"] != PROXY_UID  # answered by the peer's server, not our stub
    assert not world.proxy.tcp(ELSEWHERE[family], 80, timeout=0.5)["ok"]


@pytest.mark.parametrize("family", FAMILIES)
def test_inbound_to_application_port_arrives_at_15006_with_original_port(world: World, family: int) -> None:
    world.apply(ruleset("--ipv6"))
    reply = served(world.outside.tcp(at(world.pod, family), 8080))
    assert (reply["server"], reply["port"]) == ("proxy", 15006)
    assert reply["orig"] == [at(world.pod, family), 8080]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("port", [15020, 15021, 15090])
def test_excluded_inbound_port_is_not_redirected(world: World, family: int, port: int) -> None:
    world.apply(ruleset("--ipv6"))
    reply = served(world.outside.tcp(at(world.pod, family), port))
    assert (reply["server"], reply["port"]) == ("app", port)


@pytest.mark.parametrize("family", FAMILIES)
def test_excluded_outbound_port_is_not_redirected(world: World, family: int) -> None:
    world.apply(ruleset("--ipv6", "-o", "9090"))
    assert served(world.app.tcp(at(world.peer, family), 9090))["server"] == "peer"
    assert served(world.app.tcp(at(world.peer, family), 8080))["port"] == 15001


@pytest.mark.parametrize("family", FAMILIES)
def test_excluded_outbound_cidr_is_not_redirected(world: World, family: int) -> None:
    world.apply(ruleset("--ipv6", "-x", f"{world.peer.ipv4}/32,{world.peer.ipv6}/128"))
    assert served(world.app.tcp(at(world.peer, family), 8080))["server"] == "peer"
    assert served(world.app.tcp(ELSEWHERE[family], 80))["port"] == 15001


@pytest.mark.parametrize("family", FAMILIES)
def test_only_included_outbound_cidrs_are_redirected(world: World, family: int) -> None:
    world.apply(ruleset("--ipv6", "-i", "192.0.2.0/24,2001:db8::/32"))
    assert served(world.app.tcp(ELSEWHERE[family], 80))["port"] == 15001
    assert served(world.app.tcp(at(world.peer, family), 8080))["server"] == "peer"


@pytest.mark.parametrize("family", FAMILIES)
def test_dns_capture_sends_udp_and_tcp_port_53_to_15053(world: World, family: int) -> None:
    world.apply(ruleset("--ipv6", "--redirect-dns", "--capture-all-dns"))
    server = CLUSTER_DNS[family]
    over_udp = served(world.app.udp(server, 53))
    assert (over_udp["server"], over_udp["proto"], over_udp["port"]) == ("proxy", "udp", 15053)
    assert over_udp["sender"] == [server, 53]  # the reply is un-NATed back to the server's address
    over_tcp = served(world.app.tcp(server, 53))
    assert (over_tcp["server"], over_tcp["port"], over_tcp["orig"]) == ("proxy", 15053, [server, 53])
    # The proxy's own upstream queries go out.
    assert served(world.proxy.udp(at(world.peer, family), 53))["server"] == "peer"


def test_dns_capture_of_listed_servers_leaves_other_servers_alone(world: World) -> None:
    world.apply(ruleset("--redirect-dns", "--dns-servers-v4", CLUSTER_DNS[4]))
    assert served(world.app.udp(CLUSTER_DNS[4], 53))["port"] == 15053
    assert served(world.app.udp(world.peer.ipv4, 53))["server"] == "peer"


@pytest.mark.parametrize("family", FAMILIES)
def test_tproxy_delivers_inbound_to_15006_with_destination_intact(world: World, family: int) -> None:
    world.apply(ruleset("--ipv6", "-m", "TPROXY"))
    reply = served(world.outside.tcp(at(world.pod, family), 8080))
    assert (reply["server"], reply["port"]) == ("proxy", 15006)
    # TPROXY does not NAT: the proxy's socket is bound to the original destination itself.
    assert reply["local"] == [at(world.pod, family), 8080]
    assert served(world.outside.tcp(at(world.pod, family), 15021))["server"] == "app"
    assert served(world.app.tcp(ELSEWHERE[family], 80))["port"] == 15001


def test_switching_from_tproxy_back_to_redirect_removes_the_policy_route(world: World) -> None:
    world.apply(ruleset("-m", "TPROXY"))
    assert "133" in world.ns.run(["ip", "rule", "show"]).stdout
    world.apply(ruleset())
    assert "lookup 133" not in world.ns.run(["ip", "rule", "show"]).stdout
    assert world.ns.run(["ip", "route", "show", "table", "133"]).stdout.strip() == ""
    reply = served(world.outside.tcp(world.pod.ipv4, 8080))
    assert (reply["port"], reply["orig"]) == (15006, [world.pod.ipv4, 8080])
