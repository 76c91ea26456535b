"""A pod's volumes on a node stand-in, laid out as the kubelet's (``<workdir>/pods/<uid>/volumes/
kubernetes.io~<type>/<name>``): downward API files rewritten by the atomic writer whenever the
pod's labels or annotations change; service account tokens (TokenRequest), config maps and
secrets read once; emptyDir folders. What cannot be had leaves a note on the pod, not a stuck pod.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from typing import Any

from istio_pod_network_controller.cluster.api import ApiError

from . import kubelet
from .state import NodeContext, PodState, Volume


class Volumes:
    """Prepares and refreshes the volumes of one stand-in's pods (in its thread)."""

    def __init__(self, node: NodeContext) -> None:
        self.node = node

    async def prepare(self, pod: PodState) -> None:
        for item in pod.spec.get("volumes") or []:
            name = str(item.get("name"))
            if "downwardAPI" in item:
                source = item["downwardAPI"] or {}
                volume = self._volume(pod, "downward-api", name, source.get("defaultMode"))
                volume.downward = list(source.get("items") or [])
            elif "projected" in item:
                source = item["projected"] or {}
                volume = self._volume(pod, "projected", name, source.get("defaultMode"))
                for projection in source.get("sources") or []:
                    if "downwardAPI" in projection:
                        volume.downward += list((projection["downwardAPI"] or {}).get("items") or [])
                    else:
                        volume.static.update(await self._projection(pod, name, projection))
            elif "configMap" in item or "secret" in item:
                kind = "configmap" if "configMap" in item else "secret"
                source = item.get("configMap") or item.get("secret") or {}
                volume = self._volume(pod, kind, name, source.get("defaultMode"))
                volume.static = await self._projection(
                    pod, name, {"configMap" if kind == "configmap" else "secret": source}
                )
            else:
                volume = self._volume(pod, "empty-dir", name, None)
                volume.directory.mkdir(parents=True, exist_ok=True)
                os.chmod(volume.directory, 0o777)
                if "emptyDir" not in item:
                    kinds = [k for k in item if k != "name"]
                    pod.notes.append(f"volume {name}: {kinds} not modelled, an empty folder")
                continue
            pod.volumes[name] = volume
        pod.volumes_ready = True
        self.refresh_downward(pod)

    def _volume(self, pod: PodState, kind: str, name: str, mode: Any) -> Volume:
        directory = pod.dir / "volumes" / f"kubernetes.io~{kind}" / name
        volume = Volume(directory, mode if isinstance(mode, int) else 0o644)
        pod.volumes[name] = volume
        return volume

    async def _projection(self, pod: PodState, volume: str, source: Mapping[str, Any]) -> dict[str, bytes]:
        """Files of a service account token, config map or secret source (empty, with a note on
        the pod, when it cannot be had)."""
        api = self.node.the_api()
        try:
            if "serviceAccountToken" in source:
                token = source["serviceAccountToken"] or {}
                account = str(pod.spec.get("serviceAccountName") or "default")
                body = {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {
                        "audiences": [token["audience"]] if token.get("audience") else [],
                        "expirationSeconds": int(token.get("expirationSeconds") or 3600),
                        "boundObjectRef": {
                            "apiVersion": "v1",
                            "kind": "Pod",
                            "name": pod.name,
                            "uid": pod.uid,
                        },
                    },
                }
                path = f"/api/v1/namespaces/{pod.namespace}/serviceaccounts/{account}/token"
                answer = await api.create(path, body)
                return {str(token.get("path") or "token"): str(answer["status"]["token"]).encode()}
            kind = "configMap" if "configMap" in source else "secret"
            ref = source[kind] or {}
            ref_name = str(ref.get("name") or ref.get("secretName") or "")
            plural = "configmaps" if kind == "configMap" else "secrets"
            try:
                obj = await api.get(f"/api/v1/namespaces/{pod.namespace}/{plural}/{ref_name}")
            except ApiError as exc:
                if exc.status == 404 and ref.get("optional"):
                    return {}
                raise
            data: dict[str, bytes] = {}
            for key, value in (obj.get("data") or {}).items():
                data[key] = base64.b64decode(value) if kind == "secret" else str(value).encode()
            for key, value in (obj.get("binaryData") or {}).items():
                data[key] = base64.b64decode(value)
            items = ref.get("items")
            if not items:
                return data
            return {str(i["path"]): data[i["key"]] for i in items if i.get("key") in data and i.get("path")}
        except (ApiError, KeyError, ValueError) as exc:
            pod.notes.append(f"volume {volume}: {sorted(source)} not available: {exc}")
            return {}

    def refresh_downward(self, pod: PodState) -> None:
        """Rewrite each volume whose content changed (downward API values follow the pod)."""
        if not pod.volumes_ready:
            return
        effective = self.node.effective_pod(pod)
        for volume in pod.volumes.values():
            files = {**volume.static, **kubelet.downward_files(volume.downward, effective)}
            if files != volume.written:
                kubelet.write_atomic(volume.directory, files, volume.mode)
                volume.written = files
