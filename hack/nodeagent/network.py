"""The local node's network: network namespaces that the dev cluster creates itself, and nothing else.

    node namespace  fto-<id>       bridge br0 with the gateway address (first of the pod subnet); the
                                   Service range is routed to its loopback ("local" route), so the agent can
                                   listen on any cluster IP in it; no route leads anywhere else
    pod namespace   fto-<id>-p<N>  eth0 (a veth whose peer sits on br0) with the pod's address, lo, and a
                                   default route via the gateway: pods reach each other and cluster IPs

`<id>` and the pod subnet are derived from the dev cluster's folder, so several dev clusters on one machine
never share a namespace name, and every interface lives inside a namespace of its own cluster (interface
names are per namespace; none is made in the host's namespace). Removing the namespaces removes every
interface, address and route with them; the one route in the host's namespace is an `unreachable` route for
the pod subnet, so that nothing dialled there from the host leaves the machine, removed by `teardown`. The
host reaches pods only through the agent, whose sockets for pod traffic are made inside the node namespace
(`NodeSockets`); nothing outside this machine is ever addressed."""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import os
import queue
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
BRIDGE = "br0"


class NetworkError(RuntimeError):
    """An `ip` command failed."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` exited {result.returncode}: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class ClusterNetwork:
    cluster_id: str
    subnet: ipaddress.IPv4Network
    service_cidr: ipaddress.IPv4Network

    @classmethod
    def for_dev_dir(cls, root: Path, service_cidr: str) -> ClusterNetwork:
        """Names and addresses of the dev cluster kept in `root` (a hash of its path)."""
        digest = int(hashlib.sha256(str(root.resolve()).encode()).hexdigest(), 16)
        subnet = ipaddress.IPv4Network(f"10.{128 + digest % 64}.{(digest >> 6) % 256}.0/24")
        return cls(f"{digest >> 20:x}"[:6], subnet, ipaddress.IPv4Network(service_cidr))

    @property
    def node_netns(self) -> str:
        return f"fto-{self.cluster_id}"

    @property
    def bridge_mac(self) -> str:
        """A fixed, locally administered MAC for br0. A bridge left without one takes the lowest MAC of its
        ports and changes it when a port goes: the other pods' ARP entry for the gateway then points nowhere
        and their connections stall until it expires (seen as a status patch lost after a pod ended)."""
        octets = bytes.fromhex(self.cluster_id.rjust(6, "0")[:6])
        return ":".join(f"{b:02x}" for b in (0x02, 0x00, *octets, 0x01))

    @property
    def gateway(self) -> str:
        return str(self.subnet[1])

    def pod_netns(self, slot: int) -> str:
        return f"fto-{self.cluster_id}-p{slot}"

    def pod_ip(self, slot: int) -> str:
        return str(self.subnet[slot + 1])

    @property
    def max_slot(self) -> int:
        return self.subnet.num_addresses - 3  # network, gateway, broadcast

    def netns_path(self, name: str) -> Path:
        return NETNS_DIR / name

    def owned_netns(self) -> list[str]:
        """This cluster's namespaces that exist now."""
        prefix = self.node_netns
        names = os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []
        return sorted(n for n in names if n == prefix or n.startswith(prefix + "-p"))

    # ------------------------------------------------------------------------------------- setup

    def ensure_node(self) -> None:
        """Make the node namespace and its bridge (idempotent)."""
        self.ensure_host_route()
        ns = self.node_netns
        if self.netns_path(ns).exists():
            # A namespace of an older agent may have a bridge that follows its ports.
            ip("-n", ns, "link", "set", BRIDGE, "address", self.bridge_mac)
            return
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "add", BRIDGE, "address", self.bridge_mac, "type", "bridge")
        ip("-n", ns, "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", BRIDGE)
        ip("-n", ns, "link", "set", BRIDGE, "up")
        ip("-n", ns, "route", "add", "local", str(self.service_cidr), "dev", "lo")

    def ensure_host_route(self) -> None:
        """An `unreachable` route for the pod subnet in the host's namespace: a host process that dials a pod
        address (e.g. the API server's pods/proxy) fails at once instead of sending it to the default route,
        off this machine. The only change to the host's network; `teardown` removes it."""
        if str(self.subnet) not in ip("route", "show", "type", "unreachable").stdout:
            ip("route", "add", "unreachable", str(self.subnet))

    def add_pod(self, slot: int) -> str:
        """The pod's namespace with its address; returns the address. Replaces a stale one of the slot."""
        ns, veth = self.pod_netns(slot), f"vp{slot}"
        if self.netns_path(ns).exists():
            self.remove_pod(slot)
        ip("-n", self.node_netns, "link", "del", veth, check=False)
        ip("netns", "add", ns)
        ip("-n", self.node_netns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.node_netns, "link", "set", veth, "master", BRIDGE, "up")
        address = self.pod_ip(slot)
        ip("-n", ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "route", "add", "default", "via", self.gateway)
        return address

    def remove_pod(self, slot: int) -> None:
        """Delete the pod's namespace (its veth, and the peer on the bridge, go with it)."""
        ns = self.pod_netns(slot)
        if self.netns_path(ns).exists():
            ip("netns", "del", ns)

    def teardown(self) -> list[str]:
        """Delete every namespace of this cluster; returns their names."""
        names = self.owned_netns()
        for name in sorted(names, key=lambda n: n == self.node_netns):  # pods first, the node last
            ip("netns", "del", name, check=False)
        if str(self.subnet) in ip("route", "show", "type", "unreachable").stdout:
            ip("route", "del", "unreachable", str(self.subnet), check=False)
        return names


class NodeSockets:
    """Sockets made inside the node namespace (by a thread that entered it: a network namespace is a property
    of the thread that creates a socket, and the socket keeps it wherever it is used)."""

    def __init__(self, netns_path: Path) -> None:
        self._requests: queue.Queue[tuple[int, queue.Queue[socket.socket | BaseException]]] = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(netns_path,), name="node-netns", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self, netns_path: Path) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({netns_path})")
            finally:
                os.close(fd)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            kind, reply = self._requests.get()
            try:
                reply.put(socket.socket(socket.AF_INET, kind))
            except OSError as exc:
                reply.put(exc)

    def new_socket(self, kind: int = socket.SOCK_STREAM) -> socket.socket:
        reply: queue.Queue[socket.socket | BaseException] = queue.Queue(maxsize=1)
        self._requests.put((kind, reply))
        result = reply.get(timeout=10)
        if isinstance(result, BaseException):
            raise result
        return result

    def connect(self, address: tuple[str, int], timeout: float) -> socket.socket:
        sock = self.new_socket()
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock

    def listen(self, address: tuple[str, int]) -> socket.socket:
        sock = self.new_socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
        return sock
