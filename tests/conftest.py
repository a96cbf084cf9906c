"""Fixtures for tests against a real control plane.

- `cluster` (session): the dev cluster (`python -m hack.devcluster`), started if it is not running and reused
  if it is; with FTO_USE_EXISTING_CLUSTER=1, the cluster in $KUBECONFIG. A cluster that a test session
  started is stopped when the last session using it ends (FTO_KEEP_CLUSTER=1 keeps it running).
- `crds` (session): crds/ applied server-side and Established.
- `namespace` (function): a fresh namespace, deleted afterwards (waits until its pods are gone, so the fake
  GPUs are free for the next test).
- `operator_role` (session): the chart's ServiceAccount and ClusterRole (rendered by the real `helm
  template`, `rbac.scope` cluster) in a namespace of their own, and a kubeconfig with a token of that
  ServiceAccount.
- `operator` (function): `python -m finetune_operator` running against the cluster under `operator_role`
  (not the admin kubeconfig, which the tests' own kubectl calls keep), watching `namespace`;
  `@pytest.mark.operator_env(FTO_X="...")` sets operator settings for one test (`{namespace}` in a value
  is the test's namespace). An RBAC 403 (`forbidden: User ... cannot ...`) in its log fails the test: the
  chart lacks a rule the operator uses.
- `local_node` (session): the dev cluster's local node (hack/nodeagent), whose pods run as processes here. A
  machine that cannot run them fails the test under CI=true and skips it (with the reason) elsewhere.

Tests under tests/cluster/ and tests/e2e/ get the `cluster` / `e2e` marker, and any test that uses the
`cluster` fixture gets `cluster`, so `-m "not cluster and not e2e"` selects the tests that need no cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hack import devcluster

from tests.kube_helpers import (
    REPO_ROOT,
    Cluster,
    KubectlError,
    LocalNode,
    OperatorProcess,
    cannot_run_pods,
    wait_for,
)
from tests.operator_role import OperatorRole

CRDS_DIR = REPO_ROOT / "crds"
OUR_KINDS = ("finetunejobs.finetune.dev", "modeldeployments.finetune.dev")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            parts = item.path.resolve().relative_to(REPO_ROOT).parts
        except ValueError:
            parts = ()
        if parts[:2] == ("tests", "cluster") or "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
        if parts[:2] == ("tests", "e2e"):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    # Keep each phase's report on the item so that fixtures can tell whether the test failed.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return bool(report is None or report.failed)


def _devcluster(request: pytest.FixtureRequest, *args: str) -> None:
    """`python -m hack.devcluster ARGS`, its progress lines shown live (starting a cluster takes a while)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    ctx = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with ctx:
        result = subprocess.run(devcluster.command(*args), cwd=REPO_ROOT, check=False)
    if result.returncode != 0:
        pytest.fail(f"hack.devcluster {' '.join(args)} failed (exit {result.returncode}); see above")


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if os.environ.get("FTO_USE_EXISTING_CLUSTER") == "1":
        kubeconfig = os.environ.get("KUBECONFIG")
        if not kubeconfig:
            pytest.fail("FTO_USE_EXISTING_CLUSTER=1 needs KUBECONFIG")
        yield Cluster(kubeconfig=Path(kubeconfig), bin_dir=devcluster.tools_dir(devcluster.Layout.default()))
        return

    session = str(os.getpid())
    _devcluster(request, "up", "--session", session)
    try:
        layout = devcluster.Layout.default()
        state = devcluster.State.load(layout)
        assert state is not None, "python -m hack.devcluster up succeeded but recorded no state"
        os.environ["KUBECONFIG"] = str(layout.kubeconfig)
        yield Cluster(kubeconfig=layout.kubeconfig, bin_dir=Path(state.bin_dir))
    finally:
        _devcluster(request, "release", "--session", session)


@pytest.fixture(scope="session")
def local_node(cluster: Cluster) -> LocalNode:
    """The dev cluster's local node, whose pods run as processes here (hack/nodeagent)."""
    if os.environ.get("FTO_USE_EXISTING_CLUSTER") == "1":
        cannot_run_pods("the local node belongs to the dev cluster; FTO_USE_EXISTING_CLUSTER=1 uses another")
    layout = devcluster.Layout.default()
    state = devcluster.State.load(layout)
    if state is None or not state.local_node:
        cannot_run_pods(state.no_local_node if state else "no dev cluster recorded")
    return LocalNode(name=state.local_node, root=layout.root)


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> list[str]:
    """Apply every CRD in crds/ (server-side) and wait until each is Established. Returns their names."""
    files = sorted(p for p in CRDS_DIR.glob("*.y*ml") if p.is_file())
    names = [
        doc["metadata"]["name"]
        for path in files
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "CustomResourceDefinition"
    ]
    if not names:
        pytest.skip(f"no CustomResourceDefinition in {CRDS_DIR} yet (generate them with `make crds`)")
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=fto-tests",
        *(f"-f={p}" for p in files),
    )
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))
    return names


def _namespace_name(test_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t-{slug}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = _namespace_name(request.node.name)
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "finetune.dev/test=true")
    # Pods are refused until the ServiceAccount controller has made `default` here.
    wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        60,
        f"ServiceAccount {name}/default",
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")
    # The namespace controller gets to the pods in its own time; a Terminating namespace accepts no new
    # pods, so deleting them now (kwok plays the kubelet's part at once) frees the fake GPUs sooner.
    cluster.kubectl("delete", "pods", "--all", "-n", name, "--wait=false", check=False)
    wait_for(
        lambda: not cluster.kubectl("get", "pods", "-n", name, "-o", "name").stdout.strip(),
        120,
        f"the pods of namespace {name} to be gone",
    )


@pytest.fixture(scope="session")
def operator_role(
    cluster: Cluster, crds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorRole]:
    suffix = secrets.token_hex(3)
    role = OperatorRole(
        cluster,
        namespace=f"fto-operator-{suffix}",
        release=f"fto-{suffix}",
        kubeconfig_path=tmp_path_factory.mktemp("operator-role") / "kubeconfig",
    )
    try:
        role.apply()
        yield role
    finally:
        role.delete()


#: What the API server's authorizer answers, in the operator's log, when its role lacks a rule (other 403s,
#: e.g. "create not allowed while custom resource definition is terminating", are not about RBAC).
FORBIDDEN = re.compile(r'.*forbidden: User ".*" cannot .*')


@pytest.fixture
def operator(
    cluster: Cluster,
    crds: list[str],
    namespace: str,
    operator_role: OperatorRole,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    marker = request.node.get_closest_marker("operator_env")
    env = {k: str(v).format(namespace=namespace) for k, v in (marker.kwargs if marker else {}).items()}
    proc = OperatorProcess(
        namespace, operator_role.kubeconfig(), tmp_path_factory.mktemp("operator") / "operator.log", env
    )
    try:
        proc.start()
        yield proc
    finally:
        # Delete our resources while the operator still runs, so that its finalizers are honoured and the
        # namespace can go; strip what is left if it could not.
        kinds = ",".join(k for k in OUR_KINDS if k in crds)
        if kinds:
            if not proc.running:
                with contextlib.suppress(AssertionError):
                    proc.start()
            cluster.kubectl("delete", kinds, "--all", "-n", namespace, "--timeout=60s", check=False)
        proc.stop()
        if kinds:
            _strip_finalizers(cluster, namespace, kinds)
        if _test_failed(request):
            print(f"----- operator log ({proc.log_path}) -----\n{proc.logs()}")
    refused = [m.group(0) for m in FORBIDDEN.finditer(proc.logs())]
    if refused:
        pytest.fail(
            f"the operator under the chart's ClusterRole {operator_role.name} was refused "
            f"({len(refused)} lines; helm/finetune-operator/templates/rbac.yaml lacks a rule):\n"
            + "\n".join(refused[:10])
        )


def _strip_finalizers(cluster: Cluster, namespace: str, kinds: str) -> None:
    left = cluster.kubectl("get", kinds, "-n", namespace, "-o", "name", check=False).stdout.split()
    for name in left:
        with contextlib.suppress(KubectlError):
            cluster.kubectl(
                "patch", name, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'
            )
