"""`python -m finetune_operator [--namespace NS ... | --all-namespaces] [--health-port P]
[--metrics-port M]`;
`python -m finetune_operator audit verify|query ...` (see finetune_operator.audit.cli).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", default=[], help="serve this namespace (repeatable)"
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="serve every namespace (the default without -n)"
    )
    parser.add_argument(
        "--health-port", type=int, default=8080, help="liveness endpoint GET /healthz (0: off)"
    )
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics (0: off)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["audit"]:
        from finetune_operator.audit.cli import main as audit_main

        return audit_main(argv[1:])
    args = parse_args(argv)
    import kopf  # here, not at the top: after `__main__` has hidden the kubernetes client
    import uvloop

    os.environ["FTO_METRICS_PORT"] = str(args.metrics_port)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    if not args.verbose:
        # One line per handler call per object ("Handler ... succeeded") and per probe request cost CPU
        # at scale and say nothing the controller's own transition lines don't; errors still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    from finetune_operator import startup as _registers_handlers  # noqa: F401 - after env is set

    if not args.namespace and not args.all_namespaces:
        logging.getLogger(__name__).info("no --namespace given: serving all namespaces")
    # uvloop: libuv's event loop and its C TLS/socket transports instead of asyncio's pure-Python ones;
    # every API request and watch event goes through them (measured in benchmarks/README.md).
    kopf.run(
        loop=uvloop.new_event_loop(),
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=list(args.namespace),
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    return 0


if __name__ == "__main__":
    # kopf imports the `kubernetes` client whenever it is installed, only to recognise its model classes
    # in kopf.adopt() & co., which the operator never uses (it has its own client, k8s.py): ~40 MB of
    # RSS for nothing. Hide it from this process; any import of it here fails loudly instead.
    sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]
    sys.exit(main())
