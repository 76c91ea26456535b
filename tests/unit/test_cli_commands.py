"""The CLI's development commands come from the development package's entry points: present in a
checkout set up by ``scripts/setup``, absent (and saying where to get them) where only the
product is installed, as in the image."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import pytest

from istio_pod_network_controller import cli


def _entry(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=cli.ENTRY_POINT_GROUP)


@pytest.fixture
def only_the_product(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As if the development package were not installed."""
    monkeypatch.setattr(
        cli.importlib.metadata, "entry_points", lambda **_: importlib.metadata.EntryPoints(())
    )
    yield


def test_a_checkout_has_demo_and_dev_from_the_development_package() -> None:
    assert {"demo", "dev"} <= set(cli.command_names())
    usage = cli.usage()
    assert "\n  demo " in usage and "\n  dev " in usage
    assert cli.load_command("demo").__name__ == "ipnc_dev.commands.demo"


def test_without_the_development_package_demo_and_dev_are_absent_and_say_where_to_get_them(
    only_the_product: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.command_names() == list(cli.COMMANDS)
    assert "demo" not in cli.usage() and "\n  dev " not in cli.usage()
    for name in ("demo", "dev"):
        assert cli.main([name, "--help"]) == cli.EXIT_FAILURE
        err = capsys.readouterr().err
        assert err == f"{cli.PROG} {name}: {cli.NOT_INSTALLED}\n", err


def test_an_unknown_command_is_invalid_input_with_the_usage(
    only_the_product: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["nope"]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith(f"{cli.PROG}: unknown command 'nope'\n") and "commands:" in err


def test_an_entry_point_never_replaces_a_product_command(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = importlib.metadata.EntryPoints((_entry("init", "ipnc_dev.commands.demo"),))
    monkeypatch.setattr(cli.importlib.metadata, "entry_points", lambda **_: entries)
    assert cli.load_command("init").__name__ == "istio_pod_network_controller.commands.init"
    assert cli.command_names().count("init") == 1


def test_an_entry_point_whose_package_is_gone_reads_as_not_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = importlib.metadata.EntryPoints((_entry("demo", "ipnc_gone_package.commands.demo"),))
    monkeypatch.setattr(cli.importlib.metadata, "entry_points", lambda **_: entries)
    assert cli.main(["demo"]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == f"{cli.PROG} demo: {cli.NOT_INSTALLED}\n"
    assert "(unavailable: " in cli.usage()
