"""Pieces shared by both resources: model bases, cross-field rules, conditions, quantities.

Every spec model forbids unknown keys, uses camelCase names on the wire and documents each field with
an attribute docstring: those docstrings become the CRD's descriptions, so `kubectl explain` teaches.
Cross-field rules are declared once, as `CelRule`s: the CRD generator emits them as
`x-kubernetes-validations` and the model runs the same check in Python with the same message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class CelRule:
    """A cross-field rule, checked by the API server (CEL) and by the Python model (`holds`)."""

    rule: str
    """CEL expression over `self` (the object the rule is declared on)."""
    message: str
    """Error text, identical on the server and in Python."""
    holds: Callable[[Any], bool]
    """Python mirror of `rule`, called with the validated model instance."""
    field_path: str | None = None
    """JSONPath-like path (relative to the object, e.g. `.distributed.gpusPerNode`) the error points at."""

    def as_schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


def cel_field(path: str, default: Any) -> str:
    """CEL for `self.<path>` where the path's first part is an optional object the API server leaves out
    when it is omitted (nested objects' defaults aren't written out): the field's value when the object is
    there (the server fills the field's own default), else `default`, the value the Python model uses.

    >>> cel_field("distributed.gpusPerNode", 1)
    '(has(self.distributed) ? self.distributed.gpusPerNode : 1)'
    """
    parent = path.split(".", 1)[0]
    value = json.dumps(default)
    return f"(has(self.{parent}) ? self.{path} : {value})"


def immutable_message(alias: str) -> str:
    return f"{alias} can't change once created; create a new one instead"


class ApiModel(BaseModel):
    """Base of every model in a resource: camelCase on the wire, documented fields, cross-field rules."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        use_attribute_docstrings=True,
        extra="forbid",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = ()
    immutable_fields: ClassVar[tuple[str, ...]] = ()
    """Fields (Python names) that can't change once the object exists (CEL rule `self == oldSelf`)."""

    @model_validator(mode="after")
    def _check_cel_rules(self) -> ApiModel:
        for rule in type(self).cel_rules:
            if not rule.holds(self):
                raise PydanticCustomError("cel_rule", rule.message, {"field_path": rule.field_path or ""})
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(core_schema)
        target = handler.resolve_ref_schema(json_schema)
        if cls.cel_rules:
            target["x-kubernetes-validations"] = [rule.as_schema() for rule in cls.cel_rules]
        for name in cls.immutable_fields:
            alias = cls.model_fields[name].alias or name
            rule = {"rule": "self == oldSelf", "message": immutable_message(alias)}
            target["properties"][alias].setdefault("x-kubernetes-validations", []).append(rule)
        return json_schema

    def immutable_changes(self, new: ApiModel) -> list[tuple[str, str]]:
        """(field, message) for each immutable field that differs in `new`: the Python mirror of the
        transition rules, for checks outside the API server (e.g. a dry run of an update)."""
        fields = type(self).model_fields
        changed = [
            fields[name].alias or name
            for name in type(self).immutable_fields
            if getattr(self, name) != getattr(new, name)
        ]
        return [(alias, immutable_message(alias)) for alias in changed]

    def to_k8s(self) -> dict[str, Any]:
        """The wire form: camelCase keys, JSON types, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(ApiModel):
    """Base of status models: tolerant of keys it doesn't know, so newer writers never break readers."""

    model_config = ConfigDict(extra="ignore")


# --- Kubernetes quantities ---------------------------------------------------------------------------

# The API server's own quantity syntax (k8s.io/apimachinery resource.Quantity), as controller-gen emits it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def _check_quantity(value: str | int) -> str | int:
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise PydanticCustomError(
            "quantity",
            "should be a Kubernetes quantity such as 500m, 4, 16Gi",
        )
    return value


Quantity = Annotated[
    str | int,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes resource quantity (`500m`, `4`, `16Gi`)."""

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

DnsLabel = Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=63)]
"""A Kubernetes object name usable as a DNS label."""

LabelValue = Annotated[str, Field(max_length=63)]


# --- conditions ----------------------------------------------------------------------------------------


class Condition(StatusModel):
    """One observation of the resource's state, as in Kubernetes API conventions (kstatus-compatible)."""

    type: Annotated[str, Field(max_length=316)]
    """Condition type in CamelCase, e.g. `Admitted`, `Running`, `Succeeded`, `Ready`."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds: `True`, `False` or `Unknown`."""
    reason: Annotated[str, Field(max_length=1024)] = ""
    """One CamelCase word for programs, e.g. `InsufficientGPUs`, `BackoffLimitExceeded`."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """A sentence for humans explaining the reason, naming what to change if anything."""
    last_transition_time: datetime | None = None
    """When `status` last changed (not when the reason or message did)."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `metadata.generation` this condition was computed from."""


CONDITIONS_LIST_SCHEMA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}
"""Conditions are a map keyed by type, so server-side apply merges them per type."""


class ConditionedStatus(StatusModel):
    """A status whose truth is in `conditions` (each kind declares the field with its own types)."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `metadata.generation` the status was computed from."""
    conditions: list[Condition]

    def condition(self, type_: str) -> Condition | None:
        """The condition of this type, if present."""
        return next((c for c in self.conditions if c.type == type_), None)


class SecretKeyRef(ApiModel):
    """A key in a Secret in the resource's namespace."""

    name: DnsLabel
    """Name of the Secret."""
    key: Annotated[str, Field(min_length=1, max_length=253)]
    """Key inside the Secret's data."""


Toleration = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
"""A core/v1 Toleration, passed through to the pods unchanged (`key`, `operator`, `value`, `effect`, ...)."""


# --- pods and volumes ----------------------------------------------------------------------------------


DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
"""The extended resource that counts GPUs when `resources.gpuResourceName` is not set."""
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
"""Node label that `resources.gpuProduct` is matched against (set by NVIDIA's GPU feature discovery)."""


class PodResources(ApiModel):
    """What each pod requests, and where it may run."""

    gpu_product: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    """GPU model to run on, matched against the node label `nvidia.com/gpu.product`
    (e.g. `NVIDIA-H100-80GB-HBM3`); any when omitted."""
    gpu_resource_name: Annotated[str, Field(min_length=1, max_length=253)] = DEFAULT_GPU_RESOURCE
    """Extended resource that counts GPUs on nodes."""
    cpu: Quantity | None = None
    """CPU request and limit per pod (e.g. `8`, `500m`)."""
    memory: Quantity | None = None
    """Memory request and limit per pod (e.g. `64Gi`)."""
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict)
    """Extra node labels the pods require."""
    tolerations: Annotated[list[Toleration], Field(max_length=64)] = Field(default_factory=list)
    """Tolerations added to the pods (one for `nvidia.com/gpu` is always added when GPUs are used)."""


DEFAULT_VOLUME_SIZE = "20Gi"


class VolumeClaim(ApiModel):
    """A volume: an existing PersistentVolumeClaim, or a new one the operator creates
    (20Gi on the default StorageClass unless set)."""

    existing_claim: DnsLabel | None = None
    """Use this PersistentVolumeClaim (in the resource's namespace) instead of creating one."""
    size: Quantity | None = None
    """Size of the claim the operator creates (default 20Gi)."""
    storage_class_name: Annotated[str, Field(max_length=253)] | None = None
    """StorageClass of the claim the operator creates (cluster default when omitted)."""

    cel_rules = (
        CelRule(
            rule="!has(self.existingClaim) || (!has(self.size) && !has(self.storageClassName))",
            message="existingClaim excludes size and storageClassName",
            holds=lambda m: m.existing_claim is None or (m.size is None and m.storage_class_name is None),
            field_path=".existingClaim",
        ),
    )


# --- whole objects -------------------------------------------------------------------------------------


MAX_NAME_LENGTH = 50
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_SCHEMA: dict[str, Any] = {
    "description": "Name: a DNS-1035 label of at most 50 characters (children's names add suffixes).",
    "type": "string",
    "maxLength": MAX_NAME_LENGTH,
    "pattern": NAME_PATTERN,
}
"""`metadata.name` of our objects: a DNS-1035 label (it names a Service) short enough for the suffixes
of the children's names (`-a<attempt>-<index>` of trainer pods, `-checkpoints`, ...)."""


class ResourceObject(ApiModel):
    """Fields every object of ours has besides `kind`, `spec` and `status`."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["finetune.dev/v1alpha1"] = "finetune.dev/v1alpha1"
    """API version."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Standard object metadata."""

    @model_validator(mode="after")
    def _check_name(self) -> ResourceObject:
        name = self.metadata.get("name")
        where = {"field_path": ".metadata.name"}
        if name is not None and len(str(name)) > MAX_NAME_LENGTH:
            raise PydanticCustomError(
                "name", f"Too long: may not be more than {MAX_NAME_LENGTH} bytes", where
            )
        if name is not None and not re.match(NAME_PATTERN, str(name)):
            raise PydanticCustomError("name", f"should match '{NAME_PATTERN}'", where)
        return self


class InvalidResourceError(ValueError):
    """A resource body failed validation; `problems` lists (field path, message) pairs."""

    def __init__(self, kind: str, problems: list[tuple[str, str]]) -> None:
        self.kind = kind
        self.problems = problems
        super().__init__(f"invalid {kind}: " + "; ".join(f"{path}: {msg}" for path, msg in problems))


def field_path(loc: tuple[int | str, ...], extra: str = "") -> str:
    """`("spec", "distributed", "nodes")` -> `spec.distributed.nodes`; list indexes as `[i]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return (out + extra).lstrip(".")


M = TypeVar("M", bound=BaseModel)


def parse_resource(model: type[M], kind: str, body: Mapping[str, Any]) -> M:
    """Validate `body` as `model`, turning pydantic's errors into `InvalidResourceError` with field paths."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            ctx = error.get("ctx") or {}
            path = field_path(tuple(error["loc"]), str(ctx.get("field_path", "")))
            problems.append((path or "<root>", error["msg"]))
        raise InvalidResourceError(kind, problems) from None
