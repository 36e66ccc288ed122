"""The layers point down only: data <- trainables <- search <- captune (the CLI and entry points),
with `infra` (shared infrastructure) below them all. Read from the source (every import statement,
those inside functions included), not from what happens to be loaded."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "data", "trainables", "search", "captune")
MAY_IMPORT = {"infra": set(), "data": {"infra"}, "trainables": {"infra", "data"},
              "search": {"infra", "data", "trainables"}, "captune": {"infra", "data", "trainables", "search"}}


def imports(package: str) -> set[tuple[str, str]]:
    """(importing module, imported project module) for every import in `package`."""
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            if isinstance(node, ast.ImportFrom) and node.module in PACKAGES:  # from captune import tracking
                names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {(module, name) for name in names if name.split(".")[0] in PACKAGES}
    return found


def test_every_import_points_down_or_sideways():
    upward = set()
    for package in PACKAGES:
        for module, imported in imports(package):
            target = imported.split(".")[0]
            if target != package and target not in MAY_IMPORT[package]:
                upward.add((package, imported, module))
    assert not upward, sorted(upward)


def test_shared_infrastructure_imports_nothing_of_the_project_but_itself():
    assert all(imported.startswith("infra") for _, imported in imports("infra"))
