"""Which connection proves a pod's redirect: planned by the agent, carried out by the waiter.

The waiter's ``--verify`` must not take its cue from anything the pod can write (its traffic
annotations, the webhook's copy of istio-init's arguments): a tenant could then make it skip the
check, or aim it elsewhere. So the agent, which applied the rules and reads them back, plans the
check from the spec it applied and from the waiter's UID/GID as the pod spec gives them, and
writes the plan in its own detail annotation (``detail["verify"]``); the waiter only checks that
the plan is for the UID/GID it runs as, then probes. Every probe the plan can name is a TEST-NET
address on a port other than the proxy's, so even a forged plan cannot make a connection that
was not redirected look like one that was.

Pure: no I/O. The spec is only read through its attributes, so the waiter, which imports this
module to read plans, starts without loading the spec layer; nor does it load ``ipaddress`` or
``dataclasses`` (the agent's planning imports the one; the records are NamedTuples): each is a
few milliseconds of every meshed pod's start.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from .podfacts import AnyPod, is_id, pod_facts

if TYPE_CHECKING:
    import ipaddress

    from .spec import RedirectSpec

# Reserved documentation addresses (RFC 5737): nothing real answers there, and a pod's rules
# capture them whenever they capture "everything outside the cluster".
VERIFY_ADDRESSES = ("192.0.2.1", "198.51.100.1", "203.0.113.1")
VERIFY_PORTS = (80, 8080, 443)

# The keys of the plan in the agent's detail annotation.
VERIFY_KEY = "verify"
UID, GID, ADDRESS, PORT, PROXY_PORT, SKIP = "uid", "gid", "address", "port", "proxyPort", "skip"
MAX_REASON = 1000  # characters of a skip reason the waiter repeats


class Probe(NamedTuple):
    address: str
    port: int
    proxy_port: int


class Skip(NamedTuple):
    reason: str


Check = Probe | Skip


def _captures(spec: RedirectSpec, address: ipaddress.IPv4Address, port: int, gid: int) -> bool:
    """Whether the rendered IPv4 nat OUTPUT rules send a TCP connection from this process to
    ``address:port`` to the proxy port; follows ``render.iptables`` rule order."""
    if port in spec.outbound_ports_exclude:
        return False
    groups = spec.owner_groups
    if groups.except_ and str(gid) in groups.values:
        return False
    if not groups.except_ and str(gid) not in groups.values:
        return False
    if address in spec.host_ipv4_loopback_cidr.interface.network:
        return False
    if any(c.version == 4 and address in c.interface.network for c in spec.outbound_cidrs_exclude):
        return False
    if port in spec.outbound_ports_include:
        return True
    if spec.outbound_cidrs.wildcard:
        return True
    return any(c.version == 4 and address in c.interface.network for c in spec.outbound_cidrs.cidrs)


def plan_verify(spec: RedirectSpec, *, uid: int, gid: int) -> Check:
    """Which connection, made as ``uid``/``gid``, proves the redirect of this spec, or why none can."""
    if uid in spec.proxy_uids or gid in spec.proxy_gids:
        return Skip(
            f"misconfiguration: the waiter runs as UID {uid} / GID {gid}, and the rules leave the proxy's "
            f"UIDs {','.join(map(str, spec.proxy_uids))} / GIDs {','.join(map(str, spec.proxy_gids))} "
            "alone, so its test connection is never captured; the webhook gives the waiter other IDs, "
            "so something else set these"
        )
    if spec.exclude_interfaces:
        return Skip(
            "the rules exclude interfaces " + ",".join(spec.exclude_interfaces)
            + ": which one a test connection leaves by cannot be told from the spec"
        )  # fmt: skip
    import ipaddress  # the agent's side only (see the module's docstring)

    named = [g for g in spec.owner_groups.values if not g.isdigit()]
    if named:
        return Skip(f"the rules select owner groups by name ({','.join(named)}): not resolvable here")
    for text in VERIFY_ADDRESSES:
        address = ipaddress.IPv4Address(text)
        for port in VERIFY_PORTS:
            if _captures(spec, address, port, gid):
                return Probe(text, port, spec.proxy_port)
    return Skip(
        "the pod's outbound capture covers none of "
        + ", ".join(f"{a}:{p}" for a in VERIFY_ADDRESSES for p in VERIFY_PORTS)
    )


def probe_plan(spec: RedirectSpec, *, uid: int | None, gid: int | None) -> dict[str, Any]:
    """The plan the agent writes as ``detail["verify"]``: for the waiter's ``uid``/``gid`` (None
    when the pod spec does not say, see ``waiter_ids``), the probe that proves ``spec``'s redirect,
    or why there is none. JSON-ready."""
    plan: dict[str, Any] = {UID: uid, GID: gid}
    if uid is None or gid is None:
        unknown = " and ".join(
            what for what, value in (("runAsUser", uid), ("runAsGroup", gid)) if value is None
        )
        plan[SKIP] = (
            f"the pod spec does not give the waiter's {unknown}, so whether the rules capture its "
            "connections cannot be told"
        )
        return plan
    found = plan_verify(spec, uid=uid, gid=gid)
    if isinstance(found, Skip):
        plan[SKIP] = found.reason
    else:
        plan.update({ADDRESS: found.address, PORT: found.port, PROXY_PORT: found.proxy_port})
    return plan


# -- the waiter's IDs as the pod spec gives them ---------------------------------------------


def waiter_ids(pod: AnyPod) -> tuple[int | None, int | None]:
    """The waiter's runAsUser and runAsGroup: its container's securityContext, else the pod's.

    None where neither says, or the value is not a valid ID. For runAsGroup that is deliberate:
    unset, the runtime takes the primary GID of the UID's entry in the *image's* /etc/passwd
    (65532 for our image's ``nonroot``), or 0 when the UID has none; the agent cannot see the
    image, so it does not guess. The webhook sets both, so this only happens to a waiter whose
    IDs the platform picks, or to a pod that did not go through the webhook.
    """
    waiter = pod_facts(pod).waiter
    if waiter is None:
        return None, None
    return waiter.run_as_user.id, waiter.run_as_group.id


# -- reading a plan back (the waiter) --------------------------------------------------------


class PlanError(ValueError):
    """The plan is not one the agent writes; the message is one line."""


class VerifyPlan(NamedTuple):
    uid: int | None
    gid: int | None
    check: Check


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_REASON else flat[: MAX_REASON - 3] + "..."


def read_plan(value: Any) -> VerifyPlan:
    """``detail["verify"]`` -> VerifyPlan. Raises PlanError for anything ``probe_plan`` does not
    write, including a probe that could pass without a redirect (a target that is not one of the
    TEST-NET candidates, or the proxy port itself)."""
    if not isinstance(value, Mapping):
        raise PlanError("not a JSON object")
    ids: list[int | None] = []
    for key in (UID, GID):
        found = value.get(key)
        if found is not None and not is_id(found):
            raise PlanError(f"{key} is not a UID/GID or null")
        ids.append(found)
    uid, gid = ids
    if SKIP in value:
        reason = value[SKIP]
        if not isinstance(reason, str) or not reason.strip():
            raise PlanError("skip is not a non-empty string")
        if any(key in value for key in (ADDRESS, PORT, PROXY_PORT)):
            raise PlanError("it both skips and names a probe")
        return VerifyPlan(uid, gid, Skip(_one_line(reason)))
    address, port, proxy_port = value.get(ADDRESS), value.get(PORT), value.get(PROXY_PORT)
    if address not in VERIFY_ADDRESSES:
        raise PlanError(f"address is not one of {', '.join(VERIFY_ADDRESSES)}")
    if port not in VERIFY_PORTS or type(port) is not int:
        raise PlanError(f"port is not one of {', '.join(map(str, VERIFY_PORTS))}")
    if type(proxy_port) is not int or not 0 < proxy_port < 65536 or proxy_port == port:
        raise PlanError("proxyPort is not a port other than the probe's")
    if uid is None or gid is None:
        raise PlanError("it names a probe but not the UID and GID it is for")
    return VerifyPlan(uid, gid, Probe(str(address), port, proxy_port))


def check_for(plan: VerifyPlan, *, uid: int, gid: int) -> Check:
    """What the waiter running as ``uid``/``gid`` does with the agent's plan."""
    if isinstance(plan.check, Skip):
        return plan.check
    if (plan.uid, plan.gid) != (uid, gid):
        return Skip(
            f"the agent planned the check for UID {plan.uid} / GID {plan.gid}, but this container runs "
            f"as UID {uid} / GID {gid}: whether the rules capture its connections is not known"
        )
    return plan.check
