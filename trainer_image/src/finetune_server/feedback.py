"""Feedback on answers and its export into training data: the loop from deployment back to a FineTuneJob.

With ``feedback.enabled`` every answered generation is recorded in ``DIR/requests-<host>.jsonl`` (id, model,
prompt or messages, completion) and ``POST /v1/feedback`` appends to ``DIR/feedback-<host>.jsonl`` (request
id, rating ``up``/``down``, optional correction). One file per pod, so replicas sharing a volume never
interleave writes; feedback may reach another replica than the one that answered, so it is joined at export.

``python -m finetune_server export-feedback --dir DIR --out FILE`` writes JSON lines a FineTuneJob reads with
``data.fields.kind: prompt-completion`` (``{"prompt", "completion"}``) — or ``--kind chat``
(``{"messages": [...]}``): the completion is the correction when one was given, else the answer when it was
rated ``up``; answers rated ``down`` without a correction and empty answers are left out and counted, as
are feedback entries whose request is unknown, entries older than ``retentionDays`` and (for
prompt-completion) multi-turn chats.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Rating = Literal["up", "down"]
ExportKind = Literal["prompt-completion", "chat"]


class FeedbackStore:
    def __init__(self, directory: Path, host: str | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        host = host or socket.gethostname()
        self.requests_path = directory / f"requests-{host}.jsonl"
        self.feedback_path = directory / f"feedback-{host}.jsonl"
        self._lock = threading.Lock()

    def _append(self, path: Path, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock, path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()

    def record_request(
        self,
        request_id: str,
        model: str,
        completion: str,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> None:
        entry: dict[str, Any] = {"time": time.time(), "requestId": request_id, "model": model}
        entry.update({"prompt": prompt} if messages is None else {"messages": messages})
        entry["completion"] = completion
        self._append(self.requests_path, entry)

    def record_feedback(self, request_id: str, rating: Rating, correction: str | None) -> None:
        entry = {"time": time.time(), "requestId": request_id, "rating": rating, "correction": correction}
        self._append(self.feedback_path, entry)


@dataclass
class ExportSummary:
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def _entries(directory: Path, prefix: str) -> Iterator[dict[str, Any]]:
    for path in sorted(directory.glob(f"{prefix}-*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as exc:
                        raise ValueError(f"{path} line {number}: not JSON ({exc})") from exc


def export_feedback(
    directory: Path, out: Path, *, kind: ExportKind = "prompt-completion", retention_days: int = 30
) -> ExportSummary:
    """Join feedback with its requests and write training rows to ``out`` (see the module docstring)."""
    cutoff = time.time() - retention_days * 86400
    requests = {e["requestId"]: e for e in _entries(directory, "requests")}
    latest: dict[str, dict[str, Any]] = {}
    summary = ExportSummary()
    for entry in _entries(directory, "feedback"):
        if entry["time"] < cutoff:
            summary.skip("expired")
            continue
        latest[entry["requestId"]] = entry  # the latest feedback on a request counts
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for request_id, entry in latest.items():
            request = requests.get(request_id)
            if request is None:
                summary.skip("unknownRequest")
                continue
            completion = entry.get("correction") or (
                request["completion"] if entry["rating"] == "up" else None
            )
            if completion is None:
                summary.skip("ratedDownWithoutCorrection")
                continue
            if not completion.strip():
                summary.skip("emptyCompletion")
                continue
            row = _row(request, completion, kind)
            if row is None:
                summary.skip("multiTurnChat")
                continue
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            summary.rows += 1
    return summary


def _row(request: dict[str, Any], completion: str, kind: ExportKind) -> dict[str, Any] | None:
    messages: list[dict[str, str]] | None = request.get("messages")
    if kind == "chat":
        history = messages if messages is not None else [{"role": "user", "content": request["prompt"]}]
        return {"messages": [*history, {"role": "assistant", "content": completion}]}
    if messages is None:
        return {"prompt": request["prompt"], "completion": completion}
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) != 1:
        return None
    return {"prompt": turns[0]["content"], "completion": completion}
