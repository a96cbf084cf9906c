"""Container logs: one file per container run, like the kubelet's /var/log/pods, served on the kubelet's log
endpoint so that `kubectl logs POD [-c C] [--previous] [--tail N] [-f]` works through the API server.

    <agent dir>/logs/<namespace>_<pod>_<uid>/<container>/<restartCount>.log

The endpoint (`GET /containerLogs/{namespace}/{pod}/{container}`) listens on 127.0.0.1 with a certificate from
the dev cluster's CA; the node reports it in `status.daemonEndpoints.kubeletEndpoint` and its address as
InternalIP 127.0.0.1. `timestamps` and `sinceSeconds` are not supported (the files hold no timestamps)."""

from __future__ import annotations

import re
import shutil
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_PATH = re.compile(r"^/containerLogs/([^/]+)/([^/]+)/([^/]+)$")


class LogStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def pod_dir(self, namespace: str, name: str, uid: str) -> Path:
        return self.root / f"{namespace}_{name}_{uid}"

    def path(self, pod: Mapping[str, Any], container: str, restart: int) -> Path:
        meta = pod["metadata"]
        return self.pod_dir(meta["namespace"], meta["name"], meta["uid"]) / container / f"{restart}.log"

    def keep_only(self, uids: set[str]) -> None:
        """Remove the logs of every pod not in `uids` (the pods that still exist)."""
        for folder in self.root.glob("*_*_*"):
            if folder.name.rsplit("_", 1)[1] not in uids:
                shutil.rmtree(folder, ignore_errors=True)

    def remove(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        shutil.rmtree(self.pod_dir(meta["namespace"], meta["name"], meta["uid"]), ignore_errors=True)

    def find(self, namespace: str, name: str, container: str, previous: bool) -> Path | None:
        """The current (or previous) run's log of the newest pod of that name."""
        pods = sorted(self.root.glob(f"{namespace}_{name}_*"), key=lambda p: p.stat().st_mtime)
        if not pods:
            return None
        runs = sorted((pods[-1] / container).glob("*.log"), key=lambda p: int(p.stem))
        index = -2 if previous else -1
        return runs[index] if len(runs) >= -index else None


def tail(data: bytes, lines: int | None, limit: int | None) -> bytes:
    if lines is not None:
        parts = data.splitlines(keepends=True)
        data = b"".join(parts[-lines:]) if lines > 0 else b""
    if limit is not None:
        data = data[:limit]
    return data


class LogServer:
    """The kubelet's log endpoint, for the API server's `pods/log`."""

    def __init__(
        self, store: LogStore, cert: Path, key: Path, running: Callable[[str, str, str], bool]
    ) -> None:
        self.store = store
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.running = running
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, name="kubelet-logs", daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                match = _PATH.match(url.path)
                if not match:
                    self.send_error(404, "only /containerLogs/ is served here")
                    return
                namespace, pod, container = (urllib.parse.unquote(g) for g in match.groups())
                query = dict(urllib.parse.parse_qsl(url.query))
                previous = query.get("previous") == "true"
                path = server.store.find(namespace, pod, container, previous)
                if path is None:
                    what = "previous terminated container" if previous else "container"
                    self.send_error(404, f'{what} "{container}" in pod "{pod}" not found')
                    return
                lines = int(query["tailLines"]) if "tailLines" in query else None
                limit = int(query["limitBytes"]) if "limitBytes" in query else None
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                data = tail(path.read_bytes(), lines, limit)
                self.wfile.write(data)
                if query.get("follow") != "true" or previous:
                    return
                offset = path.stat().st_size
                while server.running(namespace, pod, container):
                    time.sleep(0.5)
                    with path.open("rb") as handle:
                        handle.seek(offset)
                        more = handle.read()
                    if more:
                        offset += len(more)
                        self.wfile.write(more)
                        self.wfile.flush()

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
