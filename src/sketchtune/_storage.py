"""Optuna RDB storages as sketchtune opens them: heartbeat and crash retry, a SQLite file's
folder created, fast SQLite pragmas, and workers racing to create one schema."""

from __future__ import annotations

import inspect
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from sketchtune._redact import redact

__all__ = ["open_rdb_storage"]


def open_rdb_storage(
    url: str, *, heartbeat_interval: int | None, grace_period: int | None, max_retry: int
) -> optuna.storages.BaseStorage:
    """An ``RDBStorage`` with heartbeat and crash retry; an unreachable URL is a one-line error."""
    kwargs: dict[str, Any] = {}
    if heartbeat_interval is not None:
        # Optuna 4.9 renamed the retry callback and its argument; use what this version has.
        retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
        if retry_cls is not None and "heartbeat_stale_trial_callback" in params:
            key = "heartbeat_stale_trial_callback"
        else:
            retry_cls, key = optuna.storages.RetryFailedTrialCallback, "failed_trial_callback"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = retry_cls(max_retry=max_retry)
        kwargs.update(
            {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period, key: retry}
        )
    from sketchtune._sqlite_url import check_sqlite_path

    check_sqlite_path(url)  # a path the URL parser would cut or decode
    _make_sqlite_folder(url)
    try:
        storage = _create_rdb_storage(url, kwargs)
    except Exception as exc:  # sqlalchemy raises many types; the message is what matters
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"could not open the Optuna storage {redact(url)!r}: {first}. Check that the URL is "
            "right (e.g. sqlite:///tune.db or postgresql+psycopg://user:pass@host/db), that the "
            "database server is running and reachable, and that its driver is installed."
        ) from None
    if url.startswith("sqlite"):
        _fast_sqlite(storage)
    return storage


def _make_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite file (``sqlite:///runs/x/study.db``), as ``output_dir`` is."""
    if not url.startswith("sqlite"):
        return
    try:
        from sqlalchemy.engine import make_url

        database = make_url(url).database
    except Exception:  # a malformed URL: opening it reports the problem
        return
    if database and database != ":memory:" and not database.startswith("file:"):
        try:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # not allowed there: opening the storage says so, with the fix
            return


# Several workers creating the schema of a new database at once: all but one lose the race.
_SCHEMA_RACE = ("alembic_version", "already exists", "database is locked", "UniqueViolation")


def _create_rdb_storage(url: str, kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """``RDBStorage(url, **kwargs)``, retried when another process is creating the same schema."""
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                # heartbeats are "experimental" in Optuna's terms; sketchtune relies on them on purpose
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:  # noqa: PERF203 - a handful of retries at start-up
            if attempt == 4 or not any(mark in str(exc) for mark in _SCHEMA_RACE):
                raise
            time.sleep(0.2 * (attempt + 1))  # the winner finishes creating the tables
    raise AssertionError("unreachable")  # pragma: no cover


def _fast_sqlite(storage: optuna.storages.RDBStorage) -> None:
    """WAL journal and normal sync: each commit no longer waits for two fsyncs, and several
    processes can read while one writes. Durable across process crashes (not power loss)."""
    import sqlalchemy

    def on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # reconnect with the pragmas
