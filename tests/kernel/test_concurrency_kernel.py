"""Many namespaces programmed at once: none fails on the xtables lock, each ends up correct, and
one namespace is never programmed by two workers at the same time."""

from __future__ import annotations

import ipaddress
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ipnc_dev.netlab import Netlab
from istio_pod_network_controller.node import tables
from istio_pod_network_controller.node.apply import Applier
from istio_pod_network_controller.node.backend import Family, Tools
from istio_pod_network_controller.node.netns import Netns, NetnsId

from .conftest import ruleset

pytestmark = pytest.mark.kernel

NAMESPACES = 50
WORKERS = 8
ELSEWHERE = "192.0.2.10"


class OverlapWatch:
    """A step hook recording whether two applies ever held the same namespace at once."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.active: set[NetnsId] = set()
        self.overlaps: list[NetnsId] = []
        self.applies = 0

    def __call__(self, step: str, ns: Netns) -> None:
        with self.guard:
            if step == "start":
                if ns.id in self.active:
                    self.overlaps.append(ns.id)
                self.active.add(ns.id)
                self.applies += 1
            elif step == "done":
                self.active.discard(ns.id)


def test_fifty_namespaces_by_eight_workers_are_all_correct(lab: Netlab, backend_tools: Tools) -> None:
    net = ipaddress.ip_network("10.251.0.0/24")
    paths = [lab.add_isolated(f"n{i}", f"{net[i + 2]}/24") for i in range(NAMESPACES)]
    handles = [Netns(p) for p in paths]
    watch = OverlapWatch()
    applier = Applier(backend_tools, on_step=watch)
    first, second = ruleset("-o", "9999"), ruleset()
    try:
        # Every namespace three times: once with one ruleset, then twice in a row with another, so
        # that two workers pick up the same namespace together and the lock must serialise them.
        jobs = [(ns, first) for ns in handles] + [(ns, second) for ns in handles for _ in range(2)]
        with ThreadPoolExecutor(WORKERS) as pool:
            results = list(pool.map(lambda job: applier.apply(*job), jobs))
        assert watch.overlaps == []
        assert watch.applies == 3 * NAMESPACES
        assert len({r.inode for r in results}) == NAMESPACES

        # The reference: the same ruleset applied alone, by another applier, into another namespace.
        with Netns(lab.add_isolated("reference", "10.251.0.250/24")) as reference:
            Applier(backend_tools).apply(reference, second)
            expected = tables.owned(
                tables.parse_save(reference.run(backend_tools.save_argv(Family.IPV4)).stdout)
            )
        assert not expected.is_empty()
        for ns in handles:
            saved = ns.run(backend_tools.save_argv(Family.IPV4))
            assert tables.owned(tables.parse_save(saved.stdout)).same_rules(expected), ns.path

        # Real traffic in every namespace: an app's connect is redirected to that namespace's stub.
        lab.stub_proxy(paths, tcp=(15001,))
        client = lab.probe(paths, user=None)
        for index in range(NAMESPACES):
            answer = client.tcp(ELSEWHERE, 80, ns=index)
            assert answer["ok"], answer
            reply = answer["reply"]
            assert isinstance(reply, dict)
            assert (reply["netns"], reply["port"], reply["orig"]) == (index, 15001, [ELSEWHERE, 80])
    finally:
        for ns in handles:
            ns.close()


def test_a_second_apply_to_the_same_namespace_waits_for_the_first(lab: Netlab, nft_tools: Tools) -> None:
    order: list[str] = []
    first_inside = threading.Event()
    release = threading.Event()

    def hold_first(step: str, ns: Netns) -> None:
        if step == "start":
            order.append(threading.current_thread().name + " start")
            if threading.current_thread().name == "first":
                first_inside.set()
                assert release.wait(30)
        elif step == "done":
            order.append(threading.current_thread().name + " done")

    applier = Applier(nft_tools, on_step=hold_first)
    with Netns(lab.add_netns("shared")) as ns:
        one = threading.Thread(target=applier.apply, args=(ns, ruleset()), name="first")
        two = threading.Thread(target=applier.apply, args=(ns, ruleset("-o", "9999")), name="second")
        one.start()
        try:
            assert first_inside.wait(30)
            two.start()
            # The second is queued on the namespace's lock, not running beside the first.
            while applier.locks.waiting(ns.id) < 2:
                assert two.is_alive()
                threading.Event().wait(0.001)
            threading.Event().wait(0.05)  # room for a broken lock to let the second in
            assert order == ["first start"]
        finally:
            release.set()
            one.join(30)
            two.join(30)
    assert order == ["first start", "first done", "second start", "second done"]
