"""The data-preparation section of the trainer config (``TrainerConfig.data``).

Torch-free on purpose: the operator imports the trainer config to render it and to generate the CRD schema,
and it must never import torch (DESIGN.md). Every field has a description (it becomes the CRD's docs) and a
camelCase alias; snake_case names are accepted too. Unknown keys are refused (``extra="forbid"``).

Defaults are chosen so that the smallest useful config is ``{"source": "/data/train.jsonl"}``: prompt /
completion fields, plain template, loss on the completion only, NFKC + whitespace cleaning, exact
de-duplication, PII scrubbed, at most 1 % malformed rows, a 5 % validation hash split (no test
split), as FineTuneJob defaults them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from finetune_trainer.schema import unknown_key_message

__all__ = [
    "AugmentationConfig",
    "BadRowsConfig",
    "CleaningConfig",
    "ComplianceConfig",
    "DataConfig",
    "DedupConfig",
    "ExtraPiiPattern",
    "FieldMapping",
    "ImageAugmentationConfig",
    "ImagesConfig",
    "NegativeSamplingConfig",
    "PiiConfig",
    "PiiKind",
    "SplitConfig",
    "TextAugmentationConfig",
]


class _DataModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        validate_default=True,
    )

    #: Where the section sits in the trainer config, for messages ("data.pii").
    section_name: ClassVar[str] = "data"

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_keys(cls, data: Any) -> Any:
        """Unknown keys are refused as in every trainer-config section: named, with the closest key."""
        if not isinstance(data, Mapping):
            return data
        valid = [key for name, info in cls.model_fields.items() for key in {info.alias or name, name}]
        unknown = [key for key in data if isinstance(key, str) and key not in valid]
        if unknown:
            raise PydanticCustomError("unknown_key", unknown_key_message(unknown[0], cls.section_name, valid))
        return data


Ratio = Annotated[float, Field(ge=0.0, le=1.0)]

DataFormat = Literal["auto", "jsonl", "csv", "parquet", "hf-disk", "image-folder"]
#: The row layouts of the task catalog (finetune_trainer.task_catalog.LAYOUT_KINDS; a test keeps them equal).
MappingKind = Literal[
    "prompt-completion",
    "instruction",
    "chat",
    "text",
    "classification",
    "image-classification",
    "object-detection",
    "interactions",
]
TemplateName = Literal["plain", "alpaca", "chatml", "tokenizer"]
PiiKind = Literal["email", "phone", "credit_card", "ipv4", "ipv6"]
PiiPolicy = Literal["scrub", "reject", "allow"]
TruncationPolicy = Literal["truncate", "drop"]
AugmentationStrategy = Literal["none", "template-variants"]
NegativeStrategy = Literal["uniform", "popularity"]

ALL_PII_KINDS: tuple[PiiKind, ...] = ("email", "phone", "credit_card", "ipv4", "ipv6")


class FieldMapping(_DataModel):
    """Which columns of a row hold what. Only the fields of the chosen ``kind`` are read."""

    section_name = "data.fields"

    kind: MappingKind = Field(
        default="prompt-completion",
        description=(
            "Row layout: 'prompt-completion' (prompt + completion), 'instruction' (instruction + optional "
            "input + output, Alpaca style), 'chat' (a list of {role, content} messages; the last assistant "
            "turn is the completion), 'text' (plain text, loss on every token), 'classification' "
            "(text + label)."
        ),
    )
    prompt: str = Field(default="prompt", description="Column with the prompt (kind prompt-completion).")
    completion: str = Field(
        default="completion", description="Column with the completion (kind prompt-completion)."
    )
    instruction: str = Field(
        default="instruction", description="Column with the instruction (kind instruction)."
    )
    input: str = Field(
        default="input",
        description="Column with the optional input/context (kind instruction); may be absent.",
    )
    output: str = Field(default="output", description="Column with the expected output (kind instruction).")
    messages: str = Field(
        default="messages",
        description="Column with the chat messages, a list of {role, content} objects (kind chat).",
    )
    text: str = Field(default="text", description="Column with the text (kinds text and classification).")
    label: str = Field(
        default="label",
        description="Column with the class label (kinds classification, image-classification).",
    )
    text_pair: str | None = Field(
        default=None, description="Optional column with the second text of a pair (kind classification)."
    )
    image: str = Field(
        default="image",
        description="Column with the image path or bytes (image-classification, object-detection).",
    )
    objects: str = Field(
        default="objects",
        description="Column with the objects of an image, [{bbox, category}] (object-detection).",
    )
    user: str = Field(default="user", description="Column with the user id (kind interactions).")
    item: str = Field(default="item", description="Column with the item id (kind interactions).")
    rating: str | None = Field(
        default=None,
        description="Optional column with the rating or weight (kind interactions); 1 when unset.",
    )
    timestamp: str | None = Field(
        default=None,
        description=(
            "Optional column with the time of the interaction, a number such as Unix seconds (kind "
            "interactions); each user's interactions are ordered by it for the leave-last-out split, and "
            "by row order when unset."
        ),
    )
    id: str | None = Field(
        default=None,
        description=(
            "Optional column with a stable row id. When set, the split hashes this id; otherwise it hashes "
            "the row's mapped content. Either way a row keeps its split when rows are appended."
        ),
    )


class CleaningConfig(_DataModel):
    """Text normalisation and length filters, applied to every text field of a row."""

    section_name = "data.cleaning"

    normalize_unicode: bool = Field(default=True, description="Apply Unicode NFKC normalisation.")
    collapse_whitespace: bool = Field(
        default=True,
        description=(
            "Collapse runs of spaces/tabs into one space, trim each line and allow at most one blank line; "
            "newlines are kept (they matter for code and lists)."
        ),
    )
    strip_html: bool = Field(
        default=False, description="Remove HTML tags, drop <script>/<style> content and unescape entities."
    )
    min_chars: int = Field(
        default=1,
        ge=0,
        description="Drop rows whose completion (or text) is shorter than this, in characters.",
    )
    max_chars: int | None = Field(
        default=None,
        ge=1,
        description="Drop rows whose total text (all fields) is longer than this, in characters; "
        "null: no limit.",
    )


class DedupConfig(_DataModel):
    """Duplicate removal, after cleaning and before the split (so a duplicate never leaks across splits)."""

    section_name = "data.dedup"

    exact: bool = Field(
        default=True, description="Drop rows whose mapped content is identical to an earlier row."
    )
    near: bool = Field(
        default=False,
        description="Drop near-duplicates found with MinHash LSH (datasketch) over word shingles.",
    )
    near_threshold: float = Field(
        default=0.85,
        gt=0.0,
        le=1.0,
        description="Estimated Jaccard similarity at or above which a row is a near-duplicate of an "
        "earlier one.",
    )
    num_perm: int = Field(
        default=128, ge=16, le=1024, description="MinHash permutations (accuracy vs speed)."
    )
    shingle_size: int = Field(
        default=3, ge=1, le=16, description="Words per shingle for near-duplicate hashing."
    )


class ExtraPiiPattern(_DataModel):
    """A user-defined PII pattern (Python regular expression)."""

    section_name = "data.pii.extraPatterns"

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Kind name used in counts and in the replacement token ([NAME] upper-cased).",
    )
    pattern: str = Field(description="Python regular expression; every match is PII of this kind.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
        return value


class PiiConfig(_DataModel):
    """Detection of personal data in every text field."""

    section_name = "data.pii"

    policy: PiiPolicy = Field(
        default="scrub",
        description=(
            "'scrub': replace each match with a token such as [EMAIL]; 'reject': drop rows that contain PII "
            "(counted; the job fails when more than maxRejectRatio of the rows are dropped); "
            "'allow': keep the text, only count."
        ),
    )
    kinds: list[PiiKind] = Field(
        default_factory=lambda: list(ALL_PII_KINDS),
        description="Built-in detectors to run: email, phone, credit_card (Luhn-checked), ipv4, ipv6.",
    )
    extra_patterns: list[ExtraPiiPattern] = Field(
        default_factory=list, description="Additional named regular expressions treated as PII."
    )
    max_reject_ratio: Ratio = Field(
        default=1.0,
        description=(
            "With policy 'reject': the fraction of rows that may be rejected for PII before the job "
            "stops with a data error. 1.0: never stop."
        ),
    )

    @model_validator(mode="after")
    def _unique_names(self) -> PiiConfig:
        names = [p.name for p in self.extra_patterns]
        clashes = sorted({n for n in names if names.count(n) > 1 or n in ALL_PII_KINDS})
        if clashes:
            raise ValueError(f"extraPatterns names must be unique and differ from built-in kinds: {clashes}")
        return self


class BadRowsConfig(_DataModel):
    """Malformed rows: bad JSON, missing fields, wrong types."""

    section_name = "data.badRows"

    max_ratio: Ratio = Field(
        default=0.01,
        description=(
            "Largest tolerated fraction of malformed rows (over all rows read). Above it the job stops "
            "with the non-retryable data-error exit code, naming the first bad lines. 0: any bad row fails."
        ),
    )


class SplitConfig(_DataModel):
    """Train/validation/test split: hash-based and stable, or from explicit sources."""

    section_name = "data.split"

    validation: Ratio = Field(
        default=0.05, description="Fraction of rows for validation (ignored when validationSource is set)."
    )
    test: Ratio = Field(
        default=0.0, description="Fraction of rows for test (ignored when testSource is set)."
    )
    seed: int = Field(
        default=42,
        description=(
            "Salt of the split hash. A row's split depends only on its key and this seed, so appending rows "
            "never moves existing ones."
        ),
    )
    validation_source: str | None = Field(
        default=None,
        description="A separate source for the validation split (same format rules as source); disables the "
        "hash split for validation.",
    )
    test_source: str | None = Field(
        default=None,
        description="A separate source for the test split; disables the hash split for test.",
    )

    @model_validator(mode="after")
    def _ratios_leave_training_data(self) -> SplitConfig:
        used = (0.0 if self.validation_source else self.validation) + (0.0 if self.test_source else self.test)
        if used >= 1.0:
            raise ValueError(
                f"validation + test ratios must be < 1 (got {used:g}); nothing would be left to train"
            )
        return self


class ComplianceConfig(_DataModel):
    """Licence checks. Only enforced when allowedLicenses is non-empty."""

    section_name = "data.compliance"

    allowed_licenses: list[str] = Field(
        default_factory=list,
        description=(
            "SPDX identifiers (case-insensitive) that the dataset and the base model may carry. "
            "Empty: no check. When set, a missing or unlisted licence stops the job with a data error."
        ),
    )
    dataset_license: str | None = Field(default=None, description="SPDX identifier of the dataset's licence.")
    model_license: str | None = Field(
        default=None,
        description="SPDX identifier of the base model's licence (overrides one read from the model card).",
    )


class ImagesConfig(_DataModel):
    """Validation of every image row (image tasks): decodable, colour mode, size. A row that fails is a
    malformed row (``badRows``) with its file and the reason."""

    section_name = "data.images"

    mode: Literal["convert", "refuse"] = Field(
        default="convert",
        description="Images that are not RGB (greyscale, palette, RGBA, CMYK, 16-bit): 'convert' them to RGB "
        "when read, or 'refuse' them as malformed rows.",
    )
    min_size: int = Field(
        default=1, ge=1, description="Smallest width and height in pixels; smaller images are malformed rows."
    )
    max_size: int | None = Field(
        default=None,
        ge=1,
        description="Largest width and height in pixels; larger images are malformed rows. null: no limit.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> ImagesConfig:
        if self.max_size is not None and self.max_size < self.min_size:
            raise ValueError(f"maxSize {self.max_size} is below minSize {self.min_size}")
        return self


class ImageAugmentationConfig(_DataModel):
    """Random image transforms of training images (FineTuneJob's dataset.augmentation.image)."""

    section_name = "data.augmentation.image"

    horizontal_flip: bool = Field(default=False, description="Flip left-right with probability 0.5.")
    random_resized_crop: bool = Field(
        default=False, description="Crop 8 to 100 percent of the area and resize it back."
    )
    color_jitter: float = Field(default=0.0, ge=0.0, le=1.0, description="Colour jitter strength (0: off).")
    rotation_degrees: float = Field(default=0.0, ge=0.0, le=180.0, description="Largest rotation (0: off).")
    random_erasing: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Probability of blacking out one random rectangle (2 to 33 percent of the area; 0: off).",
    )


class TextAugmentationConfig(_DataModel):
    """EDA-style word operations on copies of training rows (FineTuneJob's dataset.augmentation.text):
    synonym replacement from a supplied table, insertion of words of the training split's vocabulary,
    neighbour swaps and deletion, in that order, each per word with its probability (finetune_trainer.data.
    augmentation). Seeded by ``data.augmentation.seed``, the row and the copy number."""

    section_name = "data.augmentation.text"

    word_dropout: float = Field(default=0.0, ge=0.0, le=0.5, description="Probability of deleting a word.")
    word_swap: float = Field(
        default=0.0, ge=0.0, le=0.5, description="Probability of swapping a word with its neighbour."
    )
    word_insertion: float = Field(
        default=0.0,
        ge=0.0,
        le=0.5,
        description="Probability of inserting, after a word, a random word of the training split's "
        "vocabulary.",
    )
    synonym_replacement: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Probability of replacing a word found in ``synonyms`` by one of its synonyms.",
    )
    synonyms: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Synonym table: lower-case word -> its replacements (matched on the lower-cased word).",
    )

    @model_validator(mode="after")
    def _synonyms_for_replacement(self) -> TextAugmentationConfig:
        if self.synonym_replacement > 0 and not self.synonyms:
            raise ValueError("synonymReplacement needs a synonyms table")
        empty = sorted(word for word, options in self.synonyms.items() if not options)
        if empty:
            raise ValueError(f"synonyms: words without a replacement: {empty}")
        return self

    @property
    def active(self) -> bool:
        """Whether any operation can change a row."""
        return any((self.word_dropout, self.word_swap, self.word_insertion, self.synonym_replacement))


class NegativeSamplingConfig(_DataModel):
    """Items drawn as negatives for each training interaction (FineTuneJob's dataset.augmentation.negatives).

    Drawn afresh every epoch from (seed, epoch, interaction) alone, so a run and its resumption see the same
    negatives; an item the user interacted with in the training split is never drawn."""

    section_name = "data.augmentation.negatives"

    strategy: NegativeStrategy = Field(
        default="uniform",
        description=(
            "'uniform': every item equally likely; 'popularity': in proportion to the item's interactions "
            "in the training split (harder negatives)."
        ),
    )
    count: int = Field(default=4, ge=1, le=256, description="Negatives per positive interaction.")


class AugmentationConfig(_DataModel):
    """Deterministic augmentation of the training split only (validation and test are never augmented)."""

    section_name = "data.augmentation"

    strategy: AugmentationStrategy = Field(
        default="none",
        description=(
            "'none', or 'template-variants': add copies of training rows whose prompt is rewritten with the "
            "templates in variants."
        ),
    )
    variants: list[str] = Field(
        default_factory=lambda: [
            "{prompt}",
            "Question: {prompt}",
            "Please answer the following.\n{prompt}",
        ],
        description="Prompt rewrites, each containing '{prompt}'. Copy i of a row uses variant i mod len.",
    )
    copies: int = Field(
        default=1,
        ge=0,
        le=16,
        description="Extra copies per training row (template variants, or text perturbations with ``text``).",
    )
    seed: int = Field(
        default=42,
        description=(
            "Seed of the random augmentation; unset in a trainer config, the config's top-level ``seed`` "
            "(the operator renders the job's seed)."
        ),
    )
    image: ImageAugmentationConfig | None = Field(
        default=None, description="Random image transforms (image tasks; FineTuneJob's augmentation.image)."
    )
    text: TextAugmentationConfig | None = Field(
        default=None, description="Random text perturbations (FineTuneJob's augmentation.text)."
    )
    negatives: NegativeSamplingConfig | None = Field(
        default=None,
        description=(
            "Negative sampling (recommendation; FineTuneJob's augmentation.negatives); 4 uniform negatives "
            "per positive when unset."
        ),
    )

    @field_validator("variants")
    @classmethod
    def _has_placeholder(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if "{prompt}" not in v]
        if bad or not value:
            raise ValueError(f"every variant must contain '{{prompt}}' and the list must not be empty: {bad}")
        return value

    @model_validator(mode="after")
    def _one_kind_of_copy(self) -> AugmentationConfig:
        if self.text is not None and self.strategy != "none":
            raise ValueError("text and strategy 'template-variants' both make the copies; set one of them")
        if self.text is not None and self.copies == 0:
            raise ValueError(
                "text needs copies >= 1: the perturbed copies are made when the data is prepared"
            )
        return self


class DataConfig(_DataModel):
    """Where the training data comes from and how it becomes token ids."""

    source: str = Field(
        min_length=1,
        description=(
            "Path (local or mounted PVC), file://, s3:// (credentials from the environment), "
            "http(s):// URL, hf://org/name[@revision] (datasets.load_dataset, local cache first), or a "
            "Hugging Face datasets save_to_disk folder. Globs and directories expand to every matching file."
        ),
    )
    additional_sources: list[str] = Field(
        default_factory=list, description="More sources read after source, concatenated (same format)."
    )
    format: DataFormat = Field(
        default="auto",
        description="jsonl, csv, parquet, hf-disk, image-folder (a folder per class holding its images; "
        "image-classification), or auto (from the file extension / folder contents).",
    )
    hf_split: str = Field(
        default="train",
        description="For a saved DatasetDict (hf-disk) or an hf:// dataset: which of its splits to read.",
    )
    fields: FieldMapping = Field(default_factory=FieldMapping, description="Column mapping.")
    template: TemplateName = Field(
        default="plain",
        description=(
            "How a row becomes text: 'plain' (prompt, newline, completion), 'alpaca', 'chatml', or "
            "'tokenizer' (the tokenizer's own chat template via apply_chat_template)."
        ),
    )
    system_prompt: str | None = Field(
        default=None, description="Optional system message (chatml and tokenizer templates, chat rows)."
    )
    completion_only_loss: bool = Field(
        default=True,
        description="Compute the loss only on completion tokens (prompt labels are -100). "
        "Ignored for kind text.",
    )
    max_seq_length: int = Field(default=1024, ge=8, description="Maximum tokens per training example.")
    truncation: TruncationPolicy = Field(
        default="truncate",
        description=(
            "Rows longer than maxSeqLength: 'truncate' (the prompt is cut from the left first, then the "
            "completion from the right; counted) or 'drop' (removed; counted)."
        ),
    )
    add_eos: bool = Field(default=True, description="Append the tokenizer's EOS token to every completion.")
    packing: bool = Field(
        default=False,
        description="Concatenate training examples into blocks of maxSeqLength tokens (train split only).",
    )
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig, description="Text cleaning and filters.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Duplicate removal.")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="Personal data detection.")
    bad_rows: BadRowsConfig = Field(default_factory=BadRowsConfig, description="Malformed-row policy.")
    images: ImagesConfig = Field(
        default_factory=ImagesConfig,
        description="Image validation (image tasks; a FineTuneJob's dataset.images).",
    )
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/validation/test split.")
    compliance: ComplianceConfig = Field(default_factory=ComplianceConfig, description="Licence allowlist.")
    augmentation: AugmentationConfig = Field(
        default_factory=AugmentationConfig, description="Training-split augmentation."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.template == "alpaca" and self.fields.kind == "chat":
            raise ValueError("template 'alpaca' cannot render chat rows; use 'chatml' or 'tokenizer'")
        if self.fields.kind == "interactions":
            given = self.split.model_fields_set & {"validation", "test", "validation_source", "test_source"}
            if given:
                names = ", ".join(sorted(SplitConfig.model_fields[n].alias or n for n in given))
                raise ValueError(
                    f"data.split {names}: interactions are split leave-last-out per user by time (the last "
                    "interaction of each user with 3 or more to test, the one before to validation); "
                    "split ratios and sources do not apply"
                )
        if self.packing and self.fields.kind == "classification":
            raise ValueError(
                "packing is for language modelling; it cannot be used with kind 'classification'"
            )
        return self

    @property
    def all_sources(self) -> list[str]:
        """The main source followed by the additional ones."""
        return [self.source, *self.additional_sources]
