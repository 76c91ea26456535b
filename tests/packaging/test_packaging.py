"""What ``pip install .`` gives (the image's Dockerfile does just that): the product alone.

The wheel holds ``istio_pod_network_controller`` and nothing of the development package, the
test harness or the demo; installed into an empty virtual environment it brings the product and
its runtime dependencies only, and the commands that run in a cluster work from it. Needs pip to
reach PyPI (or its cache) for the build backend and the dependencies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
PRODUCT = "istio-pod-network-controller"
NOT_IN_THE_PRODUCT = ("ipnc_dev", "testing/", "demo", "commands/dev.py", "standin", "controlplane")
TEST_TOOLS = {"pytest", "hypothesis", "rich", "cryptography", "pyroute2", "mypy", "ruff", f"{PRODUCT}-dev"}

# Lists what the environment holds and what the product's requirements reach, as JSON; run by the
# new environment's interpreter (which has no pip and no packaging: requirements parsed here).
REACHABLE = r"""
import importlib.metadata as md, json, re
def norm(n): return re.sub(r"[-_.]+", "-", n).lower()
installed = {norm(d.metadata["Name"]): d for d in md.distributions()}
seen, todo = set(), [("istio-pod-network-controller", frozenset())]
while todo:
    name, extras = todo.pop()
    if (name, extras) in seen or name not in installed:
        continue
    seen.add((name, extras))
    for req in installed[name].requires or []:
        spec, _, marker = req.partition(";")
        wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if wanted and not set(map(norm, wanted)) & extras:
            continue
        m = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", spec)
        asked = frozenset(norm(e) for e in (m.group(2) or "").split(",") if e.strip())
        todo.append((norm(m.group(1)), asked))
print(json.dumps({"installed": sorted(installed), "reachable": sorted({n for n, _ in seen})}))
"""


def _run(
    argv: list[str], timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=env)  # noqa: S603


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = _run([*PIP, "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = out.glob("*.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Iterator[Path]:
    """A new virtual environment (no pip of its own) with ``pip install <checkout>`` done."""
    where = tmp_path_factory.mktemp("venv") / "env"
    done = _run([sys.executable, "-m", "venv", "--without-pip", str(where)])
    assert done.returncode == 0, done.stderr
    python = where / "bin" / "python"
    done = _run([*PIP, "--python", str(python), "install", "-q", str(ROOT)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    yield where


def test_the_wheel_holds_the_product_and_nothing_of_the_harness_or_the_demo(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"istio_pod_network_controller"}, packages
    assert "istio_pod_network_controller/cli.py" in names
    assert "istio_pod_network_controller/commands/webhook.py" in names
    leaked = [n for n in names if any(part in n for part in NOT_IN_THE_PRODUCT)]
    assert not leaked, f"the wheel ships development code: {leaked}"
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    runtime = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert runtime and not [r for r in runtime if r.split(">")[0].split("=")[0].strip() in TEST_TOOLS], (
        runtime
    )


def test_an_empty_venv_gets_only_the_product_and_its_runtime_dependencies(venv: Path) -> None:
    done = _run([str(venv / "bin" / "python"), "-c", REACHABLE])
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    installed, reachable = set(found["installed"]), set(found["reachable"])
    assert PRODUCT in installed and "aiohttp" in reachable, found
    assert not installed & TEST_TOOLS, f"test tools installed with the product: {installed & TEST_TOOLS}"
    extra = sorted(installed - reachable)
    assert not extra, f"installed, but no runtime dependency of the product needs them: {extra}"


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--help"],
        ["webhook", "--help"],
        ["init", "--help"],
        ["apply", "--help"],
    ],
)
def test_the_cluster_commands_run_from_it(venv: Path, argv: list[str]) -> None:
    done = _run(
        [str(venv / "bin" / PRODUCT), *argv], env={**os.environ, "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {PRODUCT} {argv[0]}"), done.stdout[:300]


def test_rules_prints_the_ruleset_from_it(venv: Path) -> None:
    argv = ["rules", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*"]
    done = _run([str(venv / "bin" / PRODUCT), *argv, "--output", "json"])
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "ISTIO_REDIRECT" in text and "15001" in text
    assert json.loads(text), "the JSON output parses"


def test_demo_and_dev_are_absent_from_it_and_say_where_to_get_them(venv: Path) -> None:
    cli = str(venv / "bin" / PRODUCT)
    usage = _run([cli, "--help"]).stdout
    assert "\n  run " in usage and "\n  demo " not in usage and "\n  dev " not in usage, usage
    for name in ("demo", "dev"):
        done = _run([cli, name])
        assert done.returncode == 1
        assert done.stderr.strip() == (
            f"{PRODUCT} {name}: not installed: the development package (run ./scripts/setup from a checkout)"
        )
