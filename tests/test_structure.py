"""Project structure (STYLE.md habits 12 and the acceptance of issue 11): no import circle
among the project's modules, and every source file under 400 lines."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("hitter_core", "kgqa")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports (at any level: a lazy import inside a function is
    still a dependency); ``from pkg import mod`` counts as importing ``pkg.mod``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def test_no_import_circle():
    files = {module_name(p): p for p in source_files()}
    graph = {name: project_imports(path, set(files)) - {name} for name, path in files.items()}
    state: dict[str, str] = {}  # "visiting" / "done"

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = trail[trail.index(name):] + [name]
            pytest.fail("import circle: " + " -> ".join(cycle))
        state[name] = "visiting"
        for other in sorted(graph[name]):
            visit(other, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])
    assert not any(m.startswith("kgqa") for n in graph if n.startswith("hitter_core")
                   for m in graph[n]), "hitter_core must not import kgqa"


@pytest.mark.parametrize("path", source_files() + sorted((REPO / "bench").glob("*.py")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_source_file_is_short(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines < MAX_LINES, f"{path.name}: {lines} lines; split it along a seam"
