"""`finetune-operator audit verify FILE...` and `finetune-operator audit query FILE... [filters]`.

FILE may be a directory: its `audit-NNNNNN.jsonl` files are read in chain order. `-` reads stdin
(e.g. `kubectl logs deploy/finetune-operator | finetune-operator audit verify -`; lines that are
not JSON objects, such as ordinary log lines, are skipped there).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from finetune_operator.audit.chain import load_public_key
from finetune_operator.audit.query import Query, parse_time, select, table
from finetune_operator.audit.records import parse_line
from finetune_operator.audit.sinks import chain_files
from finetune_operator.audit.verify import verify_chain


def _expand(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            files = chain_files(path)
            if not files:
                raise FileNotFoundError(f"{name}: no audit-NNNNNN.jsonl files in this directory")
            out.extend(str(file) for file in files)
        else:
            out.append(name)
    return out


def _read(name: str) -> list[str]:
    if name == "-":
        # Log collectors interleave other lines; audit records are the lines that are JSON objects with a
        # `seq` and a `hash`. Anything else on stdin is not part of the chain.
        return [line if _looks_like_record(line) else "" for line in sys.stdin]
    return Path(name).read_text(encoding="utf-8").splitlines()


def _looks_like_record(line: str) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, dict) and "hash" in value and "seq" in value


def verify_main(args: argparse.Namespace) -> int:
    files = _expand(args.files)
    public = load_public_key(Path(args.public_key).read_bytes()) if args.public_key else None
    result = verify_chain(
        [(name, _read(name)) for name in files], public_key=public, allow_partial_start=args.partial
    )
    if result.problem is not None:
        print(f"FAILED after {result.records} intact records: {result.problem}")
        return 1
    span = "" if result.first_seq is None else f", seq {result.first_seq}..{result.last_seq}"
    checkpoints = (
        f"checkpoints: {result.checkpoints_signed} signatures verified, "
        f"{result.checkpoints_unchecked} signed but not checked (no --public-key), "
        f"{result.checkpoints_unsigned} unsigned"
    )
    print(f"OK: {result.records} records in {len(files)} file(s){span}; {checkpoints}")
    return 0


def _records(files: Iterable[str]) -> Iterable[tuple[str, int, str]]:
    for name in files:
        for number, line in enumerate(_read(name), start=1):
            if line.strip():
                yield name, number, line


def query_main(args: argparse.Namespace) -> int:
    query = Query(
        resource=args.resource,
        user=args.user,
        action=args.action,
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        include_checkpoints=args.checkpoints,
    )
    parsed = []
    for name, number, line in _records(_expand(args.files)):
        try:
            parsed.append(parse_line(line))
        except ValueError as exc:
            print(f"{name}:{number}: not an audit record: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 1
    found = list(select(parsed, query))
    if args.output == "jsonl":
        for record in found:
            print(record.line())
    else:
        print(table(found))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-operator audit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check the hash chain (and checkpoint signatures)")
    verify.add_argument("files", nargs="+", metavar="FILE", help="audit files or directories, in chain order")
    verify.add_argument("--public-key", help="Ed25519 public key (PEM or 32 raw bytes) to check checkpoints")
    verify.add_argument(
        "--partial", action="store_true", help="the first record may follow records no longer present"
    )
    verify.set_defaults(run=verify_main)
    query = commands.add_parser("query", help="filter records")
    query.add_argument("files", nargs="+", metavar="FILE")
    query.add_argument("--resource", help="NAME, NAMESPACE/NAME or KIND/NAMESPACE/NAME")
    query.add_argument("--user", help="exact user name, e.g. system:serviceaccount:ns:sa")
    query.add_argument("--action", help="verb or action: CREATE, UPDATE, DELETE, ChildCreated, ...")
    query.add_argument("--since", help="ISO 8601 time, inclusive")
    query.add_argument("--until", help="ISO 8601 time, inclusive")
    query.add_argument("--checkpoints", action="store_true", help="include checkpoint records")
    query.add_argument("--output", "-o", choices=["table", "jsonl"], default="table")
    query.set_defaults(run=query_main)
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        code: int = args.run(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code
