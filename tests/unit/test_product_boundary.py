"""The product ships alone: it never imports the development package or a test tool, and its
runtime dependencies are exactly what it imports.

``istio_pod_network_controller`` is what the image installs; ``ipnc_dev`` (``dev/``: the test
harness, the node stand-in, ``demo`` and ``dev``) is installed beside it only in a checkout. An
import of ``ipnc_dev`` from the product would work in every test here and fail in the image, so
it is caught from the source: every module's imports, function-level ones and
``importlib.import_module("literal")`` included, are walked with ``ast``. The same walk checks
that ``pyproject.toml``'s runtime dependencies are the distributions the product imports, and
that the node stand-in has its own watch rather than the agent's reflector.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ROOT / "src" / "istio_pod_network_controller"
DEV = ROOT / "dev" / "src" / "ipnc_dev"

# What the product must never reach: the development package and the tools only tests use.
FORBIDDEN = ("ipnc_dev", "pytest", "_pytest", "hypothesis", "rich", "cryptography")


@dataclass(frozen=True)
class Import:
    module: str  # absolute, dotted
    file: Path
    line: int

    def where(self, root: Path) -> str:
        return f"{self.file.relative_to(root)}:{self.line}"


def _package_of(file: Path, root: Path) -> list[str]:
    """The dotted package a module is in (``root`` is the top package's folder)."""
    parts = [root.name, *file.relative_to(root).parts[:-1]]
    return parts


def _absolute(level: int, module: str | None, file: Path, root: Path) -> str:
    if level == 0:
        return module or ""
    base = _package_of(file, root)
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, module] if module else base)


def _literal_import_module(node: ast.Call) -> str | None:
    """The module named by ``importlib.import_module("x")``, ``import_module("x")`` or
    ``__import__("x")`` when it is a string literal (a computed name cannot be checked here)."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def imports_in(root: Path) -> Iterator[Import]:
    """Every import of every module below ``root``, at any depth of the code."""
    for file in sorted(root.rglob("*.py")):
        tree = ast.parse(file.read_text(), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(alias.name, file, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node.level, node.module, file, root)
                yield Import(base, file, node.lineno)
                for alias in node.names:  # `from x import y` may import the module x.y
                    yield Import(f"{base}.{alias.name}", file, node.lineno)
            elif isinstance(node, ast.Call):
                named = _literal_import_module(node)
                if named is not None and not named.startswith("."):
                    yield Import(named, file, node.lineno)


def _reaches(module: str, top: str) -> bool:
    return module == top or module.startswith(top + ".")


def forbidden_imports(root: Path, forbidden: tuple[str, ...] = FORBIDDEN) -> list[str]:
    """``path:line imports module`` for each import below ``root`` that reaches a forbidden name."""
    found = {
        f"{i.where(root.parent)} imports {i.module}"
        for i in imports_in(root)
        if any(_reaches(i.module, top) for top in forbidden)
    }
    return sorted(found)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_tops(root: Path) -> dict[str, Import]:
    first_party = root.name
    tops: dict[str, Import] = {}
    for i in imports_in(root):
        top = i.module.split(".")[0]
        if top and top != first_party and top not in sys.stdlib_module_names:
            tops.setdefault(top, i)
    return tops


def _declared_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normalized(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]) for req in project["dependencies"]}


# -- the product -------------------------------------------------------------------------------


def test_the_product_imports_neither_the_development_package_nor_a_test_tool() -> None:
    found = forbidden_imports(PRODUCT)
    assert not found, (
        "the product must run without the development package and the test tools (they are not in "
        "the image): " + "; ".join(found)
    )


def test_runtime_dependencies_are_exactly_what_the_product_imports() -> None:
    distributions = importlib.metadata.packages_distributions()
    declared = _declared_dependencies()
    providers: set[str] = set()
    undeclared: list[str] = []
    for top, where in sorted(_third_party_tops(PRODUCT).items()):
        # a name several distributions fill (lightkube and lightkube-models) needs one of them
        candidates = {_normalized(name) for name in distributions.get(top, [])}
        assert candidates, f"{where.where(ROOT)} imports {top!r}, which no installed distribution provides"
        providers |= candidates
        if not candidates & declared:
            undeclared.append(f"{top} ({where.where(ROOT)}; from {', '.join(sorted(candidates))})")
    unused = sorted(declared - providers)
    assert not undeclared, "pyproject.toml does not declare what the product imports: " + "; ".join(
        undeclared
    )
    assert not unused, "pyproject.toml declares runtime dependencies the product never imports: " + ", ".join(
        unused
    )


def test_the_node_stand_in_has_its_own_watch_not_the_agents_reflector() -> None:
    """A bug in the agent's list+watch must not act on both sides of a cluster test at once."""
    found = forbidden_imports(DEV / "standin", ("istio_pod_network_controller.cluster.reflector",))
    assert not found, "; ".join(found)


# -- the check itself --------------------------------------------------------------------------


PLANTED = {  # each form, its import on the line marked "planted"
    "top-level": "from ipnc_dev import chart  # planted\n",
    "function-level": "def _later() -> None:\n    import ipnc_dev.demo.orchestration  # planted\n",
    "import_module": "import importlib\n\nDEMO = importlib.import_module('ipnc_dev.demo')  # planted\n",
    "test tool": "def _debug() -> None:\n    from rich.console import Console  # planted\n",
}


@pytest.mark.parametrize("form", sorted(PLANTED))
def test_the_check_fails_on_a_planted_import_naming_the_module_and_line(form: str, tmp_path: Path) -> None:
    copy = tmp_path / PRODUCT.name
    shutil.copytree(PRODUCT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert not forbidden_imports(copy), "the copy must start clean"
    target = copy / "commands" / "rules.py"
    target.write_text(target.read_text() + "\n\n" + PLANTED[form])
    line = next(n for n, text in enumerate(target.read_text().splitlines(), 1) if text.endswith("# planted"))

    found = forbidden_imports(copy)

    assert found, f"a planted {form} import went unnoticed"
    assert all(f.startswith(f"{PRODUCT.name}/commands/rules.py:{line} imports ") for f in found), found
    assert any(re.search(r" imports (ipnc_dev|rich)\b", f) for f in found), f"names what is imported: {found}"


def test_the_walk_sees_what_it_checks() -> None:
    """Guard against a walk that silently finds nothing (and so passes)."""
    modules = {i.module for i in imports_in(PRODUCT)}
    assert {"aiohttp", "yaml", "lightkube.config.kubeconfig"} <= modules
    assert "istio_pod_network_controller.spec" in modules  # relative imports resolved
    nested = [i for i in imports_in(PRODUCT) if i.module == "inotify_simple"]
    assert nested, "the waiter's function-level import of inotify_simple is seen"
    assert forbidden_imports(DEV), "the development package does import the test tools"
