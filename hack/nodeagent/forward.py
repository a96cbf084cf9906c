"""Services, reachable the way a user reaches them: for every Service port, a forwarder on a loopback port of
this machine (in the spirit of `kubectl port-forward`; `python -m hack.devcluster services` prints them),
and a listener on the Service's cluster IP inside the node's network namespace, so pods reach Services by
cluster IP.

Each connection goes to one of the ready endpoints of the Service's EndpointSlices (made by the real
controller-manager), round robin, and only to addresses of this dev cluster's pod subnet (kwok's pods have
addresses that lead nowhere). The `kubernetes` Service is the API server: its cluster IP inside the node
namespace forwards to the API server on 127.0.0.1, so pods use it exactly like in a cluster.

Why not kube-proxy: it programs iptables/nftables in the namespace it runs in, and making the host's
network reach pod addresses would mean routes and addresses outside the dev cluster's own namespaces."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hack.nodeagent.network import NodeSockets

Address = tuple[str, int]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def splice(client: socket.socket, upstream: socket.socket) -> None:
    """Copy both ways until both sides are done, then close both."""
    client.settimeout(None)
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


class Listener:
    """Accepts on one socket; each connection is handed to `connect` for its upstream."""

    def __init__(self, sock: socket.socket, connect: Callable[[], socket.socket | None]) -> None:
        self.sock, self.connect = sock, connect
        self.closed = False
        threading.Thread(target=self._accept, name=f"listen-{sock.getsockname()}", daemon=True).start()

    @property
    def address(self) -> Address:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = self.connect()
        except OSError:
            upstream = None
        if upstream is None:
            client.close()  # no ready endpoint: the connection is refused, as with no kube-proxy rule
            return
        splice(client, upstream)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@dataclass(frozen=True)
class ServicePort:
    namespace: str
    service: str
    name: str
    port: int
    cluster_ip: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.service}:{self.name or self.port}"


def service_ports(service: Mapping[str, Any]) -> list[ServicePort]:
    spec, meta = service.get("spec") or {}, service["metadata"]
    cluster_ip = spec.get("clusterIP") or ""
    if spec.get("type") == "ExternalName":
        return []
    return [
        ServicePort(meta["namespace"], meta["name"], p.get("name", ""), int(p["port"]), cluster_ip)
        for p in spec.get("ports", [])
        if p.get("protocol", "TCP") == "TCP"
    ]


def ready_endpoints(
    slices: Iterable[Mapping[str, Any]], port: ServicePort, subnet: ipaddress.IPv4Network
) -> list[Address]:
    """Ready endpoint addresses of this Service port that lie in our pod subnet."""
    found = []
    for item in slices:
        labels = item["metadata"].get("labels") or {}
        if item["metadata"]["namespace"] != port.namespace:
            continue
        if labels.get("kubernetes.io/service-name") != port.service:
            continue
        numbers = [p.get("port") for p in item.get("ports") or [] if (p.get("name") or "") == port.name]
        if not numbers or numbers[0] is None:
            continue
        for endpoint in item.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for address in endpoint.get("addresses", []):
                with contextlib.suppress(ValueError):
                    if ipaddress.ip_address(address) in subnet:
                        found.append((address, int(numbers[0])))
    return sorted(found)


class Forwarders:
    """The listeners for every Service port, kept in line with the Services and EndpointSlices."""

    def __init__(
        self,
        sockets: NodeSockets,
        subnet: ipaddress.IPv4Network,
        api_address: Address,
        state_file: Path,
    ) -> None:
        self.sockets, self.subnet, self.api_address, self.state_file = (
            sockets,
            subnet,
            api_address,
            state_file,
        )
        self.lock = threading.Lock()
        self.listeners: dict[str, list[Listener]] = {}
        self.local: dict[str, Address] = {}
        self.slices: list[Mapping[str, Any]] = []
        self.counter = itertools.count()
        try:
            self.previous = {k: tuple(v) for k, v in json.loads(state_file.read_text()).items()}
        except (OSError, ValueError):
            self.previous = {}

    def _upstream(self, port: ServicePort) -> Callable[[], socket.socket | None]:
        if (port.namespace, port.service) == ("default", "kubernetes"):
            return lambda: socket.create_connection(self.api_address, timeout=5)

        def connect() -> socket.socket | None:
            with self.lock:
                endpoints = ready_endpoints(self.slices, port, self.subnet)
            if not endpoints:
                return None
            target = endpoints[next(self.counter) % len(endpoints)]
            upstream: socket.socket = self.sockets.connect(target, 5.0)
            return upstream

        return connect

    def sync(self, services: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]]) -> None:
        with self.lock:
            self.slices = list(slices)
        wanted = {p.key: p for s in services for p in service_ports(s)}
        for key in set(self.listeners) - set(wanted):
            for listener in self.listeners.pop(key):
                listener.close()
            self.local.pop(key, None)
        for key, port in wanted.items():
            if key in self.listeners:
                continue
            listeners = []
            upstream = self._upstream(port)
            if port.cluster_ip and port.cluster_ip != "None":
                with contextlib.suppress(OSError):
                    listeners.append(Listener(self.sockets.listen((port.cluster_ip, port.port)), upstream))
            if (port.namespace, port.service) != ("default", "kubernetes"):
                local = self._loopback(key)
                listeners.append(Listener(local, upstream))
                self.local[key] = listeners[-1].address
            self.listeners[key] = listeners
        self._save()

    def _loopback(self, key: str) -> socket.socket:
        """A loopback port for the Service port: the one it had before the agent restarted, if still free."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port = int(self.previous.get(key, ("", 0))[1])
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        return sock

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: list(v) for k, v in sorted(self.local.items())}, indent=1) + "\n")
        tmp.replace(self.state_file)

    def close(self) -> None:
        for listeners in self.listeners.values():
            for listener in listeners:
                listener.close()
        self.listeners.clear()
