"""Every test the README names as the proof of a rule exists, so the table cannot point at nothing."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _named_tests() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    found = []
    for cell in re.findall(r"`(tests/[\w/]+\.py)((?:::\w+)?)`((?:, `::\w+`)*)", text):
        path, first, more = cell
        names = [first] + re.findall(r"`(::\w+)`", more)
        found += [(path, name[2:]) for name in names if name]
    return found


def test_the_readme_names_tests_that_exist():
    named = _named_tests()
    assert len(named) >= 10
    for path, name in named:
        module = ast.parse((ROOT / path).read_text())
        functions = {node.name for node in ast.walk(module) if isinstance(node, ast.FunctionDef)}
        assert name in functions, f"README names {path}::{name}, which does not exist"


def test_every_test_file_the_readme_names_exists():
    text = (ROOT / "README.md").read_text()
    paths = set(re.findall(r"\b(tests/[\w/]+\.py)\b", text))
    assert paths
    missing = sorted(path for path in paths if not (ROOT / path).exists())
    assert not missing, f"README names missing test files: {missing}"
