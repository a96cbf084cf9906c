"""PID 1 of a container (standard library only; run as a script inside the container's namespaces).

The agent starts `nsenter --net=<pod netns> unshare --mount --uts --pid --fork --mount-proc -- python init.py
PLAN`: this program then, like `docker run --init` after runc's setup,

1. creates the mount points that do not exist on this machine (recorded in PLAN's `created` file, so that
   they can be removed even if this process is killed) and registers its targets as in use;
2. bind-mounts each volume at its mountPath (read-only where the pod says so) in its private mount namespace,
   sets the pod's hostname, changes to the working directory;
3. starts the command with exactly the container's environment, forwards signals to it, reaps orphans;
4. when the command ends: writes its exit code (128 + N for death by signal N) to PLAN's `exit_file`, undoes
   its mounts, removes the mount points it created unless another container still uses them, and exits with
   that code. The kernel then ends whatever else ran in the container (its PID namespace dies with it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

MOUNT_LOCK = Path("/tmp/fto-node-mounts.lock")
REGISTRY = Path("/tmp/fto-node-mounts.d")
"""One file per live container (its mount targets), so that a mount point made on this machine is removed only
when no container of any dev cluster mounts it any more."""
_HELD: list[IO[str]] = []
OLD_RUNNER_LOCK = Path("/tmp/fto-pod-runner.lock")
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def _users() -> dict[Path, list[str]]:
    """The mount targets of every live container on this machine (any dev cluster), by registry entry. An
    entry is live while its container's init holds a lock on it (the kernel drops it when the init dies;
    PIDs would not do: each init is PID 1 of its own namespace)."""
    users = {}
    for entry in REGISTRY.glob("*.json"):
        with contextlib.suppress(OSError), entry.open("r") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with contextlib.suppress(ValueError):
                    users[entry] = json.loads(handle.read() or "[]")
                continue
            entry.unlink(missing_ok=True)  # its container is gone
    return users


def old_pod_runner_active() -> bool:
    """Whether a pod runner of an older checkout (hack/pod_runner.py, which holds this lock shared while it
    runs) may be using mount points: then none is removed."""
    if not OLD_RUNNER_LOCK.exists():
        return False
    with OLD_RUNNER_LOCK.open("r") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    REGISTRY.mkdir(exist_ok=True)
    with MOUNT_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def create_mount_points(mounts: list[dict[str, object]], record: Path) -> tuple[list[str], Path]:
    """Create missing mount points; register this container as a user of all its targets (the registration
    stays locked, by a file this process keeps open, for as long as it lives)."""
    created: list[str] = []
    with _locked():
        me = REGISTRY / f"{uuid.uuid4().hex}.json"
        handle = me.open("w")
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(json.dumps([str(m["target"]) for m in mounts]))
        handle.flush()
        _HELD.append(handle)
        for mount in mounts:
            path = Path(str(mount["target"]))
            missing = [p for p in [path, *path.parents] if not p.exists() and not p.is_symlink()]
            for p in reversed(missing):
                if p == path and not Path(str(mount["source"])).is_dir():
                    p.touch()
                else:
                    p.mkdir()
                created.append(str(p))
                record.write_text(json.dumps(created))
    return created, me


def remove_mount_points(created: list[str], registration: Path | None = None) -> None:
    """Remove the mount points this container created, except those another live container mounts."""
    with _locked():
        if registration is not None:
            registration.unlink(missing_ok=True)
        if old_pod_runner_active():
            return
        in_use = {Path(t) for targets in _users().values() for t in targets}
        for name in reversed(created):
            p = Path(name)
            if p in in_use:
                continue
            with contextlib.suppress(OSError):
                if p.is_dir():
                    p.rmdir()
                elif p.stat().st_size == 0:
                    p.unlink()


def main(plan_path: Path) -> int:
    plan = json.loads(plan_path.read_text())
    mounts: list[dict[str, object]] = plan["mounts"]
    created, registration = create_mount_points(mounts, Path(plan["created_file"]))
    for mount in mounts:
        source, target = str(mount["source"]), Path(str(mount["target"]))
        if not target.exists():  # a mount point inside a volume mounted before it (as runc makes them)
            if Path(source).is_dir():
                target.mkdir(parents=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
        subprocess.run(["mount", "--bind", source, str(target)], check=True)
        if mount["read_only"]:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
    socket.sethostname(plan["hostname"])
    os.chdir(plan["workingDir"])
    command: list[str] = plan["command"]
    main_pid = os.fork()
    if main_pid == 0:
        try:
            os.execvpe(command[0], command, plan["env"])
        except OSError as exc:
            print(f"node agent: cannot start {command[0]}: {exc}", file=sys.stderr, flush=True)
            os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda sig, frame: os.kill(main_pid, sig))
    while True:
        pid, status = os.wait()
        if pid == main_pid:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            break
    Path(plan["exit_file"]).write_text(str(code))
    for mount in reversed(mounts):
        subprocess.run(["umount", "-l", str(mount["target"])], check=False, capture_output=True)
    remove_mount_points(created, registration)
    return code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
