"""Data preparation: sources → rows → cleaning → dedup → PII → split → templates → token ids.

Entry point: :func:`finetune_trainer.data.pipeline.prepare`.
Config: :class:`finetune_trainer.data.config.DataConfig` (torch-free:
importing this package does not import torch
or transformers).
"""

from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.errors import DataError

__all__ = ["DataConfig", "DataError"]
