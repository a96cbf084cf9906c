"""`python -m hack.devcluster COMMAND`: the dev cluster's command line (see docs/dev-cluster.md)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from hack.devcluster.cluster import _live_sessions, down, running_state, session_release, session_up, up
from hack.devcluster.components import find_bin_dir
from hack.devcluster.layout import GPU_RESOURCE, Layout, fail, locked, log, use_existing_cluster
from hack.devcluster.nodes import NodeShape, desired_nodes, node_ready
from hack.devcluster.pki import admin_api
from hack.devcluster.processes import State, loopback_env


def target_kubeconfig(layout: Layout) -> Path:
    if use_existing_cluster():
        path = os.environ.get("KUBECONFIG", "")
        if not path:
            fail("FTO_USE_EXISTING_CLUSTER=1 needs KUBECONFIG set")
        return Path(path)
    if running_state(layout) is None:
        fail("the dev cluster is not running: start it with `make cluster-up`")
    return layout.kubeconfig


def cmd_status(layout: Layout) -> int:
    state = State.load(layout)
    if state is None:
        print("dev cluster: not running")
        return 1
    api = admin_api(layout, state.api_url)
    ready = api.ok("/readyz")
    print(f"dev cluster: {'ready' if ready else 'NOT ready'} at {state.api_url}")
    print(f"kubeconfig:  {layout.kubeconfig}")
    print(f"binaries:    {state.bin_dir}")
    print(f"GPU nodes:   {state.gpu_nodes} (started by {state.started_by})")
    print(f"local node:  {state.local_node or 'none: ' + state.no_local_node}")
    for record in state.processes:
        print(
            f"  {record.name:<24} pid {record.pid:<8} {'running' if record.alive() else 'DEAD'}  {record.log}"
        )
    if ready:
        _, nodes = api.request("GET", "/api/v1/nodes")
        for node in nodes["items"]:
            gpus = node["status"].get("allocatable", {}).get(GPU_RESOURCE, "0")
            readiness = "Ready" if node_ready(node) else "NotReady"
            print(f"  node {node['metadata']['name']:<18} {readiness:<9} gpus={gpus}")
    return 0 if ready and all(p.alive() for p in state.processes) else 1


def cmd_services(layout: Layout) -> int:
    try:
        forwarders = json.loads(layout.service_forwarders_file.read_text())
    except (OSError, ValueError):
        print("no Service forwarders (does the dev cluster have a local node? see `status`)", file=sys.stderr)
        return 1
    for key, (host, port) in forwarders.items():
        print(f"{key:<60} http://{host}:{port}")
    return 0


def tools_dir(layout: Layout) -> Path:
    """The binaries of the running dev cluster; with an existing cluster, kubectl on PATH wins."""
    if use_existing_cluster():
        on_path = shutil.which("kubectl")
        return Path(on_path).parent if on_path else find_bin_dir()
    state = State.load(layout)
    return Path(state.bin_dir) if state else find_bin_dir()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hack.devcluster", description="The dev cluster: a real control plane on 127.0.0.1."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the dev cluster (idempotent)")
    p_up.add_argument("--session", type=int, help=argparse.SUPPRESS)
    p_down = sub.add_parser("down", help="stop the processes the dev cluster started")
    p_down.add_argument("--force", action="store_true", help="stop it even while test sessions use it")
    p_release = sub.add_parser("release", help="a test session is done with the cluster (tests/conftest.py)")
    p_release.add_argument("--session", type=int, required=True)
    sub.add_parser("status", help="processes, readiness and nodes")
    sub.add_parser(
        "fake-nodes", help="print the fake nodes as a List, for `kubectl apply -f -` (e.g. on kind)"
    )
    sub.add_parser("kubeconfig", help="print the kubeconfig path")
    sub.add_parser("services", help="the loopback address of each Service port (the local node's forwarders)")
    sub.add_parser("kubectl", help="kubectl against the cluster", add_help=False)
    sub.add_parser("exec", help="run a command with KUBECONFIG set", add_help=False)
    args_list = list(sys.argv[1:] if argv is None else argv)
    # kubectl/exec pass everything after them through untouched.
    if args_list and args_list[0] in ("kubectl", "exec"):
        command, rest = args_list[0], args_list[1:]
    else:
        command, rest = "", []
        parsed = parser.parse_args(args_list)
        command = parsed.command

    layout = Layout.default()
    if command == "up":
        if use_existing_cluster():
            log("FTO_USE_EXISTING_CLUSTER=1: using $KUBECONFIG; not starting a dev cluster")
            return 0
        if parsed.session is not None:
            session_up(layout, parsed.session)
        else:
            with locked(layout):
                up(layout, started_by="cli")
        return 0
    if command == "down":
        if use_existing_cluster():
            log("FTO_USE_EXISTING_CLUSTER=1: not stopping anything")
            return 0
        with locked(layout):
            users = _live_sessions(layout)
            if users and not parsed.force:
                fail(
                    f"test session(s) {users} are using the dev cluster; wait for them or use `down --force`"
                )
            down(layout)
        return 0
    if command == "release":
        session_release(layout, parsed.session)
        return 0
    if command == "status":
        return cmd_status(layout)
    if command == "fake-nodes":
        print(
            json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": desired_nodes(NodeShape.from_env())}, indent=2
            )
        )
        return 0
    if command == "services":
        return cmd_services(layout)
    if command == "kubeconfig":
        print(os.environ.get("KUBECONFIG", "") if use_existing_cluster() else layout.kubeconfig)
        return 0
    return run_against_cluster(layout, command, rest)


def run_against_cluster(layout: Layout, command: str, rest: list[str]) -> NoReturn:
    """`kubectl ARGS...` or `exec -- CMD...` with KUBECONFIG (and the tools on PATH) set.

    Replaces this process."""
    env = loopback_env(strip_proxies=False)
    env["KUBECONFIG"] = str(target_kubeconfig(layout))
    bin_dir = tools_dir(layout)
    if command == "kubectl":
        kubectl = str(bin_dir / "kubectl")
        os.execve(kubectl, [kubectl, *rest], env)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        fail("usage: python -m hack.devcluster exec -- COMMAND [ARGS...]")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # kubectl, helm
    os.execvpe(rest[0], rest, env)


if __name__ == "__main__":
    sys.exit(main())
