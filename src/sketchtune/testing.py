"""Helpers for tests and benchmarks: a throwaway PostgreSQL server for real RDB-storage runs."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["PostgresUnavailable", "postgres_cluster"]


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@contextmanager
def postgres_cluster(database: str = "sketchtune") -> Iterator[str]:
    """Start a throwaway PostgreSQL cluster on 127.0.0.1 and yield an SQLAlchemy URL to ``database``.

    ``initdb`` + ``pg_ctl`` in a fresh temporary directory, a free port, trust
    authentication, fsync off; run as the ``postgres`` user when this process is
    root (initdb refuses root). The server is stopped and its files removed on
    exit, also after errors.

    Raises:
        PostgresUnavailable: ``initdb``/``pg_ctl`` are not installed
            (Debian: ``apt-get install postgresql``).
    """
    initdb, pg_ctl, psql = _binary("initdb"), _binary("pg_ctl"), _binary("psql")
    if initdb is None or pg_ctl is None or psql is None:
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl, psql) are not installed: apt-get install postgresql"
        )
    # not under a private temporary directory: the postgres user must be able to reach it
    root = Path(tempfile.mkdtemp(prefix="sketchtune-pg-"))
    data = root / "data"
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])

    def run(*args: str) -> None:
        done = subprocess.run([*as_postgres, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {done.stderr or done.stdout}")

    started = False
    try:
        run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off -c max_connections=200"
        )
        run(pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start")
        started = True
        run(
            psql,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            "-c",
            f"CREATE DATABASE {database}",
        )
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
    finally:
        if started:
            subprocess.run(
                [*as_postgres, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(root, ignore_errors=True)
