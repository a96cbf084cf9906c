"""The example manifests (examples/*.yaml) and the invalid ones with their expected API-server errors.

Convention (examples/invalid/README.md): each invalid manifest starts with `# mistake: ...` and one or more
`# expect: <text>` lines; every expected text must appear in the API server's answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
INVALID = EXAMPLES / "invalid"

# `spec.a.b: Invalid value: ...`, `spec.a: Required value`, or `unknown field "spec.a"`.
_PATH_RE = re.compile(r'^(?:unknown field "(?P<unknown>[^"]+)"|(?P<path>[\w.\[\]]+): )')


@dataclass(frozen=True)
class InvalidExample:
    path: Path
    mistake: str
    expects: list[str]
    body: dict[str, Any]

    @property
    def field(self) -> str:
        """The field path the (first) expected error names."""
        match = _PATH_RE.match(self.expects[0])
        assert match, f"{self.path.name}: can't find a field path in {self.expects[0]!r}"
        return match.group("unknown") or match.group("path")


def valid_examples() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def demo_examples() -> list[Path]:
    """The manifests `make demo` applies (examples/demo/), exercised end to end by tests/e2e/test_demo.py."""
    return sorted((EXAMPLES / "demo").glob("*.yaml"))


def invalid_examples() -> list[InvalidExample]:
    out = []
    for path in sorted(INVALID.glob("*.yaml")):
        text = path.read_text()
        expects = re.findall(r"^# expect: (.+)$", text, flags=re.MULTILINE)
        mistakes = re.findall(r"^# mistake: (.+)$", text, flags=re.MULTILINE)
        out.append(InvalidExample(path, mistakes[0] if mistakes else "", expects, yaml.safe_load(text)))
    return out


def load(path: Path) -> dict[str, Any]:
    body = yaml.safe_load(path.read_text())
    assert isinstance(body, dict)
    return body
