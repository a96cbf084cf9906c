"""`python -m hack.nodeagent` (from the repository root): run the node agent of a dev cluster, tear its node
down, or print a container's log (what `kubectl logs` also shows, through the API server)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hack.devcluster.layout import SERVICE_CIDR, Layout
from hack.nodeagent.agent import agent_dir, main_run, teardown
from hack.nodeagent.logs import LogStore


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m hack.nodeagent", description=__doc__)
    parser.add_argument(
        "--dev-dir", type=Path, help="the dev cluster's folder (default: FTO_DEV_DIR or .dev/cluster)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="register the node and run its pods (started by `devcluster up`)")
    run.add_argument("--node", default="local-0")
    run.add_argument("--gpus", type=int, default=0, help="fake nvidia.com/gpu capacity to report")
    sub.add_parser(
        "teardown", help="end the node's pods and remove its namespaces (done by `devcluster down`)"
    )
    logs = sub.add_parser("logs", help="print a container's log")
    logs.add_argument("pod")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-c", "--container", default="")
    logs.add_argument("-p", "--previous", action="store_true")
    args = parser.parse_args()
    root = (args.dev_dir or Layout.default().root).resolve()
    if args.command == "run":
        return main_run(root, args.node, args.gpus, SERVICE_CIDR)
    if args.command == "teardown":
        teardown(root, SERVICE_CIDR)
        return 0
    store = LogStore(agent_dir(root) / "logs")
    container = args.container
    if not container:
        pods = sorted(store.root.glob(f"{args.namespace}_{args.pod}_*/*"))
        if len({p.name for p in pods}) != 1:
            parser.error(f"name a container with -c: {sorted({p.name for p in pods}) or 'none found'}")
        container = pods[0].name
    path = store.find(args.namespace, args.pod, container, args.previous)
    if path is None:
        print(f"no log for {args.namespace}/{args.pod} container {container}", file=sys.stderr)
        return 1
    sys.stdout.write(path.read_text(errors="replace"))
    return 0


sys.exit(main())
