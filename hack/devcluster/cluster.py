"""Start, reuse and stop the dev cluster; test sessions that share it."""

from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from hack.devcluster.components import component_args, find_bin_dir, storage_classes, write_kwok_config
from hack.devcluster.layout import (
    LOCAL_NODE,
    READY_TIMEOUT_S,
    REPO_ROOT,
    SERVICE_CIDR,
    STATE_VERSION,
    Layout,
    fail,
    locked,
    log,
)
from hack.devcluster.nodes import NodeShape, ensure_nodes, node_ready
from hack.devcluster.pki import admin_api, ensure_pki, write_kubeconfig
from hack.devcluster.processes import State, free_port, log_tail, process_start_ticks, spawn, stop_processes
from hack.kube import Api

NODE_AGENT = "node-agent"


def wait_until(what: str, check: Callable[[], bool], state: State, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        for record in state.processes:
            if not record.alive():
                fail(f"{record.name} exited while waiting for {what}; last log lines:\n{log_tail(record)}")
        if time.monotonic() > deadline:
            logs = Path(state.processes[0].log).parent
            fail(f"timed out after {timeout:.0f}s waiting for {what} (logs in {logs})")
        time.sleep(0.25)


def cluster_ready(api: Api, node_names: Sequence[str]) -> Callable[[], bool]:
    def check() -> bool:
        if not api.ok("/api/v1/namespaces/default/serviceaccounts/default"):
            return False
        status, nodes = api.request("GET", "/api/v1/nodes")
        if status != 200:
            return False
        ready = {n["metadata"]["name"] for n in nodes["items"] if node_ready(n)}
        return set(node_names) <= ready

    return check


def running_state(layout: Layout, patience_s: float = 30.0) -> State | None:
    """The recorded cluster, if every process of it is alive and the apiserver answers /readyz.

    A busy machine can make /readyz slow or briefly unready; since the alternative is to restart a cluster
    that others may be using, a live one gets `patience_s` to answer."""
    state = State.load(layout)
    if state is None or not state.processes or not all(p.alive() for p in state.processes):
        return None
    api = admin_api(layout, state.api_url)
    deadline = time.monotonic() + patience_s
    while not api.ok("/readyz", timeout=10.0):
        if time.monotonic() > deadline or not all(p.alive() for p in state.processes):
            return None
        time.sleep(1.0)
    return state


def restart_node_agent(layout: Layout) -> bool:
    """Start the node agent again if it alone has died (as a kubelet is restarted by its service manager);
    it adopts the pods its predecessor ran. True when it was restarted."""
    state = State.load(layout)
    if state is None or not state.local_node:
        return False
    agents = [p for p in state.processes if p.name == NODE_AGENT]
    others = [p for p in state.processes if p.name != NODE_AGENT]
    if not agents or agents[-1].alive() or not others or not all(p.alive() for p in others):
        return False
    state.processes = others
    spawn(layout, state, NODE_AGENT, agents[-1].args, env={"PYTHONPATH": str(REPO_ROOT)})
    log(f"restarted the node agent (pid {state.processes[-1].pid}); it adopts the pods that still run")
    return True


def up(layout: Layout, started_by: str) -> tuple[State, bool]:
    """Start the cluster unless it runs already. Returns (state, started_now)."""
    began = time.monotonic()
    shape = NodeShape.from_env()
    restart_node_agent(layout)
    state = running_state(layout)
    if state is not None:
        api = admin_api(layout, state.api_url)
        if state.gpu_nodes != str(shape):
            log(f"reshaping GPU nodes {state.gpu_nodes} -> {shape}")
            names = ensure_nodes(api, shape)
            wait_until("nodes Ready", cluster_ready(api, names), state)
            state.gpu_nodes = str(shape)
        if started_by == "cli" and state.started_by != "cli":
            state.started_by = "cli"  # asked for by a person now: no test session may stop it
        state.save(layout)
        log(f"dev cluster already running at {state.api_url} (kubeconfig: {layout.kubeconfig})")
        return state, False

    previous = State.load(layout)
    if previous is not None:
        stopped = stop_processes(previous.processes)
        if stopped:
            log(f"stopped {stopped} leftover process(es) of an unhealthy dev cluster")
        layout.state_file.unlink(missing_ok=True)

    bin_dir = find_bin_dir()
    for d in (layout.etcd_data, layout.volumes, layout.logs):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, mode=0o700 if d == layout.etcd_data else 0o777)  # etcd wants its folder private
    ensure_pki(layout.pki)
    state = State(
        version=STATE_VERSION,
        api_port=free_port(),
        etcd_port=free_port(),
        bin_dir=str(bin_dir),
        gpu_nodes=str(shape),
        started_by=started_by,
        started_at=time.time(),
    )
    write_kubeconfig(layout, state.api_url)
    write_kwok_config(layout)
    args = component_args(layout, state, etcd_peer_port=free_port())
    api = admin_api(layout, state.api_url)

    log(f"starting etcd on 127.0.0.1:{state.etcd_port}")
    spawn(layout, state, "etcd", args["etcd"])
    wait_until("etcd", lambda: _http_ok(f"http://127.0.0.1:{state.etcd_port}/health"), state)
    log(f"starting kube-apiserver on 127.0.0.1:{state.api_port}")
    spawn(layout, state, "kube-apiserver", args["kube-apiserver"])
    wait_until("kube-apiserver /readyz", lambda: api.ok("/readyz"), state)
    log(f"kube-apiserver ready ({time.monotonic() - began:.1f}s)")
    for name in ("kube-controller-manager", "kube-scheduler", "kwok", "local-provisioner"):
        spawn(layout, state, name, args[name])
    log("started kube-controller-manager, kube-scheduler, kwok, local-provisioner")
    for storage_class in storage_classes():
        api.create_or_update("/apis/storage.k8s.io/v1/storageclasses", storage_class)
    names = ensure_nodes(api, shape)
    from hack.nodeagent.agent import cannot_run_pods  # the agent imports this package

    why_not = cannot_run_pods()
    if why_not is None:
        spawn(layout, state, NODE_AGENT, args[NODE_AGENT], env={"PYTHONPATH": str(REPO_ROOT)})
        state.local_node = LOCAL_NODE
        names.append(LOCAL_NODE)
        log(f"started the node agent (node {LOCAL_NODE}: its pods run here as processes)")
    else:
        state.no_local_node = why_not
        log(f"no local node: {why_not}")
    state.save(layout)
    log(f"created nodes {', '.join(names)}; waiting for them to be Ready and for default/default")
    wait_until("Ready nodes and the default ServiceAccount", cluster_ready(api, names), state)
    log(f"dev cluster ready in {time.monotonic() - began:.1f}s; kubeconfig: {layout.kubeconfig}")
    return state, True


def _http_ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2.0) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def down(layout: Layout) -> int:
    state = State.load(layout)
    if state is None:
        log("no dev cluster recorded; nothing to stop")
        return 0
    stopped = stop_processes(state.processes)
    from hack.nodeagent.agent import teardown  # the agent imports this package

    teardown(layout.root, SERVICE_CIDR, log=log)  # whatever a killed node agent left behind
    layout.state_file.unlink(missing_ok=True)
    shutil.rmtree(layout.sessions, ignore_errors=True)
    log(f"stopped {stopped} process(es)")
    return stopped


# --------------------------------------------------------------------------------------------- sessions


def _live_sessions(layout: Layout) -> list[int]:
    pids = []
    for entry in layout.sessions.glob("*") if layout.sessions.is_dir() else []:
        try:
            pid, ticks = int(entry.name), int(entry.read_text())
        except ValueError:
            continue
        if process_start_ticks(pid) == ticks:
            pids.append(pid)
        else:
            entry.unlink(missing_ok=True)
    return pids


def session_up(layout: Layout, pid: int) -> None:
    """`up` for a test session: start or reuse the cluster and register the session as a user of it."""
    with locked(layout):
        _, started_now = up(layout, started_by="session")
        ticks = process_start_ticks(pid)
        if ticks is None:
            fail(f"session pid {pid} is not running")
        layout.sessions.mkdir(exist_ok=True)
        (layout.sessions / str(pid)).write_text(str(ticks))
        if started_now:
            log("started for this test session; stopped when the last session using it ends")


def session_release(layout: Layout, pid: int) -> None:
    """The session is done: if a test session started the cluster and no other session uses it, stop it."""
    with locked(layout):
        (layout.sessions / str(pid)).unlink(missing_ok=True)
        state = State.load(layout)
        if state is None or state.started_by != "session" or os.environ.get("FTO_KEEP_CLUSTER") == "1":
            return
        others = _live_sessions(layout)
        if others:
            log(f"dev cluster still used by test session(s) {others}; leaving it running")
            return
        down(layout)
