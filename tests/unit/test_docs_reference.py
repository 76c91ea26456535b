"""The reference docs cannot drift from the code (issue 8, acceptance 3).

``docs/configuration.md`` must name every flag of every subcommand (read from the real argparse
parsers, subcommands of subcommands included), every environment variable the CLI reads, every
chart value (``values.yaml`` and ``values.schema.json``), every name in ``names.py`` and every
annotation or proxy environment variable the spec builder reads. ``docs/operations.md`` must name
every metric the agent exports, and the README's components table every subcommand. Each test
fails with the list of what is missing and where it belongs.

A name counts as documented when it appears inside a code span (`like this`) as a whole token,
so ``--port`` is not satisfied by ``--portal`` nor ``init`` by ``istio-init``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from istio_pod_network_controller import cli, names, podfacts
from istio_pod_network_controller.observe import Metrics
from istio_pod_network_controller.spec import pod as pod_spec
from istio_pod_network_controller.spec.flags import FLAGS

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = ROOT / "docs" / "configuration.md"
OPERATIONS = ROOT / "docs" / "operations.md"
README = ROOT / "README.md"
CHART = ROOT / "chart" / "istio-pod-network-controller"
PACKAGE = ROOT / "src" / "istio_pod_network_controller"
DEV_PACKAGE = ROOT / "dev" / "src" / "ipnc_dev"

# Section titles of configuration.md (one per subcommand: "`run`", "`dev cluster`", ...).
REDIRECT_SECTION = "istio-iptables flags"
VALUES_SECTION = "Chart values"
NAMES_SECTION = "Annotations, labels and names"

REDIRECT_OPTIONS = frozenset(name for flag in FLAGS for name in flag.names)
ENV_IN_HELP = re.compile(r"\benv ([A-Z][A-Z0-9_]*)")
ENV_IN_SOURCE = re.compile(
    # a read of a variable; an assignment (``env["X"] = ...``, setting a child's environment) is not
    r"""(?:environ\.get|environ\[|\benv\.get|\benv\[|\b_env)\(?\s*["']([A-Z][A-Z0-9_]*)["'](?!\s*\]\s*=(?!=))"""
)


# -- reading the docs --------------------------------------------------------------------------


def code_spans(markdown: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", markdown)


def sections(markdown: str) -> dict[str, str]:
    """Heading title -> its text, up to the next heading of the same or a higher level."""
    lines = markdown.splitlines()
    heads: list[tuple[int, int, str]] = []
    for i, line in enumerate(lines):
        match = re.match(r"(#{1,6}) (.+)", line)
        if match:
            heads.append((i, len(match.group(1)), match.group(2).strip()))
    found: dict[str, str] = {}
    for n, (start, level, title) in enumerate(heads):
        end = next((i for i, lv, _ in heads[n + 1 :] if lv <= level), len(lines))
        found[title] = "\n".join(lines[start + 1 : end])
    return found


def mentions(markdown: str, token: str) -> bool:
    """``token`` appears in a code span, not as part of a longer word, flag, path or key."""
    pattern = re.compile(rf"(?<![\w./-]){re.escape(token)}(?![\w./-])")
    return any(pattern.search(span) for span in code_spans(markdown))


def section(markdown: str, title: str) -> str:
    found = sections(markdown)
    assert title in found, f"{CONFIGURATION.name} has no section titled {title!r}"
    return found[title]


# -- reading the code --------------------------------------------------------------------------


def _walk(name: str, parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _walk(f"{name} {sub}", subparser)


def command_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command's complete parser, from ``commands/<module>.py:build_parser()`` (the
    development package's ``demo`` and ``dev`` included, which ``scripts/setup`` installs)."""
    found: list[tuple[str, argparse.ArgumentParser]] = []
    for name in cli.command_names():
        module = cli.load_command(name)
        build = getattr(module, "build_parser", None)
        assert callable(build), (
            f"{module.__name__} has no build_parser() returning its complete argparse parser; "
            "add one so that its flags can be checked against docs/configuration.md"
        )
        parser = build()
        assert isinstance(parser, argparse.ArgumentParser)
        found += _walk(name, parser)
    return found


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions
        if action.option_strings
        and not isinstance(action, argparse._HelpAction)
        and action.help != argparse.SUPPRESS
    ]


def has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def value_paths() -> set[str]:
    """Dotted paths of every chart value: the keys of values.yaml (down to the objects the schema
    leaves free-form, such as ``agent.resources.requests``) and every leaf of the schema."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    paths: set[str] = set()

    def from_values(node: Any, schema_node: Mapping[str, Any], prefix: str) -> None:
        properties = schema_node.get("properties")
        if isinstance(node, dict) and node and isinstance(properties, dict):
            for key, child in node.items():
                from_values(child, properties.get(key, {}), f"{prefix}.{key}" if prefix else key)
        else:
            paths.add(prefix)

    def from_schema(schema_node: Mapping[str, Any], prefix: str) -> None:
        properties = schema_node.get("properties")
        if isinstance(properties, dict) and properties:
            for key, child in properties.items():
                from_schema(child, f"{prefix}.{key}" if prefix else key)
        else:
            paths.add(prefix)

    from_values(values, schema, "")
    from_schema(schema, "")
    paths.discard("")
    return paths


def environment_variables_in_source() -> set[str]:
    """Variables read by the package and by the development package, whose ``demo`` and ``dev``
    are subcommands too (``dev cluster`` finds its binaries through ``ipnc_dev.binaries``)."""
    # Every module of both: the answer must not depend on which modules other tests happened to
    # import first.
    files = set(PACKAGE.rglob("*.py")) | set(DEV_PACKAGE.rglob("*.py"))
    return {var for f in files for var in ENV_IN_SOURCE.findall(f.read_text())}


def constants(module: Any, prefixes: tuple[str, ...] = ("",)) -> dict[str, str]:
    return {
        key: value
        for key, value in vars(module).items()
        if key.isupper() and key.startswith(prefixes) and isinstance(value, str)
    }


# -- the tests ---------------------------------------------------------------------------------


def test_every_flag_of_every_subcommand_is_in_its_section() -> None:
    doc = CONFIGURATION.read_text()
    titles = sections(doc)
    redirect = section(doc, REDIRECT_SECTION)
    missing: list[str] = []
    for name, parser in command_parsers():
        actions = documented_actions(parser)
        title = f"`{name}`"
        if title not in titles:
            if actions or not has_subcommands(parser):
                missing.append(f"section {title} (for `{cli.PROG} {name}`)")
            continue
        text = titles[title]
        for action in actions:
            for option in action.option_strings:
                where = redirect if option in REDIRECT_OPTIONS else text
                if not mentions(where, option):
                    place = REDIRECT_SECTION if option in REDIRECT_OPTIONS else title
                    missing.append(f"{name} {option} (in section {place})")
    assert not missing, f"{CONFIGURATION.relative_to(ROOT)} does not document: " + "; ".join(missing)


def test_every_environment_variable_is_documented() -> None:
    doc = CONFIGURATION.read_text()
    titles = sections(doc)
    missing: list[str] = []
    for name, parser in command_parsers():
        for action in documented_actions(parser):
            for variable in ENV_IN_HELP.findall(action.help or ""):
                if not mentions(titles.get(f"`{name}`", ""), variable):
                    missing.append(f"{variable} (env of `{name} {action.option_strings[0]}`)")
    for variable in sorted(environment_variables_in_source()):
        if not mentions(doc, variable):
            missing.append(f"{variable} (read by the code)")
    assert not missing, f"{CONFIGURATION.relative_to(ROOT)} does not document: " + "; ".join(missing)


def test_every_chart_value_is_documented() -> None:
    documented = set(code_spans(section(CONFIGURATION.read_text(), VALUES_SECTION)))
    missing = sorted(value_paths() - documented)
    assert not missing, (
        f"{CONFIGURATION.relative_to(ROOT)}, section {VALUES_SECTION!r}, does not document the chart "
        "values: " + ", ".join(missing)
    )


def test_every_annotation_label_and_name_is_documented() -> None:
    text = section(CONFIGURATION.read_text(), NAMES_SECTION)
    wanted = {f"names.{k}": v for k, v in constants(names).items()}
    read_from_pods = constants(pod_spec, ("ANN_", "ENV_"))
    wanted |= {f"spec.pod.{k}": v for k, v in read_from_pods.items()}
    containers = constants(podfacts, ("PROXY_CONTAINER", "INIT_CONTAINER"))
    wanted |= {f"podfacts.{k}": v for k, v in containers.items()}
    missing = sorted(f"{value!r} ({key})" for key, value in wanted.items() if not mentions(text, value))
    assert not missing, (
        f"{CONFIGURATION.relative_to(ROOT)}, section {NAMES_SECTION!r}, does not document: "
        + ", ".join(missing)
    )


def test_every_metric_is_in_the_operations_guide() -> None:
    doc = OPERATIONS.read_text()
    exported: list[str] = []
    for family in Metrics().registry.collect():
        exported.append(f"{family.name}_total" if family.type == "counter" else family.name)
    missing = [name for name in exported if not mentions(doc, name)]
    assert exported, "the agent's metrics registry is empty"
    assert not missing, f"{OPERATIONS.relative_to(ROOT)} does not document: " + ", ".join(missing)


def test_the_readme_components_table_lists_every_subcommand() -> None:
    rows = re.findall(r"^\| `([a-z-]+)` \|", README.read_text(), flags=re.MULTILINE)
    missing = [name for name in cli.command_names() if name not in rows]
    assert not missing, "README.md's components table has no row for: " + ", ".join(missing)


def test_the_checks_see_what_they_check() -> None:
    """Guard against a walk that silently finds nothing (and so passes)."""
    parsers = dict(command_parsers())
    assert {"run", "webhook", "init", "rules", "apply", "demo", "dev cluster"} <= set(parsers)
    assert any(a.option_strings == ["--node-name"] for a in parsers["run"]._actions)
    assert {"agent.workers", "webhook.failurePolicy", "waiter.verify"} <= value_paths()
    assert {"KUBECONFIG", "POD_NAMESPACE"} <= environment_variables_in_source()
    assert mentions("a `--port` b", "--port") and not mentions("a `--portal` b", "--port")
    assert not mentions("`istio-init`", "init") and not mentions("--port", "--port")
