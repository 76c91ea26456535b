"""Read a pod out of a manifest file: a Pod, or a workload's pod template (JSON or YAML).

`rules --pod` and `apply --pod` accept what administrators have at hand: a Pod, a Deployment
(or StatefulSet, DaemonSet, ReplicaSet, Job, CronJob), as JSON or YAML, from a file or stdin.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class ManifestError(ValueError):
    """The file cannot be read, or holds no pod we can take."""


TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"}


def read_documents(path: str) -> list[Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        pass
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path} is neither JSON nor YAML: {str(exc).splitlines()[0]}") from None


def pod_from_object(obj: Any) -> dict[str, Any] | None:
    """A Pod as is; a workload's pod template as a Pod (None for other kinds)."""
    if not isinstance(obj, Mapping):
        return None
    kind = obj.get("kind")
    raw_spec = obj.get("spec")
    spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
    template: Any = None
    if kind == "Pod" or (kind is None and "containers" in spec):
        return dict(obj)
    if kind in TEMPLATE_KINDS:
        template = spec.get("template")
    elif kind == "CronJob":
        job = spec.get("jobTemplate")
        job_spec = job.get("spec") if isinstance(job, Mapping) else None
        template = job_spec.get("template") if isinstance(job_spec, Mapping) else None
    if not isinstance(template, Mapping):
        return None
    metadata = dict(template.get("metadata") or {})
    namespace = (obj.get("metadata") or {}).get("namespace")
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
