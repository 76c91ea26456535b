"""The agent keeps a sandbox's spec as istio-iptables flags and rebuilds it after a restart:
the flags must give back exactly the same spec, and so the same rules, for every input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from istio_pod_network_controller.render import render
from istio_pod_network_controller.spec import SpecError, parse_flags
from istio_pod_network_controller.spec.canonical import to_args

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "istio-iptables"


def _vectors() -> list[Path]:
    return sorted(VECTORS.glob("*.json")) if VECTORS.is_dir() else []


@pytest.mark.parametrize("path", _vectors(), ids=lambda p: p.stem)
def test_conformance_vector_spec_survives_the_round_trip(path: Path) -> None:
    vector = json.loads(path.read_text())
    spec = parse_flags(vector["args"])
    again = parse_flags(to_args(spec))
    assert again == spec
    assert render(again).sha256() == render(spec).sha256()


def test_the_vectors_are_there() -> None:
    assert len(_vectors()) >= 10, f"conformance vectors not found under {VECTORS}"


port = st.integers(0, 65535).map(str)
# Ranges in iptables' spelling (with open ends too), repeats allowed: what either mode renders.
port_range = st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(lambda r: f"{min(r)}:{max(r)}")
# nft's spelling too, which the iptables renderer refuses (the spec keeps it).
nft_port_range = port_range.map(lambda r: r.replace(":", "-"))
ports = st.lists(st.one_of(port, port_range, st.sampled_from([":80", "8000:"])), max_size=4).map(",".join)
any_ports = st.lists(st.one_of(port, port_range, nft_port_range), max_size=4).map(",".join)
cidrs = st.lists(
    st.sampled_from(["10.0.0.0/8", "192.168.1.5/24", "fd00::/8", "::1/128", "0.0.0.0/0", "172.16.0.0/12"]),
    max_size=3,
).map(",".join)
odd_cidrs = ["10.0.0.0/8,10.0.0.0/8", "::ffff:127.0.0.1/128", "::ffff:10.1.2.3/120"]
cidrs = st.one_of(cidrs, st.sampled_from(odd_cidrs))
flags = st.fixed_dictionaries(
    {},
    optional={
        "-p": st.integers(1, 65535).map(str),
        "-z": st.integers(1, 65535).map(str),
        "-u": st.lists(st.integers(0, 70000), min_size=1, max_size=3).map(lambda u: ",".join(map(str, u))),
        "-g": st.lists(st.integers(0, 70000), min_size=1, max_size=3).map(lambda u: ",".join(map(str, u))),
        "-m": st.sampled_from(["REDIRECT", "TPROXY"]),
        "-b": st.one_of(st.just("*"), ports),
        "-d": ports,
        "-i": st.one_of(st.just("*"), cidrs),
        "-x": cidrs,
        "-q": ports,
        "-o": ports,
        "-e": st.one_of(port, port_range),
        "-t": st.integers(0, 2**32 - 1).map(str),
        "-r": st.integers(0, 2**32 - 1).map(str),
        "-k": st.sampled_from(["", "eth1", "net1,net2", "veth+,veth+"]),
        "-c": st.sampled_from(["", "eth9", "lo2,x.y", "eth+"]),
        "--dns-servers-v4": st.sampled_from(["", "10.96.0.10", "1.1.1.1,8.8.8.8"]),
        "--dns-servers-v6": st.sampled_from(["", "fd00::a", "::127.0.0.53"]),
        "--owner-groups-include": st.sampled_from(["*", "", "1000", "java,1001,java"]),
        "--owner-groups-exclude": st.sampled_from(["", "1000", "ftp,ftp"]),
        "--host-ipv4-loopback-cidr": st.sampled_from(["127.0.0.1/32", "127.0.0.1/8"]),
    },
)
# Beyond what the iptables renderer takes: nft's range spelling.
any_flags = st.one_of(flags, st.fixed_dictionaries({"-o": any_ports, "-e": st.one_of(port, nft_port_range)}))
switches = st.sets(st.sampled_from(["--redirect-dns", "--capture-all-dns", "--drop-invalid", "--ipv6"]))


@settings(max_examples=300, deadline=None)
@given(any_flags, switches)
def test_any_spec_survives_the_round_trip(values: dict[str, str], on: set[str]) -> None:
    argv = [f"{k}={v}" for k, v in values.items()] + sorted(on)
    try:
        spec = parse_flags(argv)
    except SpecError:
        return  # not a spec: nothing to keep
    assert parse_flags(to_args(spec)) == spec
