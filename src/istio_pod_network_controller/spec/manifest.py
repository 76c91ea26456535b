"""Read a pod out of a manifest file: a Pod, or a workload's pod template (JSON or YAML).

`rules --pod` and `apply --pod` accept what administrators have at hand: a Pod, a Deployment
(or StatefulSet, DaemonSet, ReplicaSet, Job, CronJob), as JSON or YAML, from a file or stdin.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import yaml

from ..bounded import BoundedJsonError, JsonLimitError, loads_bounded
from ..podfacts import as_mapping
from .errors import show
from .limits import MAX_MANIFEST_BYTES, MAX_MANIFEST_DEPTH


class ManifestError(ValueError):
    """The file cannot be read, or holds no pod we can take."""


TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"}


# libyaml's parser when PyYAML was built with it (several times faster), else the Python one.
_YamlLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_yaml_events(text: str, path: str) -> None:
    """One pass over the YAML events, before anything is built from them: refuse aliases (a few
    lines of them stand for an exponentially large document that any walk of the result pays
    for) and nesting past MAX_MANIFEST_DEPTH (PyYAML's composer recurses once per level)."""
    depth = 0
    for event in yaml.parse(text, Loader=_YamlLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ManifestError(f"{path}: {_line(event)}aliases (*name) are not accepted in a manifest")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_MANIFEST_DEPTH:
                raise ManifestError(
                    f"{path}: {_line(event)}nested more than the limit of {MAX_MANIFEST_DEPTH} levels deep"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _line(event: yaml.Event) -> str:
    mark = event.start_mark
    return "" if mark is None else f"line {mark.line + 1}: "


def _read_text(path: str) -> str:
    """At most MAX_MANIFEST_BYTES of the file (or stdin), as text."""
    try:
        if path == "-":
            binary = getattr(sys.stdin, "buffer", None)  # absent when stdin is replaced by text
            if binary is not None:
                data = bytes(binary.read(MAX_MANIFEST_BYTES + 1))
            else:
                data = sys.stdin.read(MAX_MANIFEST_BYTES + 1).encode("utf-8", "surrogateescape")
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} is larger than the limit of {MAX_MANIFEST_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path} is not UTF-8 text (byte {exc.start})") from None


def read_documents(path: str) -> list[Any]:
    """The documents of a JSON or YAML file, read within MAX_MANIFEST_BYTES and
    MAX_MANIFEST_DEPTH (YAML also without aliases): linear in the file's size."""
    text = _read_text(path)
    try:
        return [loads_bounded(text, max_bytes=MAX_MANIFEST_BYTES, max_depth=MAX_MANIFEST_DEPTH, what=path)]
    except JsonLimitError as exc:
        if text.lstrip()[:1] in ("{", "["):  # meant as JSON (or flow YAML, as deep)
            raise ManifestError(str(exc)) from None
    except BoundedJsonError:
        pass  # not JSON: YAML, or neither
    try:
        _check_yaml_events(text, path)
        return [doc for doc in yaml.load_all(text, Loader=_YamlLoader) if doc is not None]
    except ManifestError:
        raise
    except yaml.MarkedYAMLError as exc:
        line = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        reason = show(exc.problem or exc.context)
        raise ManifestError(f"{path} is neither JSON nor YAML: {reason}{line}") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer too long to convert
        raise ManifestError(f"{path} is neither JSON nor YAML: {show(str(exc))}") from None


def pod_from_object(obj: Any) -> dict[str, Any] | None:
    """A Pod as is; a workload's pod template as a Pod (None for other kinds). Fields of the wrong
    type read as absent, as everywhere a pod is read (``podfacts``)."""
    if not isinstance(obj, Mapping):
        return None
    kind = obj.get("kind")
    spec = as_mapping(obj.get("spec"))
    template: Any = None
    if kind == "Pod" or (kind is None and "containers" in spec):
        return dict(obj)
    if kind in TEMPLATE_KINDS:
        template = spec.get("template")
    elif kind == "CronJob":
        template = as_mapping(as_mapping(spec.get("jobTemplate")).get("spec")).get("template")
    if not isinstance(template, Mapping):
        return None
    metadata = dict(as_mapping(template.get("metadata")))
    namespace = as_mapping(obj.get("metadata")).get("namespace")
    if namespace and "namespace" not in metadata:
        metadata["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template.get("spec") or {}}


def load_pod(path: str) -> dict[str, Any]:
    docs = read_documents(path)
    pods = [pod for pod in (pod_from_object(doc) for doc in docs) if pod is not None]
    if not pods:
        raise ManifestError(f"{path} holds no Pod and no workload with a pod template")
    if len(pods) > 1:
        raise ManifestError(f"{path} holds {len(pods)} pods or workloads: pass one")
    return pods[0]


def load_object(path: str) -> dict[str, Any]:
    docs = read_documents(path)
    if len(docs) != 1 or not isinstance(docs[0], Mapping):
        raise ManifestError(f"{path} must hold exactly one object")
    return dict(docs[0])
