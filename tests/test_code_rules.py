"""Rules every module of the project keeps, checked on its source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "data_pipeline", "trainer", "launch")


def runtime_asserts(tree: ast.AST) -> list[int]:
    """Lines of `assert` statements that check something at run time: everything but the narrowing of a type
    for mypy (`assert isinstance(...)`, `assert x is not None`), which `python -O` may drop without harm."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert):
            continue
        tests = node.test.values if isinstance(node.test, ast.BoolOp) and isinstance(node.test.op, ast.And) else [
            node.test]
        narrowing = all(
            (isinstance(t, ast.Call) and isinstance(t.func, ast.Name) and t.func.id == "isinstance")
            or (isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.IsNot)
                and isinstance(t.comparators[0], ast.Constant) and t.comparators[0].value is None)
            for t in tests)
        if not narrowing:
            lines.append(node.lineno)
    return lines


def test_no_runtime_check_is_an_assert() -> None:
    # `python -O` removes asserts: a check that guards behaviour raises instead.
    found = {str(path.relative_to(REPO)): lines for package in PACKAGES for path in (REPO / package).rglob("*.py")
             if (lines := runtime_asserts(ast.parse(path.read_text())))}
    assert found == {}
    # Negative control: the scan tells the two kinds apart.
    assert runtime_asserts(ast.parse("assert x > 0\nassert isinstance(x, int)\nassert y is not None and z is not None"
                                     "\nassert timed, 'too short'")) == [1, 4]


def test_a_runtime_check_holds_under_python_O() -> None:
    code = ("import torch\nfrom trainer.dist import DistContext\n"
            "DistContext(rank=0, local_rank=0, world_size=1, device=torch.device('cuda'))")
    result = subprocess.run([sys.executable, "-O", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "ValueError: a GPU context names its GPU (cuda:N), got cuda" in result.stderr
