"""The dev cluster's node agent: the local node, whose pods run as real processes on this machine, each in
its own network namespace with its own address, probed, restarted, logged and reported like a kubelet does.

Modules: podenv (environment, command, hosts file), volumes (volumes and mounts), network (namespaces and
addresses), init (the container's PID 1), containers (one run of a container), probes, status (pod status,
pure), podworker (one pod's life), node (Node, Lease), logs (log files, the kubelet log endpoint), forward
(Services), agent (the watch loop, adoption, teardown). See docs/dev-cluster.md.
"""

from hack.nodeagent.agent import cannot_run_pods, teardown
from hack.nodeagent.node import NODE_SELECTOR, TOLERATION

__all__ = ["NODE_SELECTOR", "TOLERATION", "cannot_run_pods", "teardown"]
