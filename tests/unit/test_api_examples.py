"""Every example parses; every invalid example is refused by the Python models at the field the API server
names, with the API server's message for CEL rules; every CEL rule has an invalid example."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from finetune_operator.api import InvalidResourceError, parse_finetunejob
from finetune_operator.api.common import ApiModel
from finetune_operator.api.finetunejob import FineTuneJob
from finetune_operator.api.modeldeployment import ModelDeployment, parse_modeldeployment
from tests.api_examples import EXAMPLES, InvalidExample, demo_examples, invalid_examples, load, valid_examples

PARSERS: dict[str, Callable[[Mapping[str, Any]], ApiModel]] = {
    "FineTuneJob": parse_finetunejob,
    "ModelDeployment": parse_modeldeployment,
}


def _models(root: type[ApiModel]) -> set[type[ApiModel]]:
    """Every model reachable from `root` through its fields."""
    seen: set[type[ApiModel]] = set()
    todo = [root]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for info in model.model_fields.values():
            stack: list[Any] = [info.annotation]
            while stack:
                hint = stack.pop()
                if isinstance(hint, type) and issubclass(hint, ApiModel):
                    todo.append(hint)
                stack.extend(getattr(hint, "__args__", ()))
    return seen


@pytest.mark.parametrize(
    "path", valid_examples() + demo_examples(), ids=lambda p: str(p.relative_to(EXAMPLES))
)
def test_example_parses_and_round_trips(path: Any) -> None:
    body = load(path)
    resource = PARSERS[body["kind"]](body)
    again = PARSERS[body["kind"]](resource.to_k8s())
    assert again == resource
    assert resource.to_k8s()["metadata"]["name"] == body["metadata"]["name"]


def test_examples_cover_every_task_and_feature() -> None:
    jobs = [parse_finetunejob(load(p)) for p in valid_examples() if load(p)["kind"] == "FineTuneJob"]
    assert {job.spec.task for job in jobs} == {
        "causal-lm",
        "sequence-classification",
        "image-classification",
        "object-detection",
        "recommendation",
    }
    assert {job.spec.method for job in jobs} == {"full", "lora", "qlora"}
    assert any(job.spec.distributed.nodes > 1 and job.spec.distributed.deepspeed for job in jobs)
    assert any(job.spec.scheduling.suspend for job in jobs)


@pytest.mark.parametrize("example", invalid_examples(), ids=lambda e: e.path.name)
def test_invalid_example_is_refused_in_python_at_the_same_field(example: InvalidExample) -> None:
    assert example.expects, f"{example.path.name} has no `# expect:` line"
    assert example.mistake, f"{example.path.name} has no `# mistake:` line"
    with pytest.raises(InvalidResourceError) as refused:
        PARSERS[example.body["kind"]](example.body)
    paths = [path for path, _ in refused.value.problems]
    assert example.field in paths, f"server names {example.field}, Python names {paths}"
    # For CEL rules the Python message is the server's message.
    server_message = example.expects[0].split("Invalid value: ", 1)[-1]
    cel_messages = {
        rule.message
        for model in (*_models(FineTuneJob), *_models(ModelDeployment))
        for rule in model.cel_rules
    }
    if server_message in cel_messages:
        assert (example.field, server_message) in refused.value.problems


def test_at_least_twelve_invalid_examples_with_distinct_mistakes() -> None:
    examples = invalid_examples()
    assert len(examples) >= 12
    assert len({e.expects[0] for e in examples}) == len(examples)


@pytest.mark.parametrize("root", [FineTuneJob, ModelDeployment], ids=lambda m: m.__name__)
def test_every_cel_rule_has_an_invalid_example(root: type[ApiModel]) -> None:
    expected = "\n".join(line for e in invalid_examples() for line in e.expects)
    missing = [
        f"{model.__name__}: {rule.message}"
        for model in _models(root)
        for rule in model.cel_rules
        if rule.message not in expected
    ]
    assert not missing
