"""Every pod the operator builds meets the Pod Security Standard `restricted` and keeps a read-only root
filesystem whose writable places are volumes.

`restricted_violations` is the profile written down as rules (the Baseline controls plus the Restricted
ones, https://kubernetes.io/docs/concepts/security/pod-security-standards/), checked against a pod spec;
it is tested on pods that break each rule, so a check that passes everything can't pass here. The dev
cluster's Pod Security Admission checks the same pods for real (tests/cluster/test_webhooks.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from finetune_operator.api.modeldeployment import ResolvedModel
from finetune_operator.builders import build_trainer_job
from finetune_operator.builders.server_deployment import build_revision
from finetune_operator.builders.serving import ClusterFeatures, ServingPlan, build_serving_children
from tests.unit.test_builders import CONFIG as TRAINER_CONFIG
from tests.unit.test_builders import finetunejob
from tests.unit.test_builders_serving import CANARY, MODEL, deployment
from tests.unit.test_builders_serving import CONFIG as SERVING_CONFIG

# --- the profile ------------------------------------------------------------------------------------------

BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
        "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)  # fmt: skip
RESTRICTED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)  # fmt: skip
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
RESTRICTED_VOLUME_SOURCES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
SECCOMP_ALLOWED = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_ALLOWED = frozenset({"RuntimeDefault", "Localhost"})


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for container in spec.get(field) or []:
            yield f"{field}[{container.get('name')}]", container


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The rules of the `restricted` profile this pod spec breaks, one line each (empty: it passes)."""
    out: list[str] = []
    pod_ctx = spec.get("securityContext") or {}
    containers = list(_containers(spec))

    # Baseline: host namespaces, host paths and ports, HostProcess, privilege, capabilities, profiles.
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"host namespaces: spec.{field} is true")
    if (pod_ctx.get("windowsOptions") or {}).get("hostProcess"):
        out.append("HostProcess: spec.securityContext.windowsOptions.hostProcess is true")
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            out.append(f"HostPath volumes: volume {volume['name']}")
        sources = set(volume) - {"name"}
        if not sources <= RESTRICTED_VOLUME_SOURCES:
            out.append(f"volume types: volume {volume['name']} is {', '.join(sorted(sources))}")
    for sysctl in pod_ctx.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctls: {sysctl['name']} is not a safe sysctl")
    for where, ctx in [("spec", pod_ctx)] + [
        (name, c.get("securityContext") or {}) for name, c in containers
    ]:
        selinux = ctx.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            out.append(f"SELinux: {where} seLinuxOptions {selinux}")
        apparmor = (ctx.get("appArmorProfile") or {}).get("type")
        if apparmor is not None and apparmor not in APPARMOR_ALLOWED:
            out.append(f"AppArmor: {where} appArmorProfile {apparmor}")
        if ctx.get("runAsUser") == 0:
            out.append(f"running as non-root user: {where} runAsUser is 0")
    for name, container in containers:
        ctx = container.get("securityContext") or {}
        if (ctx.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"HostProcess: {name}")
        if ctx.get("privileged"):
            out.append(f"privileged containers: {name}")
        if ctx.get("procMount", "Default") != "Default":
            out.append(f"/proc mount type: {name} procMount {ctx['procMount']}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"host ports: {name} hostPort {port['hostPort']}")
        capabilities = ctx.get("capabilities") or {}
        added = set(capabilities.get("add") or [])
        if added - BASELINE_CAPABILITIES:
            out.append(f"capabilities: {name} adds {sorted(added - BASELINE_CAPABILITIES)} (baseline)")
        # Restricted.
        if added & BASELINE_CAPABILITIES - RESTRICTED_CAPABILITIES:
            out.append(
                f"capabilities: {name} adds {sorted(added & BASELINE_CAPABILITIES - RESTRICTED_CAPABILITIES)}"
            )
        if "ALL" not in (capabilities.get("drop") or []):
            out.append(f"capabilities: {name} does not drop ALL")
        if ctx.get("allowPrivilegeEscalation") is not False:
            out.append(f"privilege escalation: {name} allowPrivilegeEscalation is not false")
        non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"running as non-root: {name} runAsNonRoot is not true (pod or container)")
        seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
        if seccomp not in SECCOMP_ALLOWED:
            out.append(f"seccomp: {name} seccompProfile.type is {seccomp} (pod or container)")
    return out


def writable_outside_volumes(spec: dict[str, Any]) -> list[str]:
    """Not part of the standard, our own rule beside it: each container's root filesystem is read-only and
    the variables that say where a process writes point into one of its writable mounts."""
    out: list[str] = []
    for name, container in _containers(spec):
        if (container.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: readOnlyRootFilesystem is not true")
        writable = [m["mountPath"] for m in container.get("volumeMounts") or [] if not m.get("readOnly")]
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        for variable in ("HOME", "TMPDIR", "HF_HOME", "TORCH_EXTENSIONS_DIR", "MPLCONFIGDIR"):
            path = env.get(variable)
            if path is None or not any(path == m or path.startswith(m.rstrip("/") + "/") for m in writable):
                out.append(f"{name}: {variable}={path} is not on a writable volume")
    return out


# --- the pods ---------------------------------------------------------------------------------------------


def _pod_specs(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pod template of every workload among `manifests`, by `Kind/name`."""
    return {
        f"{m['kind']}/{m['metadata']['name']}": m["spec"]["template"]["spec"]
        for m in manifests
        if m["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}
    }


def every_pod() -> dict[str, dict[str, Any]]:
    """Trainer Jobs (multi-node GPU gang with a pvc output; single CPU pod) and the server Deployments of
    both runtimes, stable and canary, with every volume option on."""
    pods = {
        f"trainer gang: {k}": v
        for k, v in _pod_specs(
            [build_trainer_job(finetunejob(output={"uri": "pvc://results/run"}), 1, TRAINER_CONFIG)]
        ).items()
    }
    cpu_job = finetunejob(distributed={"nodes": 1, "gpusPerNode": 0}, resources={})
    pods |= {
        f"trainer cpu: {k}": v for k, v in _pod_specs([build_trainer_job(cpu_job, 2, TRAINER_CONFIG)]).items()
    }
    for runtime in ("builtin", "vllm"):
        spec: dict[str, Any] = {"rollout": CANARY, "feedback": {"enabled": True}}
        if runtime == "vllm":
            spec = {"rollout": CANARY, "runtime": {"type": "vllm"}, "quantization": {"method": "fp8-dynamic"}}
            spec["resources"] = {"gpus": 1}
        md = deployment(**spec)
        stable = build_revision(md, MODEL, SERVING_CONFIG)
        canary = build_revision(md, ResolvedModel(uri="pvc://models/v2", task="causal-lm"), SERVING_CONFIG)
        plan = ServingPlan(
            stable=stable, stable_replicas=2, canary=canary, canary_replicas=1, canary_weight=10
        )
        children = build_serving_children(md, plan, ClusterFeatures(gateway_api=True), SERVING_CONFIG)
        pods |= {f"{runtime} server: {k}": v for k, v in _pod_specs(children).items()}
    return pods


PODS = every_pod()


def test_every_kind_of_pod_is_checked() -> None:
    assert sorted(PODS) == [
        "builtin server: Deployment/bot",
        "builtin server: Deployment/bot-canary",
        "trainer cpu: Job/llama-sft-a2",
        "trainer gang: Job/llama-sft-a1",
        "vllm server: Deployment/bot",
        "vllm server: Deployment/bot-canary",
    ]


@pytest.mark.parametrize("name", sorted(PODS))
def test_the_pod_meets_the_restricted_profile(name: str) -> None:
    assert restricted_violations(PODS[name]) == []


@pytest.mark.parametrize("name", sorted(PODS))
def test_the_pod_writes_only_to_its_volumes(name: str) -> None:
    assert writable_outside_volumes(PODS[name]) == []


# --- the check itself -------------------------------------------------------------------------------------


def _broken(change: str) -> dict[str, Any]:
    spec = copy.deepcopy(PODS["builtin server: Deployment/bot"])
    pod_ctx, container = spec["securityContext"], spec["containers"][0]
    ctx = container["securityContext"]
    match change:
        case "hostNetwork":
            spec["hostNetwork"] = True
        case "hostPath":
            spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
        case "hostPort":
            container["ports"][0]["hostPort"] = 8000
        case "privileged":
            ctx["privileged"] = True
        case "add SYS_ADMIN":
            ctx["capabilities"]["add"] = ["SYS_ADMIN"]
        case "add CHOWN":
            ctx["capabilities"]["add"] = ["CHOWN"]  # allowed by baseline, not by restricted
        case "keep capabilities":
            del ctx["capabilities"]
        case "escalation":
            del ctx["allowPrivilegeEscalation"]
        case "root allowed":
            del pod_ctx["runAsNonRoot"]
        case "container may be root":
            ctx["runAsNonRoot"] = False
        case "uid 0":
            ctx["runAsUser"] = 0
        case "no seccomp":
            del pod_ctx["seccompProfile"]
        case "unconfined":
            ctx["seccompProfile"] = {"type": "Unconfined"}
        case "unsafe sysctl":
            pod_ctx["sysctls"] = [{"name": "kernel.msgmax", "value": "1"}]
        case "selinux user":
            pod_ctx["seLinuxOptions"] = {"user": "system_u"}
        case "apparmor unconfined":
            ctx["appArmorProfile"] = {"type": "Unconfined"}
        case "procMount":
            ctx["procMount"] = "Unmasked"
        case "nfs volume":
            spec["volumes"].append({"name": "nfs", "nfs": {"server": "nas", "path": "/"}})
        case "init container":
            spec["initContainers"] = [{"name": "init", "image": "busybox"}]
    return spec


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ("hostNetwork", "host namespaces"),
        ("hostPath", "HostPath volumes"),
        ("hostPort", "host ports"),
        ("privileged", "privileged containers"),
        ("add SYS_ADMIN", "capabilities"),
        ("add CHOWN", "capabilities"),
        ("keep capabilities", "capabilities"),
        ("escalation", "privilege escalation"),
        ("root allowed", "running as non-root"),
        ("container may be root", "running as non-root"),
        ("uid 0", "running as non-root user"),
        ("no seccomp", "seccomp"),
        ("unconfined", "seccomp"),
        ("unsafe sysctl", "sysctls"),
        ("selinux user", "SELinux"),
        ("apparmor unconfined", "AppArmor"),
        ("procMount", "/proc mount type"),
        ("nfs volume", "volume types"),
        ("init container", "privilege escalation"),
    ],
)
def test_each_rule_refuses_a_pod_that_breaks_it(change: str, rule: str) -> None:
    violations = restricted_violations(_broken(change))
    assert any(v.startswith(rule + ":") for v in violations), violations


def test_a_writable_root_or_a_cache_off_the_volumes_is_found() -> None:
    spec = copy.deepcopy(PODS["vllm server: Deployment/bot"])
    container = spec["containers"][0]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    container["env"] = [e for e in container["env"] if e["name"] != "TMPDIR"]
    problems = writable_outside_volumes(spec)
    assert any("readOnlyRootFilesystem" in p for p in problems)
    assert any(p.endswith("TMPDIR=None is not on a writable volume") for p in problems)
