"""A mark the kubelet has not shown to the waiter is written again, a bounded number of times.

The decision (``refresh.refresh_step``) is pure and tested as such; the agent's part is tested by
reconciling a pod from the agent's store with a fake reporter and a fake clock: nothing here
reaches an API server or a kernel (the record's namespace is this process's own).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from typing import Any

import pytest

from istio_pod_network_controller import names
from istio_pod_network_controller.agent import After, Agent, AgentConfig, Outcome, Programmed, plan_from_mark
from istio_pod_network_controller.cluster.report import PodGone, PodRef, status_patch
from istio_pod_network_controller.node.apply import Applier
from istio_pod_network_controller.node.backend import Backend, Family, Tools
from istio_pod_network_controller.node.netns import netns_id_of
from istio_pod_network_controller.observe import Metrics, ReconcileResult
from istio_pod_network_controller.podfacts import pod_facts
from istio_pod_network_controller.refresh import (
    DETAIL_KEY,
    Leave,
    LookAgain,
    Nudge,
    RefreshPolicy,
    refresh_step,
)

POLICY = RefreshPolicy(first_after=2.0, factor=2.0, max_nudges=3)
OWN_NETNS = "/proc/self/ns/net"
UID = "0f6a3c52-1111-4222-8333-444455556666"
IP = "10.244.0.7"

# -- the decision ----------------------------------------------------------------------------


def test_a_waiter_that_is_not_running_needs_nothing() -> None:
    assert refresh_step(waiter_running=False, since_write=100.0, nudges=0, policy=POLICY) == Leave()


def test_before_the_first_wait_is_over_the_answer_is_when_to_look_again() -> None:
    step = refresh_step(waiter_running=True, since_write=0.5, nudges=0, policy=POLICY)
    assert step == LookAgain(1.5)


def test_a_waiter_still_running_after_the_wait_gets_a_nudge() -> None:
    assert refresh_step(waiter_running=True, since_write=2.0, nudges=0, policy=POLICY) == Nudge(1)
    assert refresh_step(waiter_running=True, since_write=30.0, nudges=1, policy=POLICY) == Nudge(2)


def test_each_wait_is_longer_than_the_one_before() -> None:
    assert [POLICY.wait_after(n) for n in range(3)] == [2.0, 4.0, 8.0]
    assert refresh_step(waiter_running=True, since_write=3.0, nudges=1, policy=POLICY) == LookAgain(1.0)


def test_once_every_nudge_is_spent_the_waiter_is_left_to_the_kubelet() -> None:
    step = refresh_step(waiter_running=True, since_write=1000.0, nudges=3, policy=POLICY)
    assert step == Leave(gave_up=True)
    assert refresh_step(
        waiter_running=True, since_write=1.0, nudges=0, policy=RefreshPolicy(max_nudges=0)
    ) == Leave(gave_up=True)


def test_a_clock_that_went_back_counts_as_no_time_passed() -> None:
    assert refresh_step(waiter_running=True, since_write=-50.0, nudges=0, policy=POLICY) == LookAgain(2.0)


def test_however_often_it_is_asked_a_sandbox_gets_at_most_max_nudges() -> None:
    """A waiter that never ends and a pod that changes all the time (each change asks again)."""
    nudges, since, asked = 0, 0.0, 0
    while asked < 10_000:
        asked += 1
        step = refresh_step(waiter_running=True, since_write=since, nudges=nudges, policy=POLICY)
        if isinstance(step, Nudge):
            nudges, since = step.number, 0.0
        elif isinstance(step, Leave):
            break
        since += 0.25
    assert nudges == POLICY.max_nudges
    assert asked < 10_000


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"first_after": 0.0}, "first_after"),
        ({"first_after": float("nan")}, "first_after"),
        ({"factor": 0.5}, "factor"),
        ({"factor": float("inf")}, "factor"),
        ({"max_nudges": -1}, "max_nudges"),
    ],
)
def test_a_policy_that_could_loop_or_never_wait_is_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RefreshPolicy(**settings)


# -- the waiter's state, read from the pod's status ------------------------------------------


def _status(*statuses: object) -> dict[str, Any]:
    return {"status": {"initContainerStatuses": list(statuses)}}


@pytest.mark.parametrize("state", ["running", "waiting", "terminated"])
def test_the_waiters_state_is_read_from_its_init_container_status(state: str) -> None:
    other = {"name": "istio-proxy", "state": {"terminated": {}}}
    pod = _status(other, {"name": names.WAITER_CONTAINER, "state": {state: {}}})
    assert pod_facts(pod).waiter_state == state


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"status": None},
        {"status": {"initContainerStatuses": "running"}},
        _status({"name": "other", "state": {"running": {}}}),
        _status({"name": names.WAITER_CONTAINER}),
        _status({"name": names.WAITER_CONTAINER, "state": ["running"]}),
        _status({"name": names.WAITER_CONTAINER, "state": {"running": "yes"}}),
        _status({"name": names.WAITER_CONTAINER, "state": {"running": {}, "terminated": {}}}),
        _status({"name": names.WAITER_CONTAINER, "state": {"sleeping": {}}}),
        _status(None, 7, {"name": 3}),
    ],
)
def test_a_missing_or_malformed_waiter_status_reads_as_unknown(raw: dict[str, Any]) -> None:
    assert pod_facts(raw).waiter_state == ""


# -- the agent -------------------------------------------------------------------------------


class NoApi:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected API call: {name}")


class FakeReporter:
    """Records the marks written; answers with a new resourceVersion each time."""

    def __init__(self) -> None:
        self.writes: list[tuple[PodRef, str, dict[str, Any]]] = []
        self.gone = False

    async def set_status(self, ref: PodRef, status: str, detail: Mapping[str, Any]) -> str:
        if self.gone:
            raise PodGone("404")
        self.writes.append((ref, status, dict(detail)))
        return f"rv-{100 + len(self.writes)}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """An agent with one programmed pod in its store, as the watch would have brought it."""

    def __init__(self, policy: RefreshPolicy = POLICY) -> None:
        tools = Tools(Backend.NFT, {f: "save" for f in Family}, {f: "restore" for f in Family})
        self.clock = Clock()
        self.agent = Agent(
            AgentConfig(node_name="n1", refresh=policy),
            NoApi(),  # type: ignore[arg-type]
            Applier(tools),
            Metrics(),
            clock=self.clock,
        )
        self.reporter = FakeReporter()
        self.agent.reporter = self.reporter  # type: ignore[assignment]
        plan = plan_from_mark(("-p", "15001", "-z", "15006", "-u", "1337"), self.agent.applier.render)
        inode = netns_id_of(OWN_NETNS).inode
        self.detail = {"netnsInode": inode, "rulesetSha256": plan.sha, "args": list(plan.args)}
        self.ref = PodRef("default", "web", UID)
        text = self._text(self.detail)
        self.record = Programmed(
            OWN_NETNS, netns_id_of(OWN_NETNS), (IP,), plan, {}, detail=text, mark_version="rv-1",
            mark_seen=True, detail_fields=dict(self.detail), written_at=self.clock.now,
        )  # fmt: skip
        self.agent._programmed[UID] = self.record
        self.pod: dict[str, Any] = {
            "metadata": {
                "name": "web",
                "namespace": "default",
                "uid": UID,
                "resourceVersion": "rv-1",
                "annotations": {
                    names.OPT_IN: "true",
                    names.STATUS: names.STATUS_INITIALIZED,
                    names.DETAIL: text,
                },
            },
            "spec": {
                "initContainers": [{"name": names.WAITER_CONTAINER, "image": "ipnc"}],
                "containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}],
            },
            "status": {"podIP": IP, "phase": "Pending"},
        }
        self.waiter("running")
        self.show()

    def _text(self, detail: Mapping[str, Any]) -> str:
        patch = status_patch(self.ref, names.STATUS_INITIALIZED, detail)
        text: str = patch["metadata"]["annotations"][names.DETAIL]
        return text

    def waiter(self, state: str) -> None:
        self.pod["status"]["initContainerStatuses"] = [{"name": names.WAITER_CONTAINER, "state": {state: {}}}]

    def show(self) -> None:
        """The watch brings the pod back as it is now."""
        self.agent.pods.store[UID] = copy.deepcopy(self.pod)

    def written(self) -> None:
        """The watch brings back the agent's latest write."""
        _, _, detail = self.reporter.writes[-1]
        self.pod["metadata"]["annotations"][names.DETAIL] = self._text(detail)
        self.pod["metadata"]["resourceVersion"] = f"rv-{100 + len(self.reporter.writes)}"
        self.show()

    def reconcile(self) -> Outcome | After:
        return asyncio.run(self.agent.reconcile(UID))

    def nudges(self) -> float:
        value = self.agent.metrics.registry.get_sample_value("ipnc_mark_refresh_nudges_total")
        assert value is not None
        return value

    def close(self) -> None:
        self.agent.executor.shutdown()


@pytest.fixture
def harness() -> Any:
    h = Harness()
    yield h
    h.close()


def test_a_marked_pod_whose_waiter_runs_is_looked_at_again_after_the_first_wait(harness: Harness) -> None:
    harness.clock.now += 0.5
    assert harness.reconcile() == After(1.5)
    assert harness.reporter.writes == []


def test_a_waiter_still_running_after_the_wait_gets_the_mark_written_again(harness: Harness) -> None:
    harness.clock.now += 2.5
    assert harness.reconcile() is Outcome.DONE
    ((ref, status, detail),) = harness.reporter.writes
    assert ref.uid == UID and status == names.STATUS_INITIALIZED
    # The same mark for the same sandbox, changed only by the count of nudges.
    assert detail == {**harness.detail, DETAIL_KEY: 1}
    assert harness.nudges() == 1
    assert harness.record.nudges == 1 and harness.record.mark_version == "rv-101"


def test_until_the_watch_brings_the_nudge_back_nothing_more_is_written(harness: Harness) -> None:
    harness.clock.now += 2.5
    harness.reconcile()
    harness.clock.now += 100  # the store still shows the mark before the nudge
    assert harness.reconcile() is Outcome.DONE
    assert len(harness.reporter.writes) == 1


def test_the_next_nudge_waits_longer_and_the_last_one_is_said_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    waits = []
    for _ in range(20):  # far more events than nudges: the budget, not the events, decides
        outcome = harness.reconcile()
        if isinstance(outcome, After):
            waits.append(outcome.seconds)
            harness.clock.now += outcome.seconds
        elif not harness.record.mark_seen:  # a nudge was written: the watch brings it back
            harness.written()
    assert waits == [2.0, 4.0, 8.0]
    assert [d[DETAIL_KEY] for _, _, d in harness.reporter.writes] == [1, 2, 3]
    assert harness.nudges() == 3
    with caplog.at_level(logging.WARNING, logger="istio_pod_network_controller.agent"):
        harness.clock.now += 1000
        assert harness.reconcile() is Outcome.DONE
        assert harness.reconcile() is Outcome.DONE
    given_up = [r for r in caplog.records if "every refresh of the mark" in r.getMessage()]
    assert len(given_up) == 1
    assert len(harness.reporter.writes) == 3


def test_a_waiter_that_is_done_gets_nothing(harness: Harness) -> None:
    harness.waiter("terminated")
    harness.show()
    harness.clock.now += 100
    assert harness.reconcile() is Outcome.DONE
    assert harness.reporter.writes == []


def test_a_waiter_not_running_yet_is_looked_at_when_its_status_changes(harness: Harness) -> None:
    harness.waiter("waiting")
    harness.show()
    harness.clock.now += 100
    assert harness.reconcile() is Outcome.DONE  # no timer: the status update queues the pod
    harness.waiter("running")
    harness.show()
    assert harness.reconcile() is Outcome.DONE
    assert len(harness.reporter.writes) == 1


def test_a_pod_gone_meanwhile_is_forgotten(harness: Harness) -> None:
    harness.reporter.gone = True
    harness.clock.now += 2.5
    assert harness.reconcile() is Outcome.DONE
    assert UID not in harness.agent._programmed
    assert harness.nudges() == 0


def test_the_worker_looks_again_after_the_asked_delay_and_counts_it_as_requeue_after() -> None:
    harness = Harness()
    agent = harness.agent
    answers: list[Outcome | After] = [After(0.05), Outcome.DONE]
    calls: list[float] = []

    async def reconcile(uid: str) -> Outcome | After:
        calls.append(asyncio.get_running_loop().time())
        return answers.pop(0)

    agent.reconcile = reconcile  # type: ignore[method-assign]

    async def run() -> None:
        worker = asyncio.create_task(agent._worker())
        agent.queue.add(UID)
        for _ in range(200):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
        agent.queue.shut_down()
        await asyncio.wait_for(worker, 5)

    try:
        asyncio.run(run())
    finally:
        harness.close()
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.04
    registry = agent.metrics.registry
    labels = {"controller": "pod", "result": ReconcileResult.REQUEUE_AFTER.value}
    assert registry.get_sample_value("controller_runtime_reconcile_total", labels) == 1
    assert agent.queue.num_requeues(UID) == 0  # not a failure: no back-off built up
