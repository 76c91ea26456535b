"""The command line's native nftables mode: `rules --native-nftables` prints the nft transaction,
`apply` refuses an iptables backend with it, `run` takes it from a flag or the environment, and
bad input is refused exactly as in iptables mode."""

from __future__ import annotations

import json

import pytest

from istio_pod_network_controller.cli import main
from istio_pod_network_controller.commands import run as run_command
from istio_pod_network_controller.render.nftables import render_nftables
from istio_pod_network_controller.spec import parse_flags

from .test_bad_input import BAD_FLAGS

SIDECAR = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-b", "*", "--ipv6"]


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_rules_json_holds_the_nft_transaction(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, ["rules", "--native-nftables", "--output", "json", *SIDECAR])
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["nftables"] == render_nftables(parse_flags(SIDECAR)).text()
    assert "iptables" not in doc and "ip6tables" not in doc
    assert doc["spec"]["mode"] == "TPROXY"


def test_rules_json_without_the_flag_stays_iptables(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, ["rules", "--output", "json", *SIDECAR])
    assert code == 0
    assert {"iptables", "ip6tables"} <= set(json.loads(out)) and "nftables" not in json.loads(out)


def test_rules_text_is_the_transaction_and_what_lies_outside_nftables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, ["rules", "--native-nftables", *SIDECAR])
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "# nftables: nft -f -"
    assert "\n".join(lines[1:-2]) + "\n" == render_nftables(parse_flags(SIDECAR)).text()
    assert lines[-2].startswith("# policy route: ip rule add fwmark 1337 lookup 133")
    assert lines[-1] == "# address: ip -6 addr add ::6/128 dev lo"


@pytest.mark.parametrize(("argv", "named"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_input_is_refused_as_in_iptables_mode(
    capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    iptables_mode = run(capsys, ["rules", *argv])
    nft_mode = run(capsys, ["rules", "--native-nftables", *argv])
    assert nft_mode == iptables_mode
    assert nft_mode[0] == 2 and named in nft_mode[2]


def test_apply_refuses_an_iptables_backend_in_nftables_mode(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, ["apply", "--native-nftables", "--backend", "legacy", "--netns", "/x", "-u", "1"]
    )
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "--backend" in err and "--native-nftables" in err


def test_run_takes_the_mode_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(run_command.NATIVE_NFTABLES_ENV, raising=False)
    assert run_command.build_parser().parse_args([]).native_nftables is False
    assert run_command.build_parser().parse_args(["--native-nftables"]).native_nftables is True
    for value, expected in [("true", True), ("TRUE", True), ("1", True), ("false", False), ("", False)]:
        monkeypatch.setenv(run_command.NATIVE_NFTABLES_ENV, value)
        assert run_command.check_env() is None
        assert run_command.build_parser().parse_args([]).native_nftables is expected


@pytest.mark.parametrize("value", ["maybe", "tru", "2", "true\n-x"])
def test_run_refuses_an_environment_value_that_is_not_a_boolean(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    monkeypatch.setenv(run_command.NATIVE_NFTABLES_ENV, value)
    code, out, err = run(capsys, ["run", "--node-name", "n"])
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and run_command.NATIVE_NFTABLES_ENV in err
