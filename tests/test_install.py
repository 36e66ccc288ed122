"""An ordinary `pip install` of captune (a wheel, not an editable install) works from any folder: the
wheel and the sdist carry every file the code reads next to its modules (the sweep files), the code
finds them and its own folders in the installed package, and captune installs one top-level
package, `captune`, that shadows no user's `data` or `search`.

The wheel is built from a copy of the checkout without downloading anything (this venv's
setuptools), installed with `pip install --no-deps --target` into a folder, and run from an empty
working folder with only that folder on PYTHONPATH: whatever the checkout holds cannot stand in."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER_FOLDERS = tuple(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
SOURCES = ("pyproject.toml", "README.md", *LAYER_FOLDERS)
SWEEP_FILES = ("captune/search/spaces.yaml", "captune/search/demo.yaml")


def pip(*args: str, cwd: Path | None = None) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def source_copy(folder: Path) -> Path:
    """The files a build reads, copied: the build writes build/ and *.egg-info beside them."""
    folder.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """captune's wheel, built from the sources as `pip install .` builds it, and installed into a
    folder of its own (`site`)."""
    work = tmp_path_factory.mktemp("install")
    source = source_copy(work / "source")
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "wheel"), str(source))
    wheel = next((work / "wheel").glob("captune-*.whl"))
    pip("install", "--no-deps", "--no-compile", "--target", str(work / "site"), str(wheel))
    return work, source, wheel


# The venv the tests run in has captune installed editable: its finder would answer, from the
# checkout, for any module the wheel lacks. Dropped, so that only the installed files can be found.
ISOLATED = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if not getattr(f, '__module__', '').startswith('__editable__')]\n")
CLI = ISOLATED + "from captune.cli import entry; sys.argv[0] = 'captune'; entry()"


def installed_run(site: Path, cwd: Path, code: str, *args: str) -> str:
    """Python `code` run against the installed captune only, from `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(site), "MLFLOW_TRACKING_URI": ""}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_wheel_holds_one_top_level_package_and_the_sweep_files(built):
    _, _, wheel = built
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"captune", "captune-0.1.0.dist-info"}
    assert all(f in names for f in SWEEP_FILES), [n for n in names if not n.endswith(".py")]
    for layer in (f for f in LAYER_FOLDERS if f != "captune"):  # each layer a subpackage, all its modules
        modules = sorted(p.name for p in (ROOT / layer).glob("*.py"))
        assert modules == sorted(n.rsplit("/", 1)[1] for n in names if n.startswith(f"captune/{layer}/")
                                 and n.endswith(".py")), layer


def test_a_wheel_built_from_the_sdist_holds_the_same_files(built, tmp_path):
    work, source, wheel = built
    done = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                                                 "print(b.build_sdist(sys.argv[1]))", str(tmp_path / "sdist")],
                          cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sdist = tmp_path / "sdist" / done.stdout.split()[-1]
    members = tarfile.open(sdist).getnames()
    assert all(any(m.endswith(f.removeprefix("captune/")) for m in members) for f in SWEEP_FILES), members
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(sdist))
    again = next((tmp_path / "wheel").glob("captune-*.whl"))
    assert sorted(zipfile.ZipFile(again).namelist()) == sorted(zipfile.ZipFile(wheel).namelist())


INSTALLED = ISOLATED + r"""
import json
from pathlib import Path

site = Path(sys.argv[1]).resolve()
import captune
from captune.infra.mlflow_store import default_tracking_uri
from captune.infra.package_files import code_files
from captune.search import space
from captune.search.request import SweepRequest, plan
from captune.serving.logged_model import model_code
from captune.commands import _dashboard_install, _ui_command

defaults, spaces = space.load_spaces()
demo, _ = space.load_spaces(space.DEFAULT_FILE.with_name("demo.yaml"))
settings, searches = plan(SweepRequest(name="x", data_root="synth", archs=["resnet-gru"], trials=2, epochs=1))
code = model_code(Path("model-code"))
print(json.dumps({
    "modules": [m.__file__ for m in (captune, space, sys.modules["captune.search.request"])],
    "sweep_file": str(space.DEFAULT_FILE), "trials": [defaults.trials, demo.trials, settings.trials],
    "planned": [(s.arch, s.base.image_size) for s in searches],
    "code_files": [str(p) for p in code_files()], "store": default_tracking_uri(),
    "model_code": sorted(str(p.relative_to(code)) for p in code.rglob("__init__.py")),
    "ui": _ui_command(None), "dashboard": _dashboard_install(),
    "top_level": sorted(name for name in ("data", "search", "infra", "trainables", "serving") if (site / name).exists()),
}))
"""


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_an_installed_captune_reads_its_files_from_the_install_in_any_folder(built, tmp_path):
    work, _, _ = built
    site = work / "site"
    here = tmp_path / "elsewhere"
    here.mkdir()
    assert "captune.cli" in (site / "bin" / "captune").read_text()  # the console script
    help_text = installed_run(site, here, CLI, "sweep", "--help")
    assert str(site / "captune" / "search" / "demo.yaml") in "".join(help_text.split()), help_text  # (wrapped)
    installed_run(site, here, CLI, "data", "synth", "--out", "synth", "--images", "20")
    found = json.loads(installed_run(site, here, INSTALLED, str(site)))
    assert all(Path(m).resolve().is_relative_to(site.resolve()) for m in found["modules"]), found["modules"]
    assert Path(found["sweep_file"]).resolve() == (site / "captune" / "search" / "spaces.yaml").resolve()
    assert found["trials"][2] == 2 and found["planned"] == [["resnet-gru", 64]], found
    assert all(Path(p).resolve().is_relative_to(site.resolve()) for p in found["code_files"])
    assert any(p.endswith("search/sweep.py") for p in found["code_files"])  # the fork server's fingerprint
    assert found["store"] == f"sqlite:///{here.resolve() / 'mlflow' / 'mlflow.db'}"  # not site-packages/mlflow
    assert found["model_code"] == ["__init__.py", "data/__init__.py", "infra/__init__.py", "serving/__init__.py",
                                   "trainables/__init__.py"]
    assert found["top_level"] == []
    # what a sweep prints last: commands that work without the checkout
    assert found["ui"].startswith(f"mlflow server --backend-store-uri {found['store']} --host 127.0.0.1"), found["ui"]
    pin = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dashboard"][0]
    assert found["dashboard"] == f"pip install {pin}"


def test_the_checkout_runs_its_own_sweep_files_and_the_cli_names_them(capsys):
    """(The editable install the tests run on: `captune.search` is the checkout's search/.)"""
    from captune.cli import main
    from captune.infra.package_files import package_folder
    from captune.search.space import DEFAULT_FILE

    assert package_folder("captune.search") == ROOT / "search" and DEFAULT_FILE == ROOT / "search" / "spaces.yaml"
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert str(ROOT / "search" / "demo.yaml") in "".join(capsys.readouterr().out.split())


SERVED = ISOLATED + r"""
import importlib.util, json
from pathlib import Path

assert importlib.util.find_spec("captune") is None, "captune is installed here"
import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
captions = model.predict(pd.DataFrame({"image": [Path(sys.argv[2]).read_text()]}), params={"beam": 1})
print(json.dumps({"captions": list(captions), "captune": sys.modules["captune.trainables.checkpoint"].__file__}))
"""


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_a_logged_model_runs_from_the_captune_package_it_carries(tmp_path, new_store):
    """Where captune is not installed, a logged model imports `captune.trainables` from its own code."""
    import mlflow

    from captune.infra.mlflow_store import configure
    from captune.serving.logged_model import log_captioner
    from captune.serving.inputs import example_image
    from tests.test_serving import tiny_checkpoint

    configure(new_store(tmp_path / "mlflow.db"))
    (tmp_path / "ckpt").mkdir()
    with mlflow.start_run():
        info = log_captioner(tiny_checkpoint(tmp_path / "ckpt"))
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    (tmp_path / "image.b64").write_text(example_image())
    (tmp_path / "elsewhere").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", SERVED, str(local), str(tmp_path / "image.b64")],
                          cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(served["captions"]) == 1
    assert Path(served["captune"]).is_relative_to(local / "code" / "captune" / "trainables"), served


def test_from_the_checkout_the_ui_hint_is_its_server_script(monkeypatch, tmp_path):
    from captune.commands import _ui_command

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ROOT)
    assert _ui_command(None).startswith("mlflow/server.sh ")
    monkeypatch.chdir(tmp_path)
    assert _ui_command(None).startswith(f"{ROOT / 'mlflow' / 'server.sh'} ")
    other = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"  # a store the script does not serve
    assert _ui_command(other).startswith(f"mlflow server --backend-store-uri {other} ")
