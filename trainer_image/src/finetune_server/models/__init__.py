"""Served models: one module per kind behind the protocol in ``base.py``; :data:`MODEL_KINDS` maps a task to
its kind, so a further task (detection, recommendation) is one new module and one line here."""

from __future__ import annotations

from finetune_server.models.base import LoadedModel, ServedModel
from finetune_server.models.classifier import ClassifierModel
from finetune_server.models.detector import DetectorModel
from finetune_server.models.image_classifier import ImageClassifierModel
from finetune_server.models.recommender import RecommenderModel
from finetune_server.models.text_generation import TextGenerationModel

MODEL_KINDS: dict[str, type[LoadedModel]] = {
    TextGenerationModel.task: TextGenerationModel,
    ClassifierModel.task: ClassifierModel,
    DetectorModel.task: DetectorModel,
    RecommenderModel.task: RecommenderModel,
    ImageClassifierModel.task: ImageClassifierModel,
}

__all__ = [
    "MODEL_KINDS",
    "ClassifierModel",
    "DetectorModel",
    "ImageClassifierModel",
    "LoadedModel",
    "RecommenderModel",
    "ServedModel",
    "TextGenerationModel",
]
