"""A new SQLite MLflow store opened by several processes at once (captune.infra.sqlite_store): every
captune process goes on, and the store ends complete, even against a process that takes no lock."""
import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import pytest

ROUNDS = int(os.environ.get("CAPTUNE_RACE_ROUNDS", "5"))  # per test; the acceptance run used 10


def _open(uri: str, start: float, plain: bool, results) -> None:
    """In a forked child: wait for the common start, then open the store as captune does (or as
    a plain MLflow client, like `mlflow ui`, does), and say how it went."""
    from mlflow import MlflowClient

    from captune.infra.mlflow_store import configure

    while time.time() < start:
        pass
    try:
        if not plain:
            configure(uri)
        MlflowClient(uri).search_experiments(max_results=1)
        results.put(("plain" if plain else "captune", "ok"))
    except Exception as e:
        results.put(("plain" if plain else "captune", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))


def _race(tmp_path: Path, kinds: tuple[bool, bool]) -> list[list[tuple[str, str]]]:
    """ROUNDS fresh stores, each opened by two processes started together."""
    fork = multiprocessing.get_context("fork")
    rounds = []
    for n in range(ROUNDS):
        uri = f"sqlite:///{tmp_path / f'race{n}.db'}"
        results = fork.Queue()
        start = time.time() + 0.5
        children = [fork.Process(target=_open, args=(uri, start, plain, results)) for plain in kinds]
        for child in children:
            child.start()
        for child in children:
            child.join(120)
        rounds.append(sorted(results.get(timeout=5) for _ in children))
    return rounds


def _head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_two_captune_processes_create_a_new_store_together(tmp_path):
    # Before the lock: one of the two failed inside MLflow's migration in most rounds.
    rounds = _race(tmp_path, (False, False))
    assert all(outcome == [("captune", "ok"), ("captune", "ok")] for outcome in rounds), rounds
    from captune.infra.sqlite_store import debris, schema_revision

    for n in range(ROUNDS):
        db = tmp_path / f"race{n}.db"
        assert schema_revision(db) == _head() and not debris(db)


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_captune_waits_for_another_program_creating_the_store(tmp_path):
    # `mlflow ui` (a plain client) creating the store as a captune command starts: captune goes
    # on once the store is complete, and the store is usable afterwards whatever the other did.
    rounds = _race(tmp_path, (True, False))
    assert all(("captune", "ok") in outcome for outcome in rounds), rounds
    from mlflow import MlflowClient

    from captune.infra.sqlite_store import debris, schema_revision

    for n in range(ROUNDS):
        db = tmp_path / f"race{n}.db"
        assert schema_revision(db) == _head() and not debris(db), n
        MlflowClient(f"sqlite:///{db}").search_experiments()


def test_a_new_store_left_half_migrated_is_repaired(tmp_path, monkeypatch):
    # As a failed migration leaves it: tables at an early revision, and a batch migration's
    # temporary table in the way of every later try.
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase
    from sqlalchemy import create_engine

    from captune.infra import sqlite_store
    from captune.infra.mlflow_store import configure

    db = tmp_path / "half.db"
    engine = create_engine(f"sqlite:///{db}")
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(f"sqlite:///{db}")
    command.upgrade(config, "451aebb31d03")  # (an early revision)
    engine.dispose()
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE _alembic_tmp_metrics (x INTEGER)")
    monkeypatch.setattr(sqlite_store, "STALLED_S", 0.5)
    configure(f"sqlite:///{db}")
    assert sqlite_store.schema_revision(db) == _head() and not sqlite_store.debris(db)


def test_a_damaged_store_with_runs_is_named_not_repaired(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from captune.infra import sqlite_store

    db = tmp_path / "runs.db"
    client = MlflowClient(f"sqlite:///{db}")
    client.create_run(client.create_experiment("x"))
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")
        connection.execute("CREATE TABLE _alembic_tmp_metrics (x INTEGER)")
    monkeypatch.setattr(sqlite_store, "STALLED_S", 0.2)
    monkeypatch.setenv(sqlite_store.WAIT_ENV, "1")
    with pytest.raises(sqlite_store.StoreNotReady, match="mlflow db upgrade"):
        sqlite_store.ready_sqlite_store(f"sqlite:///{db}")
    assert sqlite_store.debris(db) == ["_alembic_tmp_metrics"]  # nothing of a store with runs touched


def test_contract_mlflow_schema_helpers():
    # MLflow 3.17's private helpers captune.infra.sqlite_store relies on: the head revision as a string,
    # the migration runner taking an engine, and alembic's batch tables named _alembic_tmp_<table>.
    import inspect

    from alembic.operations import batch

    from mlflow.store.db import utils

    assert isinstance(utils._get_latest_schema_revision(), str)
    assert list(inspect.signature(utils._upgrade_db).parameters) == ["engine"]
    assert "_alembic_tmp_" in inspect.getsource(batch)
