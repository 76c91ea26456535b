"""The peer tier: Istio's real istio-iptables (built by scripts/build-istio) and ours, each run in a
fresh network namespace with every conformance vector's configuration, leave the same kernel state.

Native nftables mode: Istio's `--native-nftables` against our nft text loaded by `nft -f`.
iptables mode: Istio's istio-iptables against our `apply --netns`; our jumps carry a marker
comment and our policy routes a protocol stamp, both taken out before comparing. Where Istio's nft
mode refuses a configuration its iptables mode accepts, ours loads (and the tests say so).

istio-iptables reads some settings from its environment and the pod: IPv6 from the pod's
addresses, the DNS servers from /etc/resolv.conf, owner groups and the loopback CIDR from
environment variables. The vectors' project flags for them are turned into exactly that.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from istio_pod_network_controller.render.nftables import NftRuleset, render_nftables
from istio_pod_network_controller.spec import SpecError, parse_flags

from .nft_state import (
    group_file,
    iptables_state,
    leftover_namespaces,
    load_nft,
    needs_root_and,
    netns,
    nft_ruleset,
    routing_state,
    run_in,
)

pytestmark = pytest.mark.kernel

VECTORS = Path(__file__).resolve().parents[1] / "conformance" / "istio-nftables"
VECTOR_FILES = sorted(VECTORS.glob("*.json"))
CLI = Path(sys.executable).parent / "istio-pod-network-controller"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "istio-pod-network-controller"
BASE = ["-p", "15001", "-z", "15006", "-e", "15008", "-u", "1337", "-g", "1337", "-t", "1337", "-r", "133"]
ENV_FLAGS = {
    "--owner-groups-include": "ISTIO_OUTBOUND_OWNER_GROUPS",
    "--owner-groups-exclude": "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
    "--host-ipv4-loopback-cidr": "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
}
ADDRESS = re.compile(r"(?<![\w:])[0-9a-f]*:[0-9a-f:.]*/\d+")
# Known differences of our iptables mode, each a finding (see the reasons).
IPTABLES_MODE_DIFFERENCES: dict[str, str] = {}  # none left: a new one is a finding, named here


def istio_binary() -> Path:
    found = Path(os.environ.get("ISTIO_IPTABLES", CACHE / "istio" / "current" / "istio-iptables"))
    if not found.is_file():
        pytest.skip(f"Istio's istio-iptables is not built ({found}): run scripts/build-istio")
    return found


@dataclass(frozen=True)
class IstioConfig:
    """A vector's configuration as istio-iptables takes it: flags, environment, resolv.conf."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    nameservers: list[str] = field(default_factory=list)
    ipv6: bool = False

    @classmethod
    def of(cls, ours: list[str]) -> IstioConfig:
        args: list[str] = []
        env: dict[str, str] = {}
        servers: list[str] = []
        ipv6 = False
        rest = iter(ours)
        for arg in rest:
            if arg == "--ipv6":
                ipv6 = True
            elif arg in ENV_FLAGS:
                env[ENV_FLAGS[arg]] = next(rest)
            elif arg in ("--dns-servers-v4", "--dns-servers-v6"):
                servers += [s for s in next(rest).split(",") if s]
            else:
                args.append(arg)
        return cls(args, env, servers, ipv6)


@dataclass
class Files:
    folder: Path
    groups: Path

    def binds(self, config: IstioConfig) -> dict[str, Path]:
        resolv = self.folder / f"resolv-{uuid.uuid4().hex[:8]}.conf"
        resolv.write_text("".join(f"nameserver {server}\n" for server in config.nameservers))
        return {"/etc/group": self.groups, "/etc/resolv.conf": resolv}


@dataclass
class Outcome:
    run: subprocess.CompletedProcess[str]
    state: Any
    routes: dict[str, list[str]]

    @property
    def message(self) -> str:
        return (self.run.stdout + self.run.stderr)[-3000:]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    needs_root_and("nft", "iptables-save", "ip6tables-save")
    folder = tmp_path_factory.mktemp("etc")
    return Files(folder, group_file(folder))


@pytest.fixture(autouse=True)
def no_leftover_namespaces() -> Iterator[None]:
    yield
    assert leftover_namespaces() == [], "a test left a network namespace behind"


def istio(config: IstioConfig, files: Files, *, nft: bool) -> Outcome:
    mode = ["--native-nftables"] if nft else ["--force-iptables-binary", "nft"]
    with netns(ipv6_address=config.ipv6) as path:
        run = run_in(
            path, [str(istio_binary()), *mode, *config.args], binds=files.binds(config), env=config.env
        )
        state = nft_ruleset(path) if nft else iptables_state(path)
        return Outcome(run, state, routing_state(path))


def our_apply(args: list[str], files: Files, *, ipv6: bool) -> Outcome:
    with netns(ipv6_address=ipv6) as path:
        argv = [str(CLI), "apply", "--netns", path, "--backend", "nft", *args]
        # Not entered into the namespace: apply refuses to program the one it runs in.
        run = run_in(None, argv, binds={"/etc/group": files.groups})
        return Outcome(run, iptables_state(path), routing_state(path))


def ours_nft(args: list[str]) -> NftRuleset:
    return render_nftables(parse_flags(args))


def expected_routes(ruleset: NftRuleset, istio_routes: dict[str, list[str]]) -> None:
    """What lies outside nftables: the TPROXY policy route and the IPv6 passthrough address."""
    routes = json.dumps(istio_routes)
    if ruleset.tproxy is None:
        assert "fwmark" not in routes
    else:
        mark, table = ruleset.tproxy.mark, ruleset.tproxy.table
        assert any(f"from all fwmark {mark:#x} lookup {table}" in rule for rule in istio_routes["rules v4"])
    assert ("::6/128" in istio_routes["lo v6"]) == ruleset.ipv6_passthrough_address


def vector(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_istio_nft_mode_leaves_what_our_nft_ruleset_does(path: Path, files: Files) -> None:
    vec = vector(path)
    real = istio(IstioConfig.of(vec["args"]), files, nft=True)
    assert real.run.returncode == 0, real.message
    # The transaction it ran (it logs it) is the golden, text for text, but for the spelling of
    # IPv6 addresses: it reads DNS servers from resolv.conf and writes them canonical
    # (::7f00:35), where Istio's test sets the text ::127.0.0.53.
    assert canonical_addresses(logged_transaction(real)) == canonical_addresses(vec["nftables"])
    ruleset = ours_nft(vec["args"])
    assert load_nft(ruleset.text(), files.groups) == real.state
    expected_routes(ruleset, real.routes)


def canonical_addresses(text: str) -> str:
    return ADDRESS.sub(lambda found: str(ipaddress.ip_interface(found.group(0))), text)


def logged_transaction(outcome: Outcome) -> str:
    """The `nft -f` text istio-iptables logs after running it ("...programmed:\\n%s \\n")."""
    head = "nftables rules programmed:\n"
    log = outcome.run.stdout
    assert head in log, "istio-iptables did not log its transaction"
    text = log[log.index(head) + len(head) :]
    return text[: text.rindex(" \n")]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=IPTABLES_MODE_DIFFERENCES[p.stem]))
        if p.stem in IPTABLES_MODE_DIFFERENCES
        else p
        for p in VECTOR_FILES
    ],
    ids=lambda p: p.stem,
)
def test_istio_iptables_mode_leaves_what_our_apply_does(path: Path, files: Files) -> None:
    vec = vector(path)
    config = IstioConfig.of(vec["args"])
    real = istio(config, files, nft=False)
    assert real.run.returncode == 0, real.message
    mine = our_apply(vec["args"], files, ipv6=config.ipv6)
    assert mine.run.returncode == 0, mine.message
    assert mine.state == real.state
    assert mine.routes == real.routes


def test_both_istio_modes_agree_on_routes_and_addresses(files: Files) -> None:
    config = IstioConfig.of([*BASE, "-b", "*", "-i", "", "-m", "TPROXY", "--ipv6"])
    nft_mode = istio(config, files, nft=True)
    iptables_mode = istio(config, files, nft=False)
    assert nft_mode.run.returncode == 0 and iptables_mode.run.returncode == 0
    assert nft_mode.routes == iptables_mode.routes
    assert "::6/128" in nft_mode.routes["lo v6"]


# Configurations Istio's nft mode refuses although its iptables mode takes them; ours loads.


def test_ipv6_dns_servers_on_an_ipv4_only_pod(files: Files) -> None:
    args = [*BASE, "-b", "", "-i", "", "--redirect-dns", "--dns-servers-v6", "fd00::10"]
    config = IstioConfig.of(args)
    refused = istio(config, files, nft=True)
    assert refused.run.returncode != 0
    assert "Could not process rule" in refused.message
    assert istio(config, files, nft=False).run.returncode == 0
    loaded = load_nft(ours_nft(args).text(), files.groups)
    assert "istio-output-dns" in json.dumps(loaded)
    assert "fd00::10" not in json.dumps(loaded)


def test_interface_named_like_an_nft_keyword(files: Files) -> None:
    args = [*BASE, "-b", "", "-i", "", "-c", "counter"]
    config = IstioConfig.of(args)
    refused = istio(config, files, nft=True)
    assert refused.run.returncode != 0
    assert "syntax error, unexpected counter" in refused.message
    assert istio(config, files, nft=False).run.returncode == 0
    loaded = load_nft(ours_nft(args).text(), files.groups)
    assert '"iifname"' in json.dumps(loaded) and '"counter"}' in json.dumps(loaded)


@pytest.mark.parametrize("count", [49, 50, 63])
def test_many_owner_groups_nft_mode_matches_istio(count: int, files: Files) -> None:
    # From 50 included groups on, iptables-restore refuses the one rule (more than 255
    # arguments) in Istio's iptables mode and in ours; nft mode takes up to 63.
    groups = ",".join(str(1000 + i) for i in range(count))
    args = [*BASE, "-b", "", "-i", "", "--owner-groups-include", groups]
    config = IstioConfig.of(args)
    real = istio(config, files, nft=True)
    assert real.run.returncode == 0, real.message
    assert load_nft(ours_nft(args).text(), files.groups) == real.state
    assert (istio(config, files, nft=False).run.returncode == 0) == (count < 50)
    assert (our_apply(args, files, ipv6=False).run.returncode == 0) == (count < 50)


def test_sixty_four_owner_groups(files: Files) -> None:
    # Istio allows 64 included groups; its nft rule is then more than 128 expressions, its
    # iptables rule more than 255 arguments: both modes refuse. Ours loads, as a set.
    groups = ",".join(str(1000 + i) for i in range(64))
    args = [*BASE, "-b", "", "-i", "", "--owner-groups-include", groups]
    config = IstioConfig.of(args)
    refused = istio(config, files, nft=True)
    assert refused.run.returncode != 0
    assert "Could not process rule: Invalid argument" in refused.message
    assert istio(config, files, nft=False).run.returncode != 0
    assert '"set"' in json.dumps(load_nft(ours_nft(args).text(), files.groups))


def test_a_port_with_a_leading_zero_is_refused(files: Files) -> None:
    # Istio hands `010` on as text: nft and iptables-restore both read octal 8 (its policy route
    # code reads decimal 10). Ours refuses it, naming the flag, in both modes.
    args = [*BASE, "-b", "010", "-i", ""]
    config = IstioConfig.of(args)
    assert '"right": 8}' in json.dumps(istio(config, files, nft=True).state)
    real_iptables = istio(config, files, nft=False)
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 8 -j ISTIO_IN_REDIRECT" in real_iptables.state["v4 nat"]
    with pytest.raises(SpecError, match=r"^-b: invalid value '010': a port is written without leading zeros"):
        parse_flags(args)


@pytest.mark.parametrize(
    ("value", "nft_spelling"),
    [(("-b", "8000:8100"), "8000-8100"), (("-c", "eth+"), '"eth*"')],
    ids=["range", "wildcard"],
)
def test_port_ranges_and_interface_wildcards(value: tuple[str, str], nft_spelling: str, files: Files) -> None:
    # Istio's iptables mode takes them, its nft mode writes `8000:8100` and `eth+`, which nft
    # refuses. Ours takes them in both modes: iptables mode as Istio does, nft mode in nft's own
    # spelling, with the meaning iptables gives them.
    args = [*BASE, "-b", "", "-i", "", *value]
    config = IstioConfig.of(args)
    assert istio(config, files, nft=True).run.returncode != 0
    real = istio(config, files, nft=False)
    assert real.run.returncode == 0
    mine = our_apply(args, files, ipv6=False)
    assert mine.run.returncode == 0, mine.message
    assert mine.state == real.state
    assert nft_spelling in ours_nft(args).text()
    load_nft(ours_nft(args).text(), files.groups)


# Combinations beyond Istio's 28 cases: a fixed sample (the same on every run) of the settings
# that interact -- interception mode, inbound and outbound selections, exclusions, DNS, IPv6,
# owner groups, interfaces, proxy IDs, drop-invalid, loopback CIDR.
CHOICES: dict[str, list[list[str]]] = {
    "mode": [[], ["-m", "TPROXY"]],
    "inbound": [["-b", ""], ["-b", "*"], ["-b", "80,8080"], ["-b", "*", "-d", "15020,15021"]],
    "outbound": [
        ["-i", ""],
        ["-i", "*"],
        ["-i", "10.0.0.0/8,fd00::/8"],
        ["-i", "127.0.0.1/32"],
        ["-i", "::1/128"],
    ],
    "exclude": [[], ["-x", "10.1.0.0/16,fd01::/16"], ["-o", "3306,53"], ["-q", "8443"]],
    "dns": [
        [],
        ["--redirect-dns"],
        ["--redirect-dns", "--capture-all-dns"],
        ["--redirect-dns", "--dns-servers-v4", "10.96.0.10"],
        ["--redirect-dns", "--dns-servers-v4", "10.96.0.10,10.96.0.11", "--dns-servers-v6", "fd00::10"],
    ],
    "ipv6": [[], ["--ipv6"]],
    "groups": [[], ["--owner-groups-include", "java,202"], ["--owner-groups-exclude", "888,ftp"]],
    "nics": [[], ["-c", "eth1"], ["-k", "eth0,eth1"], ["-c", "eth1", "-k", "eth0"]],
    "ids": [[], ["-u", "3,4", "-g", "1,2"], ["-u", "0"]],
    "invalid": [[], ["--drop-invalid"]],
    "loopback": [[], ["--host-ipv4-loopback-cidr", "127.0.0.0/8"]],
}
SAMPLE_SIZE = 24
SAMPLE_SEED = 0


def sampled_configurations() -> list[list[str]]:
    """A seeded sample in which every value of every setting appears at least once."""
    rng = random.Random(SAMPLE_SEED)
    sample = []
    for _ in range(SAMPLE_SIZE):
        args = list(BASE)
        for values in CHOICES.values():
            args += rng.choice(values)
        # With IPv6 DNS servers, also IPv6 (an IPv4-only pod with them is the case above).
        if "fd00::10" in args and "--ipv6" not in args:
            args.append("--ipv6")
        sample.append(args)
    for values in CHOICES.values():
        for value in values:
            assert any(" ".join(value) in " ".join(args) for args in sample), f"{value} not in the sample"
    return sample


@pytest.mark.parametrize("args", sampled_configurations(), ids=lambda a: " ".join(a[len(BASE) :]) or "base")
def test_sampled_configurations_match_istio_in_both_modes(args: list[str], files: Files) -> None:
    config = IstioConfig.of(args)
    real_nft = istio(config, files, nft=True)
    assert real_nft.run.returncode == 0, real_nft.message
    assert load_nft(ours_nft(args).text(), files.groups) == real_nft.state
    real_iptables = istio(config, files, nft=False)
    assert real_iptables.run.returncode == 0, real_iptables.message
    mine = our_apply(args, files, ipv6=config.ipv6)
    assert mine.run.returncode == 0, mine.message
    assert mine.state == real_iptables.state
    assert mine.routes == real_iptables.routes
