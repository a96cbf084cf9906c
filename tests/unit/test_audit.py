"""Audit log: records, hash chain, signed checkpoints, verify (tamper cases), rotation, sinks, query, CLI."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from finetune_operator.__main__ import main as cli_main
from finetune_operator.audit.chain import Chain, load_private_key, load_public_key, public_pem
from finetune_operator.audit.log import AuditLog, AuditMetrics
from finetune_operator.audit.query import Query, select, table
from finetune_operator.audit.records import (
    GENESIS,
    AuditRecord,
    changed_paths,
    content_hash,
    parse_line,
    spec_digest,
)
from finetune_operator.audit.sinks import EventSink, RotatingFileSink, StdoutSink, chain_files
from finetune_operator.audit.verify import verify_chain
from tests.kube_helpers import REPO_ROOT

T0 = datetime(2026, 12, 2, 18, 0, tzinfo=UTC)
SECRET_MARKER = "s3cr3t-v4lue-7f1c0e"


def job(name: str = "llama", generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"namespace": "team-a", "name": name, "uid": f"uid-{name}", "generation": generation},
        "spec": {"task": "causal-lm", **spec},
    }


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def stream_log(
    checkpoint_every: int = 1000, key: Ed25519PrivateKey | None = None
) -> tuple[AuditLog, io.StringIO]:
    out = io.StringIO()
    log = AuditLog(
        [StdoutSink(out)], Chain(signing_key=key, checkpoint_every=checkpoint_every), clock=Clock()
    )
    return log, out


def admit(log: AuditLog, name: str, *, allowed: bool = True, user: str = "alice") -> AuditRecord:
    return log.admission(
        verb="CREATE",
        user=user,
        groups=["system:authenticated", "team-a"],
        kind="FineTuneJob",
        namespace="team-a",
        name=name,
        uid="",
        generation=1,
        spec=job(name)["spec"],
        old_spec=None,
        allowed=allowed,
        reason="" if allowed else "spec.model.source: scheme 'ftp' is not allowed",
    )


def lines_of(log_count: int = 10, **kwargs: Any) -> list[str]:
    log, out = stream_log(**kwargs)
    for i in range(log_count):
        admit(log, f"job-{i}")
    return out.getvalue().splitlines()


def verify_lines(lines: list[str], **kwargs: Any) -> Any:
    return verify_chain([("audit.jsonl", lines)], **kwargs)


# --- records -------------------------------------------------------------------------------------------


def test_records_link_to_their_predecessor_and_hash_their_content() -> None:
    log, out = stream_log()
    first = admit(log, "a")
    second = log.action("ChildCreated", job("a"), detail="Job/team-a/a-trainer")
    assert first.seq == 0
    assert first.prev == GENESIS
    assert second.seq == 1
    assert second.prev == first.hash
    written = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [content_hash(raw) for raw in written] == [first.hash, second.hash]
    assert parse_line(out.getvalue().splitlines()[1]) == second
    assert second.correlation_id == "FineTuneJob/team-a/a@1" == first.correlation_id
    assert second.user == "system:finetune-operator"
    assert second.allowed is None


def test_admission_record_has_the_issue_fields_and_digests_not_values() -> None:
    log, out = stream_log()
    old = {"task": "causal-lm", "hyperparameters": {"lr": 1e-4, "epochs": 1}, "auth": {"token": "x"}}
    new = {
        "task": "causal-lm",
        "hyperparameters": {"lr": 2e-4, "epochs": 1},
        "auth": {"token": SECRET_MARKER},
    }
    record = log.admission(
        verb="UPDATE",
        user="bob",
        groups=["devs"],
        kind="FineTuneJob",
        namespace="team-a",
        name="llama",
        uid="uid-1",
        generation=3,
        spec=new,
        old_spec=old,
        allowed=False,
        reason="spec.hyperparameters: immutable while the job runs",
    )
    raw = json.loads(out.getvalue())
    assert set(raw) >= {
        "time", "user", "groups", "verb", "kind", "namespace", "name", "uid", "generation",
        "specDigest", "changed", "allowed", "reason", "correlationId", "prev", "hash", "seq",
    }  # fmt: skip
    assert record.changed == ("spec.auth.token", "spec.hyperparameters.lr")
    assert record.spec_digest == spec_digest(new)
    assert record.spec_digest.startswith("sha256:")
    assert record.correlation_id == "FineTuneJob/team-a/llama@3"
    assert SECRET_MARKER not in out.getvalue()
    assert raw["time"] == "2026-12-02T18:00:01.000000Z"


def test_changed_paths_reports_added_removed_and_changed_leaves() -> None:
    assert changed_paths({"a": 1, "b": {"c": 2}}, {"b": {"c": 3, "d": 4}}) == (
        "spec.a",
        "spec.b.c",
        "spec.b.d",
    )
    assert changed_paths({"l": [1, 2]}, {"l": [1, 2]}) == ()
    assert changed_paths({"l": [1, 2]}, {"l": [2, 1]}) == ("spec.l",)


# --- verify: intact and tampered chains ---------------------------------------------------------------


def test_intact_chain_verifies_with_its_count() -> None:
    result = verify_lines(lines_of(12))
    assert result.ok
    assert result.records == 12
    assert (result.first_seq, result.last_seq) == (0, 11)


def test_edited_record_is_named() -> None:
    lines = lines_of(10)
    raw = json.loads(lines[4])
    raw["allowed"] = False  # flip a decision
    lines[4] = json.dumps(raw)
    result = verify_lines(lines)
    assert result.problem is not None
    assert (result.problem.kind, result.problem.where.line) == ("edited", 5)
    assert result.records == 4


def test_lax_edit_that_parses_to_the_same_model_is_still_caught() -> None:
    lines = lines_of(3)
    lines[1] = lines[1].replace('"allowed":true', '"allowed":1')
    result = verify_lines(lines)
    assert result.problem is not None
    assert result.problem.kind == "edited"
    assert result.problem.where.line == 2


def test_edited_record_with_recomputed_hash_is_named_by_the_broken_link() -> None:
    lines = lines_of(10)
    raw = json.loads(lines[6])
    raw["user"] = "mallory"
    raw["hash"] = content_hash(raw)
    lines[6] = json.dumps(raw)
    result = verify_lines(lines)
    assert result.problem is not None
    assert (result.problem.kind, result.problem.where.line) == ("edited", 7)
    assert "seq 6" in result.problem.message


def test_dropped_record_is_named() -> None:
    lines = lines_of(10)
    del lines[3]
    result = verify_lines(lines)
    assert result.problem is not None
    assert (result.problem.kind, result.problem.where.line) == ("dropped", 4)
    assert "3..3" in result.problem.message


def test_dropped_first_record_is_named_unless_partial() -> None:
    lines = lines_of(5)[1:]
    result = verify_lines(lines)
    assert result.problem is not None
    assert result.problem.kind == "dropped"
    assert result.problem.where.line == 1
    assert verify_lines(lines, allow_partial_start=True).ok


def test_swapped_records_are_named_reordered() -> None:
    lines = lines_of(10)
    lines[2], lines[3] = lines[3], lines[2]
    result = verify_lines(lines)
    assert result.problem is not None
    assert (result.problem.kind, result.problem.where.line) == ("reordered", 3)


def test_duplicated_record_is_named() -> None:
    lines = lines_of(5)
    lines.insert(3, lines[1])
    result = verify_lines(lines)
    assert result.problem is not None
    assert result.problem.kind in {"duplicated", "reordered"}
    assert result.problem.where.line == 4


def test_garbage_line_is_named_edited() -> None:
    lines = lines_of(4)
    lines[2] = lines[2][:40]
    result = verify_lines(lines)
    assert result.problem is not None
    assert (result.problem.kind, result.problem.where.line) == ("edited", 3)


# --- signed checkpoints --------------------------------------------------------------------------------


def test_signed_checkpoints_verify_and_catch_a_rewritten_history() -> None:
    key = Ed25519PrivateKey.generate()
    public = load_public_key(public_pem(key))
    lines = lines_of(10, checkpoint_every=4, key=key)
    kinds = [json.loads(line)["type"] for line in lines]
    assert kinds.count("checkpoint") == 2  # after records 4 and 8
    result = verify_lines(lines, public_key=public)
    assert result.ok
    assert result.checkpoints_signed == 2
    assert result.records == 12
    # Rewrite record 1 and recompute every later hash and link: the chain is consistent again,
    # only the signature of the next checkpoint shows the rewrite.
    rewritten: list[str] = []
    prev = None
    for index, line in enumerate(lines):
        raw = json.loads(line)
        if index == 1:
            raw["user"] = "mallory"
        if prev is not None:
            raw["prev"] = prev
        raw["hash"] = content_hash(raw)
        prev = raw["hash"]
        rewritten.append(json.dumps(raw))
    assert verify_lines(rewritten).ok  # without the key this cannot be seen
    result = verify_lines(rewritten, public_key=public)
    assert result.problem is not None
    assert result.problem.kind == "bad-signature"
    assert result.problem.where.line == 5
    other = load_public_key(public_pem(Ed25519PrivateKey.generate()))
    assert verify_lines(lines, public_key=other).problem is not None


def test_signing_key_formats() -> None:
    key = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    assert public_pem(load_private_key(pem)) == public_pem(key) == public_pem(load_private_key(raw))
    with pytest.raises(ValueError, match="PEM or 32 raw bytes"):
        load_private_key(b"short")


# --- file sink: rotation, resume, full disk ------------------------------------------------------------


def file_log(directory: Path, **kwargs: Any) -> tuple[AuditLog, RotatingFileSink]:
    sink = RotatingFileSink(directory, **kwargs)
    log = AuditLog([sink], Chain.resume(sink.tail(), checkpoint_every=1000), clock=Clock())
    return log, sink


def read_dir(directory: Path) -> list[tuple[str, list[str]]]:
    return [(path.name, path.read_text().splitlines()) for path in chain_files(directory)]


def test_rotation_keeps_the_chain_across_files_and_restarts(tmp_path: Path) -> None:
    log, _ = file_log(tmp_path, max_bytes=4096)
    for i in range(40):
        admit(log, f"job-{i}")
    log.close()
    files = chain_files(tmp_path)
    assert len(files) >= 3
    assert all(path.stat().st_size <= 4096 for path in files)
    # A restarted operator resumes the chain from the file's tail.
    log, _sink = file_log(tmp_path, max_bytes=4096)
    for i in range(10):
        admit(log, f"again-{i}")
    log.close()
    result = verify_chain(read_dir(tmp_path))
    assert result.ok, result.problem
    assert result.records == 40 + 10 + 2  # two checkpoints at close
    # A record dropped at a file boundary is named in the file that lost it.
    second = chain_files(tmp_path)[1]
    content = second.read_text().splitlines()
    second.write_text("\n".join(content[1:]) + "\n")
    result = verify_chain(read_dir(tmp_path))
    assert result.problem is not None
    assert result.problem.kind == "dropped"
    assert result.problem.where.file == second.name
    assert result.problem.where.line == 1


def test_retention_removes_the_oldest_files_and_verify_takes_the_rest_partially(tmp_path: Path) -> None:
    log, _ = file_log(tmp_path, max_bytes=2048, keep_files=2)
    for i in range(40):
        admit(log, f"job-{i}")
    log.close()
    files = chain_files(tmp_path)
    assert len(files) == 2
    assert files[0].name != "audit-000001.jsonl"
    assert not verify_chain(read_dir(tmp_path)).ok
    assert verify_chain(read_dir(tmp_path), allow_partial_start=True).ok


def test_partial_last_line_after_a_crash_is_cut_off_on_resume(tmp_path: Path) -> None:
    log, _ = file_log(tmp_path)
    for i in range(3):
        admit(log, f"job-{i}")
    path = chain_files(tmp_path)[0]
    with path.open("a") as handle:
        handle.write('{"seq": 3, "half a rec')
    log, _ = file_log(tmp_path)
    admit(log, "after-crash")
    log.close()
    result = verify_chain(read_dir(tmp_path))
    assert result.ok
    assert result.records == 5


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.parametrize("mode", ["tmpfs", "rlimit"])
def test_full_disk_is_reported_retried_and_recovered_without_losing_stdout(tmp_path: Path, mode: str) -> None:
    """A real full filesystem (a 64 KiB tmpfs in a private mount namespace) and a real file-size limit."""
    audit_dir, copy_dir = tmp_path / "audit", tmp_path / "copy"
    audit_dir.mkdir()
    copy_dir.mkdir()
    child = [sys.executable, "-m", "tests.unit.audit_disk_full", mode, str(audit_dir), str(copy_dir)]
    if mode == "tmpfs":
        if not _unshare_works():
            if os.environ.get("CI") == "true":
                pytest.fail(
                    "CI: `unshare -rm` (user + mount namespaces) is needed for the tmpfs full-disk case"
                )
            pytest.skip("no user/mount namespaces here; the rlimit case still runs")
        script = f'mount -t tmpfs -o size=64k tmpfs "{audit_dir}" && exec "$@"'
        child = ["unshare", "-rm", "sh", "-c", script, "sh", *child]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "operator"), str(REPO_ROOT)])}
    done = subprocess.run(
        child, capture_output=True, text=True, timeout=60, env=env, cwd=REPO_ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    reports = [line for line in done.stderr.splitlines() if line.startswith("{")]  # others: log lines
    phases = {entry["phase"]: entry for entry in map(json.loads, reports)}
    assert "audit file sink failing" in done.stderr
    assert "recovered" in done.stderr
    assert phases["before"]["ok"]
    assert phases["before"]["condition"]
    full = phases["full"]
    assert not full["ok"]
    assert 1 <= full["backlog"] <= 20
    assert full["failures"] >= 1
    assert ("No space left" if mode == "tmpfs" else "too large") in full["error"]
    assert full["condition"] is False
    assert full["reason"] == "SinkFailing"
    assert phases["recovered"]["ok"]
    assert phases["recovered"]["backlog"] == 0
    stdout_lines = done.stdout.splitlines()
    stdout_result = verify_lines(stdout_lines)
    assert stdout_result.ok
    assert stdout_result.records == 5 + 20 + 5 + 1
    file_result = verify_chain(read_dir(copy_dir))
    assert file_result.ok, file_result.problem
    copied = [line for _, lines in read_dir(copy_dir) for line in lines]
    assert copied == stdout_lines  # the file got every record, in order, once the disk took writes


def test_failing_sink_shows_in_metrics(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the audit directory should be")
    registry = CollectorRegistry()
    sink = RotatingFileSink(blocker / "audit", retry_seconds=0.0)
    out = io.StringIO()
    log = AuditLog([StdoutSink(out), sink], metrics=AuditMetrics(registry), clock=Clock())
    admit(log, "a")
    admit(log, "b")

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("finetune_operator_audit_sink_up", sink="file") == 0
    assert value("finetune_operator_audit_sink_up", sink="stdout") == 1
    assert value("finetune_operator_audit_sink_backlog", sink="file") == 2
    assert (value("finetune_operator_audit_sink_failures", sink="file") or 0) >= 2
    assert value("finetune_operator_audit_records_total", type="admission") == 2
    assert log.condition()[0] is False
    assert "file sink failing" in log.condition()[2]
    blocker.unlink()
    log.retry()
    assert value("finetune_operator_audit_sink_up", sink="file") == 1
    assert value("finetune_operator_audit_sink_backlog", sink="file") == 0
    assert verify_chain(read_dir(blocker / "audit")).records == 2


def test_backlog_overflow_is_counted_and_shows_as_dropped_in_verify(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("")
    sink = RotatingFileSink(blocker / "audit", retry_seconds=3600, backlog_limit=3)
    log = AuditLog([sink], clock=Clock())
    admit(log, "first")
    blocker.unlink()
    for i in range(5):
        admit(log, f"job-{i}")
    assert sink.health.dropped == 3
    assert sink.health.backlog == 3
    log.retry()
    result = verify_chain(read_dir(blocker / "audit"))
    assert result.problem is not None
    assert result.problem.kind == "dropped"


# --- events sink and query -----------------------------------------------------------------------------


def test_event_sink_posts_refusals_and_chosen_actions_in_the_background() -> None:
    posted: list[AuditRecord] = []

    async def post(record: AuditRecord) -> None:
        posted.append(record)

    async def scenario() -> None:
        events = EventSink(post, actions=frozenset({"CanaryPromoted"}))
        log = AuditLog([events], clock=Clock())
        admit(log, "ok")
        admit(log, "bad", allowed=False)
        log.action("ChildCreated", job())
        log.action("CanaryPromoted", job())
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert [(r.verb, r.name) for r in posted] == [("CREATE", "bad"), ("CanaryPromoted", "llama")]


def test_query_filters_by_resource_user_action_and_time() -> None:
    log, out = stream_log()
    admit(log, "a", user="alice")
    admit(log, "b", user="bob", allowed=False)
    log.action("ChildCreated", job("a"))
    records = [parse_line(line) for line in out.getvalue().splitlines()]

    def names(query: Query) -> list[tuple[str, str]]:
        return [(r.verb, r.name) for r in select(records, query)]

    assert names(Query(resource="a")) == [("CREATE", "a"), ("ChildCreated", "a")]
    assert names(Query(resource="FineTuneJob/team-a/b")) == [("CREATE", "b")]
    assert names(Query(resource="other/b")) == []
    assert names(Query(user="bob")) == [("CREATE", "b")]
    assert names(Query(action="childcreated")) == [("ChildCreated", "a")]
    assert names(Query(since=T0 + timedelta(seconds=2), until=T0 + timedelta(seconds=2))) == [("CREATE", "b")]
    rendered = table(records).splitlines()
    assert rendered[0].split() == [
        "TIME",
        "SEQ",
        "TYPE",
        "USER",
        "VERB",
        "RESOURCE",
        "GEN",
        "RESULT",
        "REASON",
    ]
    assert "denied" in rendered[2]
    assert "scheme 'ftp'" in rendered[2]


# --- CLI -----------------------------------------------------------------------------------------------


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli_main(["audit", *argv])
    return code, capsys.readouterr().out


def test_cli_verify_counts_or_names_the_bad_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(6)
    good = write(tmp_path / "good.jsonl", lines)
    code, out = run_cli(capsys, "verify", str(good))
    assert code == 0
    assert out.startswith("OK: 6 records in 1 file(s), seq 0..5")
    swapped = list(lines)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    bad = write(tmp_path / "bad.jsonl", swapped)
    code, out = run_cli(capsys, "verify", str(bad))
    assert code == 1
    assert f"{bad}:2: reordered" in out
    assert "after 1 intact records" in out


def test_cli_verify_takes_a_directory_and_a_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "key.pub").write_bytes(public_pem(key))
    sink = RotatingFileSink(tmp_path / "audit", max_bytes=2048)
    log = AuditLog([sink], Chain(signing_key=key, checkpoint_every=5), clock=Clock())
    for i in range(12):
        admit(log, f"job-{i}")
    log.close()
    code, out = run_cli(capsys, "verify", str(tmp_path / "audit"), "--public-key", str(tmp_path / "key.pub"))
    assert code == 0, out
    assert "3 signatures verified" in out


def test_cli_query_outputs_jsonl_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "a.jsonl", lines_of(4))
    code, out = run_cli(capsys, "query", str(path), "--resource", "team-a/job-2", "-o", "jsonl")
    assert code == 0
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["job-2"]
    code, out = run_cli(capsys, "query", str(path), "--user", "alice")
    assert code == 0
    assert len(out.splitlines()) == 5
    code, _ = run_cli(capsys, "query", str(path), "--since", "yesterday")
    assert code == 2


def test_cli_entry_point_reads_stdin_among_other_log_lines() -> None:
    mixed = ["[2026-12-02 18:00:00] INFO kopf starting", *lines_of(3), "plain log line"]
    done = subprocess.run(
        [sys.executable, "-m", "finetune_operator", "audit", "verify", "-"],
        input="\n".join(mixed) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "operator")},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK: 3 records")
