"""phi1's packages import one another without cycles: `parallel` never imports `core`, `planning` never imports
`training` (issue 15), and no chain of imports leads a package back to itself."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PHI1 = Path(__file__).resolve().parents[1] / "phi1"


def package_imports() -> dict[str, set[str]]:
    """{package: the other phi1 packages its modules import}, lazy imports inside functions included."""
    imports: dict[str, set[str]] = defaultdict(set)
    for path in PHI1.rglob("*.py"):
        relative = path.relative_to(PHI1)
        package = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "phi1" and len(parts) > 1 and parts[1] != package:
                    imports[package].add(parts[1])
    return imports


def test_the_named_layers_hold() -> None:
    imports = package_imports()
    assert "core" not in imports["parallel"], imports["parallel"]
    assert "training" not in imports["planning"], imports["planning"]
    assert imports["training"], "the scan found no imports at all: it cannot be checking anything"


def test_no_package_imports_itself_through_others() -> None:
    imports = package_imports()
    for start in list(imports):
        seen, stack = set(), [start]
        while stack:
            for nxt in imports.get(stack.pop(), ()):
                assert nxt != start, f"{start} reaches itself through {sorted(seen)}"
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
