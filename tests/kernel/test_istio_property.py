"""Ours against Istio's real istio-iptables on generated configurations, in the kernel, both modes.

Hypothesis draws configurations over every option istio-iptables takes -- its flags, the same
settings through its environment (``ISTIO_INBOUND_PORTS``, ``REDIRECT_DNS``, ...), the
environment-only ones (owner groups, the loopback CIDR), DNS servers through resolv.conf and IPv6
through the pod's address -- with the boundary values where the two could part: repeats, leading
zeros, hexadecimal and service names, port ranges in both spellings, interface wildcards and names
nft reads as keywords, IPv4-mapped addresses, empty and blank values, the largest lists. Each
one runs through Istio's binary and through ours (iptables mode: ``node.apply.Applier``; native
nftables mode: ``node.nft.NftApplier``), each in a fresh network namespace, and the two must end
alike: both refuse, or both accept and leave the same kernel state (compared as the peer tier
compares it). The only exceptions are the entries of ``istio_differences`` that a configuration
shows; there our outcome must be the one the entry states. The draws are derandomized, so every
run checks the same configurations.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from istio_pod_network_controller.node.apply import Applier
from istio_pod_network_controller.node.backend import Backend, tools
from istio_pod_network_controller.node.errors import NodeError
from istio_pod_network_controller.node.netns import Netns
from istio_pod_network_controller.node.nft import NftApplier
from istio_pod_network_controller.render import render
from istio_pod_network_controller.render.nftables import NFT_KEYWORDS
from istio_pod_network_controller.spec import SpecError, parse_flags
from istio_pod_network_controller.spec.limits import MAX_LIST_ITEMS

from .istio_differences import (
    BY_ID,
    DIFFERENCES,
    PORT_LISTS,
    RUN_CONTROL_FLAGS,
    Difference,
    Mode,
    allowed,
    shown,
)
from .nft_state import iptables_state, netns, nft_ruleset, routing_state
from .test_istio_peer import Files, IstioConfig, istio, istio_binary
from .test_istio_peer import files as files  # the peer tier's fixtures: its /etc/group copy,
from .test_istio_peer import no_leftover_namespaces as no_leftover_namespaces  # its leak check

pytestmark = pytest.mark.kernel

EXAMPLES = 200
DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

# Settings istio-iptables also reads from its environment (pflag binds each flag to the variable
# of its name; two have a second, older name).
FLAG_ENV: dict[str, tuple[str, ...]] = {
    "-z": ("INBOUND_CAPTURE_PORT",),
    "-e": ("INBOUND_TUNNEL_PORT",),
    "-u": ("PROXY_UID",),
    "-g": ("PROXY_GID",),
    "-m": ("ISTIO_INBOUND_INTERCEPTION_MODE",),
    "-b": ("ISTIO_INBOUND_PORTS",),
    "-d": ("ISTIO_LOCAL_EXCLUDE_PORTS",),
    "-c": ("ISTIO_EXCLUDE_INTERFACES",),
    "-i": ("ISTIO_SERVICE_CIDR",),
    "-x": ("ISTIO_SERVICE_EXCLUDE_CIDR",),
    "-q": ("ISTIO_OUTBOUND_PORTS",),
    "-o": ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",),
    "-k": ("KUBE_VIRT_INTERFACES",),
    "-t": ("ISTIO_INBOUND_TPROXY_MARK",),
    "-r": ("ISTIO_INBOUND_TPROXY_ROUTE_TABLE",),
    "--redirect-dns": ("REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"),
    "--capture-all-dns": ("CAPTURE_ALL_DNS",),
    "--drop-invalid": ("DROP_INVALID", "INVALID_DROP"),
}
# Settings istio-iptables takes from its environment only; ours as flags.
ENV_ONLY = {
    "--owner-groups-include": "ISTIO_OUTBOUND_OWNER_GROUPS",
    "--owner-groups-exclude": "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
    "--host-ipv4-loopback-cidr": "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
}
SWITCHES = ("--redirect-dns", "--capture-all-dns", "--drop-invalid")
VALUE_FLAGS = ("--probe-timeout", "--iptables-probe-port")  # ignored flags that take a value
# Flags ours accepts and ignores: logging and probing (no effect on the rules either side), and
# the run controls (``istio_differences.RUN_CONTROL_FLAGS``).
IGNORED = (
    "--log_output_level=default:debug",
    "--log_as_json",
    "--reconcile",
    "--force-apply",
    "--iptables-probe-port=15002",
    "--probe-timeout=1s",
    *RUN_CONTROL_FLAGS,
)


@dataclass(frozen=True)
class Config:
    """One configuration: option values by flag, the switches that are on, which of them Istio
    gets through its environment (and under which name), DNS servers, IPv6."""

    options: dict[str, str]
    switches: frozenset[str] = frozenset()
    env_names: dict[str, str] = field(default_factory=dict)
    dns_v4: tuple[str, ...] = ()
    dns_v6: tuple[str, ...] = ()
    ipv6: bool = False
    istio_env: dict[str, str] = field(default_factory=dict)  # settings only Istio has (ENVOY_USER)

    def ours(self) -> list[str]:
        args = [arg for flag, value in self.options.items() for arg in (flag, value)]
        args += sorted(self.switches)
        if self.dns_v4:
            args += ["--dns-servers-v4", ",".join(self.dns_v4)]
        if self.dns_v6:
            args += ["--dns-servers-v6", ",".join(self.dns_v6)]
        return [*args, "--ipv6"] if self.ipv6 else args

    def istio(self) -> IstioConfig:
        args: list[str] = []
        env: dict[str, str] = {}
        for flag, value in self.options.items():
            if flag in ENV_ONLY:
                env[ENV_ONLY[flag]] = value
            elif flag in self.env_names:
                env[self.env_names[flag]] = value
            else:
                args += [flag, value]
        for switch in sorted(self.switches):
            if switch in self.env_names:
                env[self.env_names[switch]] = "true"
            else:
                args.append(switch)
        return IstioConfig(args, {**env, **self.istio_env}, [*self.dns_v4, *self.dns_v6], self.ipv6)

    def shown(self, mode: Mode) -> set[str]:
        options = {**self.options, **self.istio_env}
        if self.dns_v6:
            options["--dns-servers-v6"] = ",".join(self.dns_v6)
        return shown(options, self.switches, ipv6=self.ipv6, mode=mode)

    def describe(self) -> str:
        istio_config = self.istio()
        env = {k: _short(v) for k, v in istio_config.env.items()}
        return (
            f"ours: {[_short(a) for a in self.ours()]}\n"
            f"istio: {[_short(a) for a in istio_config.args]} env {env} dns {istio_config.nameservers}"
        )


def _short(text: str) -> str:
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} characters)"


# Values: mostly ordinary ones, then valid boundary values, and now and then one that one side
# or both refuse (the classes of istio_differences start from them). Most configurations draw no
# refused value, so that most of them reach the kernel on both sides and get compared there.
def _values(
    common: Sequence[str], edge: Sequence[str], refused: Sequence[str] = ()
) -> st.SearchStrategy[str]:
    """Common values 60% of the time, valid boundary values 30%, refused ones 10% (hypothesis
    leans towards small integers, and so towards the common values)."""

    def pick(n: int) -> st.SearchStrategy[str]:
        return st.sampled_from(common if n < 12 else edge if n < 18 or not refused else refused)

    return st.integers(0, 19).flatmap(pick)


def _list(
    item: st.SearchStrategy[str], refused: Sequence[str], long: Sequence[str] = ()
) -> st.SearchStrategy[str]:
    """Up to 4 items; a refused list 5% of the time, a long one 5%."""

    def pick(n: int) -> st.SearchStrategy[str]:
        if n == 18:
            return st.sampled_from(refused)
        if n == 19 and long:
            return st.sampled_from(long)
        return st.lists(item, max_size=4).map(",".join)

    return st.integers(0, 19).flatmap(pick)


PORT = _values(
    ["80", "443", "8080", "15020", "15021", "53", "3306", "9090"],
    ["0", "1", "65535", "8000:8010", ":1024", "60000:", "80:80", "8000-8010", " 80", "80"],
)
PORT_LIST = _list(
    PORT,
    ["010", "0x50", "http", "8010:8000", " ", "80, ", "80,010"],
    [",".join(str(1000 + i) for i in range(n)) for n in (MAX_LIST_ITEMS, MAX_LIST_ITEMS + 1)],
)
SINGLE_PORT = _values(
    ["15001", "15006", "8000", "12345"], ["0", "65535", " 15001"], ["", " ", "010", "0x10", "ssh"]
)
TUNNEL_PORT = _values(["15008", "15009"], ["53", "0", "8000:8010", "9000-9010"], ["", "010"])
IDS = _values(["1337", "1000", "1337,1000", "0"], ["1337,1337", ""], [",", " ", "010", "0x539"])
MODE = _values(["", "REDIRECT", "TPROXY"], ["TPROXY"], ["tproxy", "foo", " TPROXY"])
CIDR = _values(
    ["10.0.0.0/8", "192.168.1.5/24", "fd00::/8", "0.0.0.0/0", "::/0", "172.16.0.0/12"],
    ["127.0.0.1/32", "::1/128", "::ffff:127.0.0.1/128", "::ffff:10.1.2.3/120", "127.0.0.0/8", "10.0.0.0/8"],
)
CIDR_LIST = _list(CIDR, ["10.0.0.0/08", " 10.0.0.0/8", "10.0.0.0/8, 10.1.0.0/16"])
INTERFACE = _values(["eth0", "eth1", "net-1", "x.y", "veth0"], ["eth+", "veth+", "counter", "eth1"])
INTERFACES = _list(INTERFACE, ["e+th", " ", "eth0, "])
MARK = _values(["1337", "1", "4294967295", "77"], ["0", "1338"], ["010", "0x10"])
TABLE = _values(["133", "1", "100", "4294967295"], ["254", "255", "253", "0"], ["010"])
GROUPS = st.sampled_from(
    ["*", "1000", "daemon,1001", "1000,1000", "", " *"]
    + [",".join(str(2000 + i) for i in range(count)) for count in (49, 50, 63, 64, 64)]
)
EXCLUDED_GROUPS = st.sampled_from(["1002", "daemon,daemon", "", "1002,1003"])
LOOPBACK = st.sampled_from(["127.0.0.1/32", "127.0.0.0/8", "127.0.0.1/16"])
DNS_V4 = st.sampled_from([(), ("10.96.0.10",), ("10.96.0.10", "10.96.0.10"), ("1.1.1.1", "8.8.8.8")])
DNS_V6 = st.sampled_from([(), ("fd00::10",), ("fd00::10", "fd00::11")])

OPTION_VALUES: dict[str, st.SearchStrategy[str]] = {
    "-p": SINGLE_PORT,
    "-z": SINGLE_PORT,
    "-e": TUNNEL_PORT,
    "-u": IDS,
    "-g": IDS,
    "-m": MODE,
    "-b": st.one_of(st.just("*"), st.just(""), PORT_LIST, PORT_LIST),
    "-d": PORT_LIST,
    "-i": st.one_of(st.just("*"), st.just(""), CIDR_LIST, CIDR_LIST),
    "-x": CIDR_LIST,
    "-q": PORT_LIST,
    "-o": PORT_LIST,
    "-c": INTERFACES,
    "-k": INTERFACES,
    "-t": MARK,
    "-r": TABLE,
    "--owner-groups-include": GROUPS,
    "--owner-groups-exclude": EXCLUDED_GROUPS,
    "--host-ipv4-loopback-cidr": LOOPBACK,
}


@st.composite
def configurations(draw: st.DrawFn) -> Config:
    # Each option given or not on its own (a drawn set of options leans towards a few of them).
    options = {flag: draw(values) for flag, values in OPTION_VALUES.items() if draw(st.integers(0, 2)) == 0}
    if draw(st.integers(0, 4)) == 0:
        # TPROXY with its mark and route table: their boundary values matter only there.
        options.update({"-m": "TPROXY", "-t": draw(MARK), "-r": draw(TABLE)})
    extra = Config({})
    if draw(st.integers(0, 3)) == 0:
        # Some documented class's own example on top, so that each class shows up.
        extra = config_of(draw(st.sampled_from(DIFFERENCES)).example)
        options.update(extra.options)
    switches = draw(st.frozensets(st.sampled_from(SWITCHES))) | extra.switches
    if draw(st.integers(0, 5)) == 0:
        switches |= {draw(st.sampled_from(IGNORED))}
    env_names: dict[str, str] = {}
    for name in [*options, *sorted(switches)]:  # sorted: set order varies between processes
        if name in FLAG_ENV and draw(st.booleans()):
            env_names[name] = draw(st.sampled_from(FLAG_ENV[name]))
    dns_v4, dns_v6, ipv6 = draw(DNS_V4), extra.dns_v6 or draw(DNS_V6), extra.ipv6 or draw(st.booleans())
    # The user istio-iptables takes the proxy's UID from when -u is empty (an existing one, or not).
    istio_env = (
        {"ENVOY_USER": draw(st.sampled_from(["daemon", "nosuchuser"]))}
        if draw(st.integers(0, 9)) == 0
        else {}
    )
    return Config(options, switches, env_names, dns_v4, dns_v6, ipv6, {**istio_env, **extra.istio_env})


def config_of(args: tuple[str, ...] | list[str]) -> Config:
    """A configuration from flags as ours takes them (a documented class's example)."""
    options: dict[str, str] = {}
    switches: set[str] = set()
    dns_v6: tuple[str, ...] = ()
    ipv6 = False
    istio_env: dict[str, str] = {}
    rest = iter(args)
    for flag in rest:
        if flag == "--ipv6":
            ipv6 = True
        elif re.fullmatch(r"[A-Z_]+=.*", flag):
            name, _, value = flag.partition("=")
            istio_env[name] = value
        elif flag == "--dns-servers-v6":
            dns_v6 = tuple(next(rest).split(","))
        elif (
            flag.startswith("--")
            and "=" not in flag
            and flag not in OPTION_VALUES
            and flag not in VALUE_FLAGS
        ) or "=" in flag:
            switches.add(flag)
        else:
            options[flag] = next(rest)
    return Config(options, frozenset(switches), {}, (), dns_v6, ipv6, istio_env)


@dataclass
class Side:
    """What one side did: accepted (and left this state) or refused (and said why)."""

    ok: bool
    message: str = ""
    state: Any = None
    routes: dict[str, list[str]] | None = None


def run_istio(config: Config, files: Files, mode: Mode) -> Side:
    real = istio(config.istio(), files, nft=mode is Mode.NFT)
    return Side(real.run.returncode == 0, real.message, real.state, real.routes)


def run_ours(config: Config, mode: Mode, appliers: dict[Mode, Any]) -> Side:
    applier = appliers[mode]
    try:
        planned = applier.render(parse_flags(config.ours()))
    except SpecError as exc:
        assert "\n" not in str(exc), "a refusal is one line"
        return Side(False, str(exc))
    with netns(ipv6_address=config.ipv6) as path, Netns(path) as ns:
        try:
            applier.apply(ns, planned)
        except NodeError as exc:
            return Side(False, f"apply failed: {exc}")
        state = nft_ruleset(path) if mode is Mode.NFT else iptables_state(path)
        return Side(True, state=state, routes=routing_state(path))


class IptablesApplier:
    """node.apply.Applier with the render step the NodeApplier protocol names."""

    def __init__(self) -> None:
        self.applier = Applier(tools(Backend.NFT))

    def render(self, spec: Any) -> Any:
        return render(spec)

    def apply(self, ns: Netns, ruleset: Any) -> Any:
        return self.applier.apply(ns, ruleset)


def compare(
    config: Config, mode: Mode, files: Files, appliers: dict[Mode, Any], pool: ThreadPoolExecutor
) -> bool:
    """Istio's outcome and ours agree, but where a documented difference says otherwise. Returns
    whether both accepted (and so their kernel states were compared)."""
    # Ours ignores istio-iptables' run controls (--dry-run...) and programs the pod: the oracle
    # is Istio without them (the table's run-control-flags row; with them it writes nothing).
    oracle = dataclasses.replace(config, switches=config.switches - set(RUN_CONTROL_FLAGS))
    real_future = pool.submit(run_istio, oracle, files, mode)
    ours = run_ours(config, mode, appliers)
    real = real_future.result()
    exceptions = allowed(oracle.shown(mode), mode)
    where = f"{mode.value} mode\n{config.describe()}\nistio: {real.message[-600:]}\nours: {ours.message}"
    if exceptions:
        expected = all(d.ours[mode] for d in exceptions)
        if expected:
            # Classes we take and Istio's nft mode does not (iptables' spellings, keyword names,
            # 64 groups, IPv6 DNS servers on an IPv4 pod): Istio's verdict on the same
            # configuration in its own spellings, within its bounds, is the oracle.
            # (In iptables mode Istio's spellings are iptables': nothing to translate.)
            within = in_istio_nft_terms(oracle) if mode is Mode.NFT else oracle
            other = run_istio(within, files, mode)
            assert ours.ok == other.ok, f"ours and Istio on {within.describe()} part\n{where}"
            if ours.ok and {d.id for d in exceptions} <= SAME_STATE_IN_ISTIO_TERMS:
                # Only the spelling changed: the kernel holds the same rules.
                assert ours.state == other.state, f"kernel states differ from Istio's in its terms\n{where}"
                assert ours.routes == other.routes, f"routes differ\n{where}"
                return True
        else:
            assert ours.ok == expected, (
                f"{[d.id for d in exceptions]}: ours should {'accept' if expected else 'refuse'}\n{where}"
            )
    else:
        assert ours.ok == real.ok, f"one side refused, the other did not\n{where}"
    if ours.ok and real.ok and all(d.same_state for d in exceptions):
        assert ours.state == real.state, f"kernel states differ\n{where}"
        assert ours.routes == real.routes, f"routes differ\n{where}"
        return True
    return False


def in_istio_nft_terms(config: Config) -> Config:
    """``config`` as Istio's nft mode takes it, where ours takes it otherwise (the nft-mode rows
    of istio_differences where ours accepts): ranges spelled ``8000-8010``, ``eth+`` as ``eth``,
    keyword names renamed, 63 included groups instead of 64, no IPv6 DNS servers without IPv6.
    Valid and invalid values stay valid and invalid."""
    options = dict(config.options)
    for flag in (*PORT_LISTS, "-e"):
        if flag in options:
            options[flag] = _COLON_RANGE.sub(_dash_range, options[flag])
    for flag in ("-c", "-k"):
        if flag in options:
            options[flag] = ",".join(_nft_name(item) for item in options[flag].split(","))
    groups = options.get("--owner-groups-include", "*")
    if groups != "*" and len([g for g in groups.split(",") if g]) == 64:
        options["--owner-groups-include"] = groups.rsplit(",", 1)[0]
    dns_v6 = config.dns_v6 if config.ipv6 else ()
    return dataclasses.replace(config, options=options, dns_v6=dns_v6)


# Classes whose configuration in Istio's terms means exactly the same rules.
SAME_STATE_IN_ISTIO_TERMS = frozenset({"port-range-colon"})
_COLON_RANGE = re.compile(r"(\d*):(\d*)")


def _dash_range(found: re.Match[str]) -> str:
    return f"{found.group(1) or '0'}-{found.group(2) or '65535'}"


def _nft_name(item: str) -> str:
    name = item.strip()
    if name.endswith("+") and "+" not in name[:-1]:
        return item.replace(name, name[:-1])
    return item.replace(name, "x" + name) if name in NFT_KEYWORDS else item


@pytest.fixture(scope="module")
def appliers() -> dict[Mode, Any]:
    return {Mode.IPTABLES: IptablesApplier(), Mode.NFT: NftApplier()}


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as running:
        yield running


def check_generated(mode: Mode, files: Files, appliers: dict[Mode, Any], pool: ThreadPoolExecutor) -> None:
    istio_binary()
    seen: list[Config] = []
    compared: list[Config] = []

    def body(config: Config) -> None:
        seen.append(config)
        if compare(config, mode, files, appliers, pool):
            compared.append(config)

    # Each documented class's own example runs first (explicit examples, on top of the generated
    # ones), so every class is checked in every run, alone and then in combinations.
    check = given(configurations())(body)
    for difference in DIFFERENCES:
        check = example(config_of(difference.example))(check)
    settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )(check)()
    generated = len(seen) - len(DIFFERENCES)
    assert generated >= EXAMPLES
    # Enough of them get as far as the kernel on both sides for the comparison to mean something.
    assert len(compared) >= EXAMPLES // 4, (
        f"only {len(compared)} of {len(seen)} configurations reached the kernel"
    )
    # Each class's example shows that class (the classifier knows it), and none goes untested.
    for difference in DIFFERENCES:
        own = config_of(difference.example)
        assert own in seen, difference.id
        assert difference.id in own.shown(mode) or not difference.differs(mode), difference.id
    covered = set().union(*(c.shown(mode) for c in seen[len(DIFFERENCES) :]))
    print(
        f"{mode.value} mode: {generated} generated configurations and {len(DIFFERENCES)} examples, "
        f"{len(compared)} compared in the kernel; classes in generated ones: {len(covered)}"
    )


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_generated_configurations_match_istio(
    mode: Mode, files: Files, appliers: dict[Mode, Any], pool: ThreadPoolExecutor
) -> None:
    check_generated(mode, files, appliers, pool)


BASE = ["-p", "15001", "-z", "15006", "-u", "1337", "-i", ""]


@pytest.mark.parametrize("difference", DIFFERENCES, ids=lambda d: d.id)
@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_each_documented_difference_holds(
    difference: Difference, mode: Mode, files: Files, appliers: dict[Mode, Any]
) -> None:
    istio_binary()
    config = config_of([*BASE, *difference.example])
    real = run_istio(config, files, mode)
    ours = run_ours(config, mode, appliers)
    where = f"{config.describe()}\nistio: {real.message[-600:]}\nours: {ours.message}"
    assert real.ok == difference.istio[mode], f"istio-iptables no longer does what the table says\n{where}"
    assert ours.ok == difference.ours[mode], where
    if ours.ok and real.ok:
        same = ours.state == real.state and ours.routes == real.routes
        assert same == difference.same_state, where


def _table_ids() -> list[str]:
    text = DOCS.read_text()
    start = text.index("## Differences from istio-iptables")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.MULTILINE)


def test_the_docs_table_lists_exactly_these_differences() -> None:
    ids = _table_ids()
    assert sorted(ids) == sorted(BY_ID), "docs/configuration.md's table and istio_differences disagree"
    assert len(ids) == len(set(ids))
