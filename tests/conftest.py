import contextlib
import io
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Trials here last seconds: system metrics sampled every second (every 5 s in a sweep).
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")

SHARED_FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"

# Small and fast: 32-pixel images, tiny layers. Learnability is measured by the acceptance runs.
TINY = {"image_size": 32, "embed_size": 16, "hidden_size": 32, "batch_size": 16, "epochs": 1,
        "vocab_threshold": 1, "lr": 0.003, "encoder_cnn": "vgg-small", "encoder_rnn": "resnet18"}


def tiny_overrides(arch: str, **more) -> dict:
    base = {k: v for k, v in TINY.items() if not k.startswith("encoder_")}
    base["encoder"] = TINY["encoder_cnn"] if arch == "cnn-lstm" else TINY["encoder_rnn"]
    base.update(pretrained=False, fine_tune=True)
    base.update(more)
    return base


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from captune.data.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth"), images=60, seed=1)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    os.environ["CAPTUNE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from captune.infra.raycluster import init_ray
    from captune.trainables import WORKER_PRELOAD

    # As the CLI starts it: more logical CPUs than this 2-core machine has (or Train workers wait
    # for a CPU forever) and the dashboard, whose State API frees a stopped trial's placement group.
    init_ray(num_cpus=4, preload=WORKER_PRELOAD)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def finished_sweep(ray_cluster, synth_dir, store_template, tmp_path_factory) -> SimpleNamespace:
    """Sweep "s1" of both architectures (3 trials of 2 epochs each) maximising CIDEr-D (the other
    sweeps of the tests maximise the default, BLEU-4), each champion chosen over 2 new seeds of
    the top 2 configurations and registered, shared by the tests that read a finished sweep: its
    folder (storage in folder/tune), tracking URI, sweep file and console output."""
    from captune.cli import main
    from tests.test_sweep import sweep_yaml

    folder = tmp_path_factory.mktemp("s1")
    shutil.copyfile(store_template, folder / "mlflow.db")
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    config = sweep_yaml(folder / "sweep.yaml", trials=3, epochs=2, sampler="gp", early_stopping="none",
                        sampler_args={"n_startup_trials": 2})  # the shipped default strategy, the GP acting once
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["sweep", "--data", str(synth_dir), "--name", "s1", "--config", str(config),
                     "--storage", str(folder / "tune"), "--tracking-uri", tracking_uri, "--metric", "cider",
                     "--seeds", "2", "--top", "2"])
    assert code == 0, out.getvalue()[-3000:]
    return SimpleNamespace(folder=folder, tracking_uri=tracking_uri, config=config, out=out.getvalue())


def attached(ray) -> dict:
    """The environment for a captune command in a process of its own that runs on the session's
    Ray cluster (as it would on a running cluster; its workers forked as locally), not starting
    one of its own: ~10 s less per command."""
    return {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "CAPTUNE_FORK_WORKERS": "1"}


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """A new SQLite MLflow store with its whole schema, made once by captune's own path
    (captune.infra.sqlite_store): MLflow's ~50 migrations take ~2 s of CPU per new store, and the
    tests that only need an empty store start from a copy. Creating a store from nothing is
    tested where it is the subject (tests/test_store_init.py, tests/test_fresh_sweep.py)."""
    from captune.infra.sqlite_store import ready_sqlite_store

    db = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    ready_sqlite_store(f"sqlite:///{db}")
    return db


@pytest.fixture()
def new_store(store_template):
    """new_store(path) -> the tracking URI of an empty store at `path` (a copy of the template)."""
    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store_template, path)
        return f"sqlite:///{path}"
    return make


@pytest.fixture()
def tracking_uri(tmp_path, new_store) -> str:
    return new_store(tmp_path / "mlflow.db")


# --- test tiers and durations ---------------------------------------------------------------------
# `make test-fast` runs `-m "not slow"` (about a minute): every test that needs no Ray cluster, sweep,
# server or processes of its own. A test using the shared cluster or sweep is marked here by its
# fixtures; one that starts its own is marked `@pytest.mark.slow` where it is defined (any test over
# 3 s in runs/test-durations.json).
SLOW_FIXTURES = {"ray_cluster", "finished_sweep"}
DURATIONS_FILE = Path(__file__).resolve().parents[1] / "runs" / "test-durations.json"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs a Ray cluster, a sweep or a server (left out by make test-fast)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


_durations: dict[str, dict[str, float]] = {}


def pytest_runtest_logreport(report):
    _durations.setdefault(report.nodeid, {})[report.when] = round(report.duration, 2)


def pytest_sessionfinish(session, exitstatus):
    """Every test's seconds (setup, call, teardown), slowest first, in runs/test-durations.json:
    the slow tests are known without running the suite again. A run of some tests updates theirs
    and keeps the others' from earlier runs (each row says when it was measured), so a partial
    run never wipes the whole suite's figures."""
    import json
    import time

    if not _durations:
        return
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    try:  # a record of the run, never a reason for it to fail
        try:
            known = {r["test"]: r for r in json.loads(DURATIONS_FILE.read_text()).get("durations", [])}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            known = {}
        for test, phases in _durations.items():
            known[test] = {"test": test, "total": round(sum(phases.values()), 2), **phases, "measured": now}
        rows = sorted(known.values(), key=lambda r: -r["total"])
        DURATIONS_FILE.parent.mkdir(parents=True, exist_ok=True)
        DURATIONS_FILE.write_text(json.dumps({
            "last_run": {"finished": now, "exit_status": int(exitstatus),
                         "args": list(session.config.invocation_params.args), "tests": len(_durations),
                         "seconds": round(sum(sum(v.values()) for v in _durations.values()), 1)},
            "tests": len(rows), "seconds": round(sum(r["total"] for r in rows), 1), "durations": rows}, indent=1))
    except OSError as e:
        print(f"\ntest durations not written to {DURATIONS_FILE}: {e}")
