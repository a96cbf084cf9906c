"""``python -m finetune_server --config PATH``: load the config, start loading the model, serve."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune_server", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="server config (YAML or JSON)")
    parser.add_argument("--port", type=int, help="override the config's port")
    args = parser.parse_args(argv)

    import uvicorn

    from finetune_server.app import create_app
    from finetune_server.config import load_config
    from finetune_server.model import TextGenerationModel

    try:
        config = load_config(args.config)
    except (OSError, ValidationError) as exc:
        print(f"finetune_server: invalid config {args.config}: {exc}", file=sys.stderr)
        return 3
    if args.port:
        config = config.model_copy(update={"port": args.port})
    model = TextGenerationModel(config)
    app = create_app(config, model)
    # Load in the background: liveness answers at once, readiness turns true when the weights are in.
    threading.Thread(target=model.load, name="model-load", daemon=True).start()
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
