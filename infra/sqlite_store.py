"""A new SQLite MLflow store, created by one process at a time and complete before use.

MLflow creates a new SQLite store's tables and migrates them to its schema on a client's first
call, without a lock: two processes opening a new file at once (a sweep and `mlflow ui`, two
commands) fail inside the migration ("table ... already exists", alembic's "expected to match one
row"), and a migration that fails half-way can leave the file unusable ("table
_alembic_tmp_metrics already exists" on every later call). captune's processes create a store
under a lock file beside it; against another program's process (which takes no lock) they wait
until its migration is complete, and repair a new store (no run in it yet) that a failed
migration left half-made.

Relies on MLflow 3.17's `mlflow.store.db.utils._get_latest_schema_revision` and `_upgrade_db`
(the schema's head revision; the migrations themselves), and on alembic's batch migrations
naming their temporary tables `_alembic_tmp_<table>`: tests/test_store_init.py's contract test
fails first if they change.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from captune.infra.errors import UserError
from captune.infra.mlflow_logging import unavailable

# mlflow and filelock are imported inside the functions: infra is imported by every layer.

WAIT_ENV = "CAPTUNE_STORE_INIT_S"  # how long to wait for another process creating the store
STALLED_S = 5.0  # a migration making no progress for this long has died
DEBRIS = "_alembic_tmp_"

_READY: set[str] = set()  # the stores this process has seen complete


class StoreNotReady(UserError, RuntimeError):
    """The store's schema did not become complete: being made elsewhere, too old, or damaged."""


def ready_sqlite_store(uri: str) -> None:
    """Return once the SQLite store `uri` exists with MLflow's whole schema (see the module)."""
    if uri in _READY:
        return
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    with FileLock(f"{db}.init-lock"):
        _complete_schema(uri, db, float(os.environ.get(WAIT_ENV, "60")))
    _READY.add(uri)


def _complete_schema(uri: str, db: Path, wait_s: float) -> None:
    from mlflow import MlflowClient
    from mlflow.store.db.utils import _get_latest_schema_revision

    head = _get_latest_schema_revision()
    deadline, last, since = time.monotonic() + wait_s, "unread", time.monotonic()
    while True:
        error = None
        try:
            client = MlflowClient(uri)  # the tracking and the registry store each create tables if need be
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        except Exception as e:
            if unavailable(e) and "database is locked" in str(e):
                raise  # a writer holds the store: the caller says so (captune.infra.mlflow_store)
            error = e
        revision = schema_revision(db)
        if revision == head and error is None:
            drop_debris(db)  # a failed try's temporary tables, once the whole schema stands
            return
        if revision != last:  # still moving: another process is migrating it
            last, since = revision, time.monotonic()
        elif time.monotonic() - since > STALLED_S and debris(db):
            repair_new_store(db)
            since = time.monotonic()
        if time.monotonic() > deadline:
            cause = f" ({type(error).__name__}: {_first_line(error)})" if error else ""
            raise StoreNotReady(f"MLflow store {db}: its schema is at revision {revision or 'none'}, not {head}, after "
                                f"{wait_s:.0f}s{cause}. If another program is creating or upgrading it, run the "
                                f"command again once it is done; an older store needs `mlflow db upgrade {uri}` "
                                f"(copy {db} first)")
        time.sleep(0.2)


def schema_revision(db: Path) -> str | None:
    """The store's alembic revision, read with sqlite3 alone (no MLflow engine, no migration)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=20) as connection:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None
    except sqlite3.Error:  # no file yet, no table yet
        return None


def debris(db: Path) -> list[str]:
    """Temporary tables a batch migration left when it failed half-way."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=20) as connection:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return [name for (name,) in rows if name.startswith(DEBRIS)]
    except sqlite3.Error:
        return []


def drop_debris(db: Path) -> None:
    names = debris(db)
    if names:
        with sqlite3.connect(db, timeout=20) as connection:
            for name in names:
                connection.execute(f'DROP TABLE IF EXISTS "{name}"')


def repair_new_store(db: Path) -> None:
    """A store that holds no run yet, left half-migrated: its migration's temporary tables are
    dropped and the migration goes on from the revision it reached. A store with runs is left
    as it is (StoreNotReady names it after the wait)."""
    from mlflow.store.db.utils import _upgrade_db
    from sqlalchemy import create_engine

    with sqlite3.connect(db, timeout=20) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "runs" in tables and connection.execute("SELECT count(*) FROM runs").fetchone()[0]:
            return
    drop_debris(db)
    engine = create_engine(f"sqlite:///{db}")
    try:
        _upgrade_db(engine)
    finally:
        engine.dispose()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""
