"""``python -m finetune_trainer --config PATH``: the pod entrypoint (see finetune_trainer.launch)."""

import sys

from finetune_trainer.launch import main

if __name__ == "__main__":
    sys.exit(main())
