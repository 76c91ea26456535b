"""The few Kubernetes API calls the agent makes, as plain JSON over one HTTP/1.1 connection pool.

lightkube supplies configuration and authentication (kubeconfig, in-cluster service account,
exec plugins) and the httpx client; the calls themselves are raw so the agent works on the JSON
dicts the pure layers take, and so the list+watch loop (``reflector``) controls resourceVersions,
bookmarks and 410 Gone itself instead of a library hiding them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx2 as httpx  # the HTTP client lightkube ships with (an httpx fork)
from lightkube.config import client_adapter
from lightkube.config.kubeconfig import KubeConfig

JSON = dict[str, Any]  # an API object or response body, as decoded


class ApiError(Exception):
    """An API call failed; ``status`` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


class Gone(ApiError):
    """410: the resourceVersion is too old; the caller must list again."""


def _error(response: httpx.Response) -> ApiError:
    try:
        message = str(response.json().get("message", response.text))
    except (json.JSONDecodeError, AttributeError):
        message = response.text[:300]
    cls = Gone if response.status_code == 410 else ApiError
    return cls(response.status_code, message)


class Api:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, *, timeout: float = 10.0) -> Api:
        """A kubeconfig file when given, else $KUBECONFIG / ~/.kube/config / in-cluster."""
        config = KubeConfig.from_file(path) if path else KubeConfig.from_env()
        single = config.get()
        if single is None:
            raise ApiError(0, "kubeconfig has no current context")
        params = client_adapter.ConnectionParams(timeout=httpx.Timeout(timeout), trust_env=False)
        return cls(client_adapter.AsyncClient(single, params))

    async def close(self) -> None:
        await self.client.aclose()

    async def _call(self, method: str, path: str, ok: tuple[int, ...], **kwargs: Any) -> JSON:
        """One request; the JSON answer, or ApiError (status 0 when the server was not reached)."""
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"{method} {path}: {exc!r}") from exc
        if response.status_code not in ok:
            raise _error(response)
        body: JSON = response.json()
        return body

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> JSON:
        return await self._call("GET", path, (200,), params=dict(params or {}))

    async def watch(
        self, path: str, params: Mapping[str, str], *, idle_timeout: float
    ) -> AsyncIterator[JSON]:
        """Stream watch events; raises ApiError when the stream breaks or stays silent."""
        timeout = httpx.Timeout(10.0, read=idle_timeout)
        try:
            async with self.client.stream("GET", path, params=dict(params), timeout=timeout) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _error(response)
                async for line in response.aiter_lines():
                    if line:
                        event: JSON = json.loads(line)
                        yield event
        except httpx.HTTPError as exc:
            raise ApiError(0, f"watch {path}: {exc!r}") from exc

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> JSON:
        headers = {"Content-Type": "application/merge-patch+json"}
        return await self._call("PATCH", path, (200,), content=json.dumps(body), headers=headers)

    async def create(self, path: str, body: Mapping[str, Any]) -> JSON:
        return await self._call("POST", path, (200, 201), json=dict(body))
