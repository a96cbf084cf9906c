"""The one small client for the dev cluster's API, shared by the dev cluster, the node agent, the demo and the
tests: REST over the standard library (client certificates from a kubeconfig or from files), watches, and the
real `kubectl` for what users would type.

Standard library only (plus PyYAML for kubeconfigs that are not JSON), so that `devcluster up` starts fast.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call; its message includes the command and kubectl's stderr."""

    def __str__(self) -> str:
        return f"`{' '.join(map(str, self.cmd))}` exited {self.returncode}:\n{self.stderr}"


class ApiError(RuntimeError):
    """The API answered with an error status."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.body = body


def _ssl_context(ca: bytes, cert: bytes, key: bytes) -> ssl.SSLContext:
    """An SSL context from PEM bytes (the ssl module loads client certificates from files only)."""
    context = ssl.create_default_context(cadata=ca.decode())
    with tempfile.TemporaryDirectory(prefix="fto-kube-") as tmp:
        cert_file, key_file = Path(tmp) / "client.crt", Path(tmp) / "client.key"
        cert_file.write_bytes(cert)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key)
        context.load_cert_chain(str(cert_file), str(key_file))
    return context


class Api:
    """REST against one API server with a client certificate. Errors come back as (status, body) from
    `request`, or raise ApiError from the typed helpers (404 from `get` is None)."""

    def __init__(self, base_url: str, context: ssl.SSLContext) -> None:
        self.base_url = base_url.rstrip("/")
        self.context = context
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )

    @classmethod
    def from_files(cls, base_url: str, ca: Path, cert: Path, key: Path) -> Api:
        return cls(base_url, _ssl_context(ca.read_bytes(), cert.read_bytes(), key.read_bytes()))

    @classmethod
    def from_kubeconfig(cls, path: Path) -> Api:
        """The current context's server and client certificate (embedded data or file paths)."""
        text = path.read_text()
        try:
            config = json.loads(text)
        except ValueError:
            import yaml

            config = yaml.safe_load(text)
        current = config.get("current-context")
        contexts = {c["name"]: c["context"] for c in config.get("contexts", [])}
        context = contexts.get(current) or next(iter(contexts.values()))
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])

        def material(entry: Mapping[str, Any], key: str) -> bytes:
            if f"{key}-data" in entry:
                return base64.b64decode(entry[f"{key}-data"])
            if key in entry:
                return (path.parent / str(entry[key])).read_bytes()
            raise ValueError(f"{path}: no {key} for the current context (client certificates only)")

        return cls(
            cluster["server"],
            _ssl_context(
                material(cluster, "certificate-authority"),
                material(user, "client-certificate"),
                material(user, "client-key"),
            ),
        )

    # ------------------------------------------------------------------------------------- raw

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        content_type: str = "application/json",
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                raw = resp.read()
                status = int(resp.status)
        except urllib.error.HTTPError as err:
            raw = err.read()
            status = err.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def ok(self, path: str, timeout: float = 3.0) -> bool:
        try:
            status, _ = self.request("GET", path, timeout=timeout)
        except (OSError, ssl.SSLError):
            return False
        return status == 200

    def _checked(self, method: str, path: str, status: int, body: Any, allowed: tuple[int, ...]) -> Any:
        if status not in allowed:
            raise ApiError(method, path, status, body)
        return body

    # ------------------------------------------------------------------------------------- typed

    def get(self, path: str) -> dict[str, Any] | None:
        status, body = self.request("GET", path)
        if status == 404:
            return None
        result: dict[str, Any] = self._checked("GET", path, status, body, (200,))
        return result

    def list(self, path: str, **params: str) -> dict[str, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = self.request("GET", path + query, timeout=30.0)
        result: dict[str, Any] = self._checked("GET", path, status, body, (200,))
        return result

    def create(self, collection: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        status, body = self.request("POST", collection, dict(obj))
        result: dict[str, Any] = self._checked("POST", collection, status, body, (200, 201))
        return result

    def patch(
        self, path: str, patch: Mapping[str, Any], content_type: str = MERGE_PATCH
    ) -> dict[str, Any] | None:
        """Merge-patch (default) an object; None when it does not exist."""
        status, body = self.request("PATCH", path, dict(patch), content_type)
        if status == 404:
            return None
        result: dict[str, Any] = self._checked("PATCH", path, status, body, (200, 201))
        return result

    def delete(self, path: str, options: Mapping[str, Any] | None = None) -> bool:
        """Delete; False when it was already gone (or the precondition no longer holds)."""
        status, body = self.request("DELETE", path, dict(options) if options else None)
        if status in (404, 409):
            return False
        self._checked("DELETE", path, status, body, (200, 202))
        return True

    def create_or_update(self, collection: str, obj: Mapping[str, Any]) -> None:
        """POST; on conflict, merge-patch the object (and its status, where given)."""
        status, body = self.request("POST", collection, dict(obj))
        if status == 409:
            name = obj["metadata"]["name"]
            patch = {k: v for k, v in obj.items() if k not in ("status", "apiVersion", "kind")}
            status, body = self.request("PATCH", f"{collection}/{name}", patch, MERGE_PATCH)
            if status == 200 and "status" in obj:
                status, body = self.request(
                    "PATCH", f"{collection}/{name}/status", {"status": obj["status"]}, MERGE_PATCH
                )
        self._checked("PUT", collection, status, body, (200, 201))

    def watch(
        self, path: str, resource_version: str, params: Mapping[str, str] | None = None, timeout_s: int = 60
    ) -> Iterator[dict[str, Any]]:
        """The events of one watch request (ends after `timeout_s`, or on an error event)."""
        query = urllib.parse.urlencode(
            {
                "watch": "1",
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(timeout_s),
                **(params or {}),
            }
        )
        req = urllib.request.Request(f"{self.base_url}{path}?{query}")
        req.add_header("Accept", "application/json")
        with contextlib.closing(self.opener.open(req, timeout=timeout_s + 15)) as resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)


class Kube:
    """The real kubectl and the REST client for one kubeconfig."""

    def __init__(self, kubeconfig: Path, kubectl_path: Path) -> None:
        self.kubeconfig = kubeconfig
        self.kubectl_path = kubectl_path
        self._api: Api | None = None

    @property
    def api(self) -> Api:
        if self._api is None:
            self._api = Api.from_kubeconfig(self.kubeconfig)
        return self._api

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raise KubectlError on a non-zero exit when `check`."""
        cmd = [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args]
        env = dict(os.environ)
        env["NO_PROXY"] = env["no_proxy"] = ",".join(
            h for h in ("127.0.0.1", "localhost", env.get("NO_PROXY", "")) if h
        )
        result = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def kubectl_json(self, *args: str) -> Any:
        """`kubectl ARGS -o json`, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def find(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """`kubectl get KIND NAME -o json`, or None when it does not exist."""
        args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
        if namespace:
            args += ["-n", namespace]
        out = self.kubectl(*args).stdout.strip()
        return json.loads(out) if out else None

    def apply(
        self,
        manifest: dict[str, Any] | list[dict[str, Any]],
        namespace: str | None = None,
        field_manager: str = "fto-tests",
    ) -> None:
        """Create or update objects (server-side apply) from Python dicts."""
        items = manifest if isinstance(manifest, list) else [manifest]
        args = ["apply", "--server-side", f"--field-manager={field_manager}", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        self.kubectl(*args, input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
