"""The CRDs in crds/ are what the models generate, and they are structural, described and consistent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api import crdgen

ROOT = Path(__file__).resolve().parents[2]
CRD_NAMES = ["finetunejobs.finetune.dev", "modeldeployments.finetune.dev"]


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _root(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "crds" / f"{name}.yaml").read_text())
    root = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert isinstance(root, dict)
    return root


def test_crds_and_reference_are_up_to_date() -> None:
    for name, text in crdgen.render_crds().items():
        assert (ROOT / "crds" / name).read_text() == text, f"crds/{name} is stale: run `make crds`"
    assert (ROOT / "docs" / "api.md").read_text() == crdgen.render_reference(), (
        "docs/api.md is stale: run `python -m finetune_operator.api.crdgen --out crds/ --docs docs/api.md`"
    )
    assert sorted(p.name for p in (ROOT / "crds").glob("*.yaml")) == sorted(crdgen.render_crds())


def test_check_fails_with_a_diff_when_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crdgen.main(["--out", str(tmp_path)]) == 0
    assert crdgen.main(["--check", str(tmp_path)]) == 0
    target = tmp_path / "finetunejobs.finetune.dev.yaml"
    target.write_text(target.read_text().replace("shortNames:\n    - ftj", "shortNames:\n    - fj"))
    capsys.readouterr()
    assert crdgen.main(["--check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "-    - fj" in err
    assert "+    - ftj" in err
    (tmp_path / "modeldeployments.finetune.dev.yaml").unlink()
    assert crdgen.main(["--check", str(tmp_path)]) == 1
    assert "modeldeployments.finetune.dev.yaml: missing" in capsys.readouterr().err


@pytest.mark.parametrize("name", CRD_NAMES)
def test_every_field_is_described(name: str) -> None:
    undescribed = [
        path
        for path, node in _walk(_root(name))
        if path not in ("", ".metadata") and not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert not undescribed


@pytest.mark.parametrize("name", CRD_NAMES)
def test_schema_is_structural(name: str) -> None:
    for path, node in _walk(_root(name)):
        for key in ("$ref", "$defs", "allOf", "anyOf", "oneOf", "title", "const", "examples"):
            assert key not in node, f"{path} has {key}"
        assert node.get("additionalProperties") is not False, path
        if not node.get("x-kubernetes-int-or-string"):
            assert node.get("type") in ("object", "array", "string", "integer", "number", "boolean"), path
        if "properties" in node:
            assert node["type"] == "object", path
            assert set(node.get("required", [])) <= set(node["properties"]), path
        if node.get("type") == "array":
            assert "items" in node, path
        if node.get("type") == "integer":
            assert node.get("format") in ("int32", "int64"), path
        if isinstance(node.get("exclusiveMinimum"), bool) or isinstance(node.get("exclusiveMaximum"), bool):
            assert "minimum" in node or "maximum" in node, path


@pytest.mark.parametrize("name", CRD_NAMES)
def test_unknown_fields_are_kept_only_for_tolerations(name: str) -> None:
    preserved = [
        path for path, node in _walk(_root(name)) if node.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert preserved == [".spec.resources.tolerations[]"]


@pytest.mark.parametrize("name", CRD_NAMES)
def test_cel_rules_have_messages(name: str) -> None:
    rules = [rule for _, node in _walk(_root(name)) for rule in node.get("x-kubernetes-validations", [])]
    assert rules
    for rule in rules:
        assert rule["message"]
        assert rule["rule"]
        assert rule.get("fieldPath", ".").startswith(".")


@pytest.mark.parametrize("resource", crdgen.RESOURCES, ids=lambda r: r.kind)
def test_names_subresource_and_printer_columns(resource: crdgen.Resource) -> None:
    doc = crdgen.crd(resource)
    names = doc["spec"]["names"]
    assert names["categories"] == ["finetune"]
    assert names["shortNames"] == {"FineTuneJob": ["ftj"], "ModelDeployment": ["mdep"]}[resource.kind]
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    root = version["schema"]["openAPIV3Schema"]
    declared = {path for path, _ in _walk(root)}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    wanted = {
        "FineTuneJob": ["Phase", "Progress", "Loss", "Attempt", "Restarts", "Age"],
        "ModelDeployment": ["Ready", "Endpoint", "Quantization", "Age"],
    }[resource.kind]
    assert set(wanted) <= set(columns)
    for json_path in columns.values():
        field = json_path.split("[", 1)[
            0
        ]  # .status.conditions[?(@.type=="Ready")].status -> .status.conditions
        assert field in declared or field == ".metadata.creationTimestamp", json_path


def test_optional_objects_are_not_written_out_but_their_fields_default() -> None:
    """An omitted nested object stays omitted (every stored field costs each write of the object); once
    given, its fields' defaults apply. Empty lists and maps aren't defaults; a non-empty one is."""
    spec = _root("finetunejobs.finetune.dev")["properties"]["spec"]["properties"]
    for name in ("distributed", "resources", "scheduling", "hyperparameters", "checkpointing", "output"):
        assert "default" not in spec[name], name
    assert spec["distributed"]["properties"]["gpusPerNode"]["default"] == 1
    assert spec["scheduling"]["properties"]["maxRestarts"]["default"] == 3
    assert "default" not in spec["resources"]["properties"]["tolerations"]
    assert spec["evaluation"]["properties"]["metrics"]["default"] == ["loss"]


def test_rules_over_optional_objects_read_the_python_default_when_absent() -> None:
    rules = [
        r["rule"]
        for r in _root("finetunejobs.finetune.dev")["properties"]["spec"]["x-kubernetes-validations"]
    ]
    assert (
        "self.method != 'qlora' || (has(self.distributed) ? self.distributed.gpusPerNode : 1) >= 1" in rules
    )
    for rule in rules:
        for optional in ("distributed", "hyperparameters", "output", "resources"):
            # every read of an optional object's field is guarded by has()
            assert rule.count(f"self.{optional}.") <= rule.count(f"has(self.{optional})") * 2, rule


def test_conditions_are_a_map_keyed_by_type() -> None:
    for name in CRD_NAMES:
        conditions = _root(name)["properties"]["status"]["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        assert {"type", "status"} <= set(conditions["items"]["required"])


def test_int_or_string_quantities() -> None:
    cpu = _root("finetunejobs.finetune.dev")["properties"]["spec"]["properties"]["resources"]["properties"][
        "cpu"
    ]
    assert cpu["x-kubernetes-int-or-string"] is True
    assert "pattern" in cpu
    assert "type" not in cpu
