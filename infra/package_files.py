"""Where captune's own files lie, in a checkout and in an installed wheel alike.

The layers keep their folders in the repository (`search/`, `serving/`, `trainables/`, `data/`, `infra/`) and
install as subpackages of `captune` (pyproject.toml's package-dir): in an editable install
`captune.search` is the checkout's `search/`, beside `captune/`; in a wheel it is
`site-packages/captune/search/`. So a layer's folder is found through the import system, never by
a path counted up from this file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGES = ("captune", "captune.infra", "captune.data", "captune.trainables", "captune.serving", "captune.search")


def package_folder(name: str) -> Path:
    """The folder of the package `name` (e.g. "captune.search"), without importing it: its parent
    package is imported (an empty `captune/__init__.py`), not its own modules."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name}: not an installed package of captune", name=name)
    return Path(next(iter(spec.submodule_search_locations)))


def code_files() -> list[Path]:
    """Every module of captune, in a fixed order."""
    return [path for package in PACKAGES for path in sorted(package_folder(package).glob("*.py"))]
