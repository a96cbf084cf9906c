"""``python -m finetune_server --config PATH``: serve.

``python -m finetune_server export-feedback ...``: write the collected feedback as training rows a
FineTuneJob reads (``finetune_server.feedback``).

Exit codes: 0 served and stopped; 3 invalid config (the message names the field).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

EXIT_INVALID_CONFIG = 3


def export_feedback_main(argv: list[str]) -> int:
    from finetune_server.feedback import export_feedback

    parser = argparse.ArgumentParser(prog="finetune_server export-feedback")
    parser.add_argument("--dir", type=Path, required=True, help="the feedback folder (feedback.dir)")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file to write")
    parser.add_argument("--kind", choices=["prompt-completion", "chat"], default="prompt-completion")
    parser.add_argument("--retention-days", type=int, default=30)
    args = parser.parse_args(argv)
    summary = export_feedback(args.dir, args.out, kind=args.kind, retention_days=args.retention_days)
    print(json.dumps({"out": str(args.out), "rows": summary.rows, "skipped": summary.skipped}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export-feedback"]:
        return export_feedback_main(argv[1:])
    parser = argparse.ArgumentParser(prog="finetune_server", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="server config (YAML or JSON)")
    parser.add_argument("--port", type=int, help="override the config's port")
    args = parser.parse_args(argv)

    from finetune_server.artifact import served_task
    from finetune_server.config import load_config
    from finetune_server.decryption import decrypted_config
    from finetune_server.errors import ArtifactError

    try:
        config = load_config(args.config)
        if args.port:
            config = config.model_copy(update={"port": args.port})
        config = decrypted_config(config)
        task = served_task(config.model_dir, config.task)
    except (OSError, ValidationError, ArtifactError) as exc:
        print(f"finetune_server: invalid config {args.config}: {exc}", file=sys.stderr)
        return EXIT_INVALID_CONFIG

    import uvicorn

    from finetune_server.app import create_app
    from finetune_server.models import MODEL_KINDS

    if task not in MODEL_KINDS:
        print(
            f"finetune_server: task: {task} is not served (served: {', '.join(MODEL_KINDS)})", file=sys.stderr
        )
        return EXIT_INVALID_CONFIG
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = MODEL_KINDS[task](config)
    try:
        app = create_app(config, model)
    except ValueError as exc:  # e.g. auth.apiKeysDir without keys
        print(f"finetune_server: invalid config {args.config}: {exc}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    threading.Thread(target=model.load, name="model-load", daemon=True).start()
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
