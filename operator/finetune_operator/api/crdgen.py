"""Generate the CRDs (and the API reference) from the typed models.

    python -m finetune_operator.api.crdgen --out crds/            # write crds/*.yaml
    python -m finetune_operator.api.crdgen --check crds/          # exit 1 with a diff when stale
    python -m finetune_operator.api.crdgen --out crds/ --docs docs/api.md

Pydantic's JSON schema is turned into a structural OpenAPI v3 schema as the API server wants it:
references inlined, `anyOf [X, null]` reduced to X (the API server drops nulls of non-nullable fields),
`[integer, string]` to `x-kubernetes-int-or-string`, exclusive bounds in the OpenAPI 3.0 form, integer
formats, titles and `additionalProperties: false` removed (unknown fields are refused by kubectl's strict
field validation and pruned otherwise), and defaults of fields only: an optional nested object that is
left out stays out of the stored object (the operator's models fill in its defaults), which keeps every
write of the resource cheaper for the API server.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from finetune_operator.api import finetunejob, modeldeployment
from finetune_operator.api.common import GROUP, NAME_SCHEMA, VERSION
from finetune_operator.api.finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from finetune_operator.api.modeldeployment import ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus

HEADER = "# Generated from operator/finetune_operator/api/ by `make crds`. Do not edit.\n"
INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class Resource:
    """One of our kinds and what its CRD needs besides the schema."""

    kind: str
    plural: str
    short_names: list[str]
    model: type[BaseModel]
    spec: type[BaseModel]
    status: type[BaseModel]
    printer_columns: list[dict[str, Any]]
    categories: list[str] = field(default_factory=lambda: ["finetune"])

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"


RESOURCES = (
    Resource(
        kind=finetunejob.KIND,
        plural=finetunejob.PLURAL,
        short_names=["ftj"],
        model=FineTuneJob,
        spec=FineTuneJobSpec,
        status=FineTuneJobStatus,
        printer_columns=[
            {"name": "Task", "type": "string", "jsonPath": ".spec.task", "priority": 1},
            {"name": "Method", "type": "string", "jsonPath": ".spec.method", "priority": 1},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent", "format": "float"},
            {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.trainLoss", "format": "float"},
            {"name": "Eval-Loss", "type": "number", "jsonPath": ".status.metrics.evalLoss", "priority": 1},
            {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt"},
            {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    ),
    Resource(
        kind=modeldeployment.KIND,
        plural=modeldeployment.PLURAL,
        short_names=["mdep"],
        model=ModelDeployment,
        spec=ModelDeploymentSpec,
        status=ModelDeploymentStatus,
        printer_columns=[
            {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
            {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {
                "name": "Quantization",
                "type": "string",
                "jsonPath": ".spec.quantization.method",
                "priority": 1,
            },
            {
                "name": "Quality-Drop",
                "type": "number",
                "jsonPath": ".status.quantization.qualityDrop",
                "format": "float",
                "priority": 1,
            },
            {"name": "Canary", "type": "integer", "jsonPath": ".status.rollout.weight"},
            {
                "name": "Revision",
                "type": "string",
                "jsonPath": ".status.rollout.stableRevision",
                "priority": 1,
            },
            {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    ),
)


class _CrdJsonSchema(GenerateJsonSchema):
    """Pydantic's generator, plus defaults from default factories (nested models, lists, maps)."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            # An optional nested object isn't written out when left out: its fields' own defaults apply
            # once it is given, and the operator's models fill in the rest. Every stored field costs the API
            # server on each write of the object (decoding, validation, managed fields, watch events).
            return NoDefault
        value = factory()  # type: ignore[call-arg]
        # Empty lists and maps are what an absent field means already; a non-empty one (the default
        # evaluation metrics) is a real default.
        return value if isinstance(value, list | dict) and value else NoDefault


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn one pydantic JSON-schema node into a structural OpenAPI v3 node (recursively)."""
    node = dict(schema)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        # The field's own description and default win over the model's; rules of both apply.
        rules = target.get("x-kubernetes-validations", []) + node.get("x-kubernetes-validations", [])
        node = {**target, **node}
        if rules:
            node["x-kubernetes-validations"] = rules
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node.pop("allOf")[0], **node}
        return structural(node, defs)
    if "anyOf" in node:
        options = [opt for opt in node.pop("anyOf") if opt.get("type") != "null"]
        if len(options) == 1:
            if node.get("default", NoDefault) is None:
                node.pop("default")
            return structural({**options[0], **node}, defs)
        if sorted(opt.get("type", "") for opt in options) == ["integer", "string"]:
            node["x-kubernetes-int-or-string"] = True
        else:
            node["anyOf"] = [structural(opt, defs) for opt in options]
    if "$ref" in node or "allOf" in node:
        return structural(node, defs)

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "examples", "$defs"):
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key in ("items",) or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = structural(value, defs)
        elif key == "default" and value is None:
            continue
        elif key == "description":
            out[key] = " ".join(str(value).split())
        else:
            out[key] = value
    if out.get("type") == "integer" and "format" not in out:
        # int32 only where both bounds are known to fit; counters and generations are int64 like metadata's.
        low, high = out.get("minimum"), out.get("maximum")
        bounded = low is not None and high is not None and INT32[0] <= low and high <= INT32[1]
        out["format"] = "int32" if bounded else "int64"
    if "additionalProperties" in out and "type" not in out:
        out["type"] = "object"
    return _ordered(out)


_KEY_ORDER = ("description", "type", "format", "enum", "default")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Readable key order: description and type first, rules last."""
    first = [k for k in _KEY_ORDER if k in node]
    last = [k for k in ("properties", "items", "required", "x-kubernetes-validations") if k in node]
    middle = sorted(k for k in node if k not in first and k not in last)
    return {k: node[k] for k in first + middle + last}


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one model."""
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_CrdJsonSchema)
    return structural(raw, raw.get("$defs", {}))


def crd(resource: Resource) -> dict[str, Any]:
    """The CustomResourceDefinition of one of our kinds."""
    top_doc = (resource.model.__doc__ or "").strip()
    root: dict[str, Any] = {
        "description": top_doc,
        "type": "object",
        "properties": {
            "apiVersion": {
                "description": "APIVersion defines the versioned schema of this representation of an object.",
                "type": "string",
            },
            "kind": {
                "description": "Kind is the REST resource this object represents.",
                "type": "string",
            },
            "metadata": {"type": "object", "properties": {"name": NAME_SCHEMA}},
            "spec": openapi_schema(resource.spec),
            "status": openapi_schema(resource.status),
        },
        "required": ["spec"],
    }

    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": resource.name},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.kind.lower(),
                "shortNames": resource.short_names,
                "categories": resource.categories,
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": resource.printer_columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def _dump(document: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=120, allow_unicode=True)


def render_crds() -> dict[str, str]:
    """File name -> YAML text, one file per CRD."""
    return {f"{r.name}.yaml": _dump(crd(r)) for r in RESOURCES}


# --- API reference (docs/api.md) -----------------------------------------------------------------------


def _type_label(node: dict[str, Any]) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if node.get("x-kubernetes-int-or-string"):
        return "quantity (int or string)"
    kind = str(node.get("type", "object"))
    if kind == "array":
        return f"list of {_type_label(node.get('items', {}))}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type_label(node['additionalProperties'])}"
    if node.get("format") == "date-time":
        return "timestamp"
    return kind


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    for key, label in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
    ):
        if key in node:
            exclusive = node.get("exclusiveMinimum" if key == "minimum" else "exclusiveMaximum") is True
            symbol = {"≥": ">", "≤": "<"}.get(label, label) if exclusive else label
            parts.append(f"{symbol} {node[key]}")
    if "pattern" in node and not node.get("x-kubernetes-int-or-string"):
        parts.append("pattern")
    if "default" in node and not isinstance(node["default"], dict | list):
        parts.append(f"default `{json.dumps(node['default'])}`")
    return ", ".join(parts)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (a `|` would end the cell, even in a code span)."""
    return text.replace("|", "\\|")


def _rows(node: dict[str, Any], path: str, required: bool) -> Iterator[str]:
    description = " ".join(str(node.get("description", "")).split())
    req = " (required)" if required else ""
    yield f"| `{path}`{req} | {_type_label(node)} | {_constraints(node)} | {_cell(description)} |"
    target = node.get("items", node) if node.get("type") == "array" else node
    for name, sub in target.get("properties", {}).items():
        suffix = "[]" if node.get("type") == "array" else ""
        yield from _rows(sub, f"{path}{suffix}.{name}", name in target.get("required", []))


def _rules(node: dict[str, Any], path: str) -> Iterator[str]:
    for rule in node.get("x-kubernetes-validations", []):
        where = path + rule.get("fieldPath", "")
        yield f"| `{where}` | {_cell(rule['message'])} | `{_cell(rule['rule'])}` |"
    target = node.get("items", node) if node.get("type") == "array" else node
    for name, sub in target.get("properties", {}).items():
        yield from _rules(sub, f"{path}.{name}")


def render_reference() -> str:
    """A Markdown reference of both kinds: every field, its type, range, default and description."""
    out = [
        "# API reference",
        "",
        "Generated from `operator/finetune_operator/api/` by `python -m finetune_operator.api.crdgen"
        " --docs docs/api.md`; the same text is in the CRDs (`kubectl explain ftj.spec.distributed`).",
        "",
        "Defaults apply to the fields of objects you give: an optional object you leave out (say"
        " `spec.hyperparameters`) is not written into the stored resource, and every field in it takes the"
        " default listed here. `kubectl get -o yaml` shows what you wrote plus those fields' defaults.",
        "",
    ]
    for resource in RESOURCES:
        doc = crd(resource)
        version = doc["spec"]["versions"][0]
        root = version["schema"]["openAPIV3Schema"]
        names = doc["spec"]["names"]
        out += [
            f"## {resource.kind}",
            "",
            f"`{GROUP}/{VERSION}`, plural `{names['plural']}`, short names {', '.join(names['shortNames'])}, "
            f"category `{', '.join(names['categories'])}`. {root['description']}",
            "",
            "Printer columns: "
            + ", ".join(f"{c['name']} (`{c['jsonPath']}`)" for c in version["additionalPrinterColumns"])
            + ".",
            "",
        ]
        for part in ("spec", "status"):
            out += [f"### {resource.kind} `.{part}`", "", "| field | type | range / default | description |"]
            out += ["| --- | --- | --- | --- |"]
            out += list(_rows(root["properties"][part], part, False))
            out.append("")
        rules = list(_rules(root["properties"]["spec"], "spec"))
        if rules:
            out += [f"### {resource.kind} cross-field rules (CEL, checked by the API server)", ""]
            out += ["| field | message | rule |", "| --- | --- | --- |", *rules, ""]
    return "\n".join(out)


# --- command line --------------------------------------------------------------------------------------


def _diff(name: str, old: str, new: str) -> str:
    return "".join(
        difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{name} (on disk)", name)
    )


def check(outputs: dict[Path, str], read: Callable[[Path], str | None]) -> list[str]:
    """Diffs between what's on disk and what should be; empty when up to date."""
    problems = []
    for path, text in outputs.items():
        current = read(path)
        if current is None:
            problems.append(f"{path}: missing")
        elif current != text:
            problems.append(_diff(str(path), current, text))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="write the CRDs into this directory")
    target.add_argument("--check", type=Path, help="compare this directory with a fresh generation")
    parser.add_argument("--docs", type=Path, help="also write (or check) the Markdown API reference here")
    args = parser.parse_args(argv)

    directory: Path = args.out or args.check
    outputs = {directory / name: text for name, text in render_crds().items()}
    if args.docs:
        outputs[args.docs] = render_reference()

    if args.check:
        problems = check(outputs, lambda p: p.read_text() if p.exists() else None)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(
                "stale: run `python -m finetune_operator.api.crdgen --out crds/ --docs docs/api.md`",
                file=sys.stderr,
            )
        return 1 if problems else 0

    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
