"""The layers point down only: data <- trainables <- serving <- search <- captune (the CLI and entry points),
with `infra` (shared infrastructure) below them all. Read from the source (every import statement,
those inside functions included), not from what happens to be loaded.

Each layer is a folder of the repository installed as a subpackage of `captune` (pyproject.toml's
package-dir: `search/` is `captune.search`), so the project's modules are named `captune.<layer>...`
everywhere: in import statements and in the strings that name a module at run time (`python -m`,
the fork server's preloads). A folder's own name (`search.sweep`) resolves only from the
repository's root, never from an installed captune."""
import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"infra": "captune.infra", "data": "captune.data", "trainables": "captune.trainables",
          "serving": "captune.serving", "search": "captune.search", "captune": "captune"}  # folder: installed package
FLOORS = list(LAYERS.values())  # bottom up: each may import those below it
MAY_IMPORT = {layer: set(FLOORS[:i]) for i, layer in enumerate(FLOORS)}
FOLDER_NAMES = {folder for folder in LAYERS if folder != "captune"}  # importable from the repository's root only


def layer_of(module: str) -> str | None:
    """captune.search.sweep -> captune.search; captune.cli -> captune (the CLI); None: not the project."""
    parts = module.split(".")
    if parts[0] != "captune":
        return None
    return f"captune.{parts[1]}" if len(parts) > 1 and f"captune.{parts[1]}" in MAY_IMPORT else "captune"


def sources(folder: str):
    """(installed module name, syntax tree) of every module in a layer's folder."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        yield ".".join((LAYERS[folder], *parts)), ast.parse(path.read_text(), str(path))


def imported_names(tree: ast.AST) -> set[str]:
    """Every module an import statement names (`from captune import commands`: captune.commands)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def imports(folder: str) -> set[tuple[str, str]]:
    """(importing module, imported project module) for every import in a layer's folder."""
    return {(module, name) for module, tree in sources(folder) for name in imported_names(tree)
            if layer_of(name) or name.split(".")[0] in FOLDER_NAMES}


def test_every_import_points_down_or_sideways():
    upward = set()
    for folder, layer in LAYERS.items():
        for module, imported in imports(folder):
            target = layer_of(imported)
            if target is not None and target != layer and target not in MAY_IMPORT[layer]:
                upward.add((layer, imported, module))
    assert not upward, sorted(upward)


def test_shared_infrastructure_imports_nothing_of_the_project_but_itself():
    assert all(layer_of(imported) == "captune.infra" for _, imported in imports("infra"))


def old_module_names() -> re.Pattern:
    """`search.sweep`, `infra.fork_stand_in`, ...: a module named by its folder, from the files."""
    names = [".".join(path.relative_to(ROOT).with_suffix("").parts)
             for folder in FOLDER_NAMES for path in (ROOT / folder).glob("*.py") if path.stem != "__init__"]
    return re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, names)) + r")\b")


def test_no_module_is_named_by_its_folder_alone():
    """An import statement, or a string Ray, `python -m` or importlib resolves (`"-m infra.forkserver"`),
    that names a module by its folder works only from the repository's root."""
    pattern = old_module_names()
    found = []
    for folder in LAYERS:
        for module, tree in sources(folder):
            found += [(module, name) for name in imported_names(tree) if name.split(".")[0] in FOLDER_NAMES]
            found += [(module, node.value) for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.search(node.value)]
    for path in sorted((ROOT / "tests").glob("*.py")):  # the tests name modules to patch, run and import
        tree = ast.parse(path.read_text(), str(path))
        found += [(path.name, name) for name in imported_names(tree) if name.split(".")[0] in FOLDER_NAMES]
        found += [(path.name, node.value) for node in ast.walk(tree) if isinstance(node, ast.Constant)
                  and isinstance(node.value, str) and pattern.search(node.value) and path.name != "test_layers.py"]
    assert not found, found


def test_the_layers_here_are_the_packages_pyproject_installs():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {package: folder for folder, package in LAYERS.items()}
    assert sorted(tool["packages"]) == sorted(LAYERS.values())


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module and its classes and functions (prose, not names)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


MODULE_IN_STRING = re.compile(r"(?<![\w.])captune(?:\.\w+)+")
# Names in strings that are not imports: captune.infra.package_files finds the layers' folders
# (importlib.util.find_spec, which imports none of them) to fingerprint the project's code.
NOT_IMPORTS = {"captune.infra.package_files": {"captune.data", "captune.trainables", "captune.serving",
                                               "captune.search"}}


def test_no_string_names_a_module_of_a_higher_layer():
    """A module name kept in a string (for importlib, `python -m`, Ray, a preload list) is an import
    all the same: it may not point up either."""
    modules = {module.removesuffix(".__init__") for folder in LAYERS for module, _ in sources(folder)} - {"captune"}
    upward = []
    for folder, layer in LAYERS.items():
        for module, tree in sources(folder):
            prose = docstrings(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
                    # a project module, or an attribute of one ("captune.trainables.loop.train"); not
                    # an MLflow tag such as "captune.end_state"
                    for name in MODULE_IN_STRING.findall(node.value):
                        if not any(name == m or name.startswith(m + ".") for m in modules):
                            continue
                        target = layer_of(name)
                        if target is not None and target != layer and target not in MAY_IMPORT[layer] \
                                and name not in NOT_IMPORTS.get(module, ()):
                            upward.append((module, name))
    assert not upward, upward


def test_no_circle_between_modules():
    """No module imports, by statement or by a name in a string, a module that comes back to it:
    each module can be read knowing only those below it."""
    modules = {module.removesuffix(".__init__") for folder in LAYERS for module, _ in sources(folder)}
    trees = {module.removesuffix(".__init__"): tree for folder in LAYERS for module, tree in sources(folder)}

    def module_of(name: str) -> str | None:  # captune.search.rerun_job.RerunJob -> captune.search.rerun_job
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, tree in trees.items():
        prose = docstrings(tree)
        names = imported_names(tree) | {name for node in ast.walk(tree) if isinstance(node, ast.Constant)
                                        and isinstance(node.value, str) and id(node) not in prose
                                        for name in MODULE_IN_STRING.findall(node.value)}
        graph[module] = {m for m in map(module_of, names) if m and m != module}
    circles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles
