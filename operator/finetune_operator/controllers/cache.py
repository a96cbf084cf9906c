"""What the operator knows of its own resources between reconciles (an informer-style cache).

`ObjectCache` holds the latest known body of each of our objects, fed by the watch **and** by the responses
of our own writes; it never goes back to an older resourceVersion of the same object, so a reconcile sees at
least its own writes without a GET per reconcile. `AppliedGenerations` remembers which `metadata.generation`
had its children applied, so children are re-applied only when the spec changed (or after a drift check or a
restart, which start from nothing).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from finetune_operator.controllers.work_queue import ObjectKey


def key_of(body: Mapping[str, Any]) -> ObjectKey:
    meta = body.get("metadata") or {}
    return ObjectKey(str(body.get("kind")), str(meta.get("namespace")), str(meta.get("name")))


def needs_reconcile(previous: Mapping[str, Any] | None, body: Mapping[str, Any]) -> bool:
    """New to us (created, or listed at start-up), its spec changed, or its deletion began.

    Status writes (ours, or the trainer's progress every few seconds) are not a reason: the reconciler
    reads them when something else wakes it."""
    if previous is None:
        return True
    old, new = previous["metadata"], body["metadata"]
    return (
        old.get("uid") != new.get("uid")
        or old.get("generation") != new.get("generation")
        or bool(new.get("deletionTimestamp")) != bool(old.get("deletionTimestamp"))
    )


class ObjectCache:
    """Latest known bodies of our objects, by key; a body never replaces a newer one of the same object."""

    def __init__(self) -> None:
        self._bodies: dict[ObjectKey, dict[str, Any]] = {}

    def get(self, key: ObjectKey) -> dict[str, Any] | None:
        return self._bodies.get(key)

    def remember(self, body: Mapping[str, Any]) -> ObjectKey:
        key = key_of(body)
        known = self._bodies.get(key)
        same_object = known is not None and known["metadata"].get("uid") == body["metadata"].get("uid")
        if not (same_object and known is not None and _version(known) > _version(body)):
            self._bodies[key] = dict(body)
        return key

    def observe(self, body: Mapping[str, Any]) -> bool:
        """Remember a body from the watch; True when it is a reason to reconcile (`needs_reconcile`)."""
        previous = self._bodies.get(key_of(body))
        self.remember(body)
        return needs_reconcile(previous, body)

    def forget(self, key: ObjectKey) -> None:
        self._bodies.pop(key, None)

    def known(self) -> Iterator[ObjectKey]:
        """A snapshot of the keys (the cache may change while it is iterated)."""
        return iter(list(self._bodies))

    def __len__(self) -> int:
        return len(self._bodies)


class AppliedGenerations:
    """The `metadata.generation` whose children were last applied, per object."""

    def __init__(self) -> None:
        self._applied: dict[ObjectKey, int] = {}

    def is_current(self, key: ObjectKey, generation: int) -> bool:
        return self._applied.get(key) == generation

    def mark(self, key: ObjectKey, generation: int) -> None:
        self._applied[key] = generation

    def forget(self, key: ObjectKey) -> None:
        self._applied.pop(key, None)


def _version(body: Mapping[str, Any]) -> int:
    """resourceVersion as a number (etcd revisions); unparsable ones sort first, so the newer one wins."""
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0
