"""A private PostgreSQL cluster on a free loopback port, for tests that stop and start PostgreSQL.

initdb refuses to run as root, so as root the cluster belongs to (and runs as) the ``postgres``
OS user. A cluster that cannot start fails the test: it never skips.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

import psycopg2
import pytest
from servers import free_port


def _binary(name: str) -> str:
    candidates = [f"/usr/local/bin/{name}", *sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)]
    found = shutil.which(name) or next((c for c in candidates if os.access(c, os.X_OK)), None)
    if found is None:
        pytest.fail(f"{name} is not installed: a private PostgreSQL cluster needs the PostgreSQL server binaries")
    return found


class PostgresServer:
    """``initdb`` into a temporary directory (trust auth), listening on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.dir = tempfile.mkdtemp(prefix="wsgisession-pg-")
        self.data = os.path.join(self.dir, "data")
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(_binary("initdb"), "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def _run(self, *command: str) -> None:
        prefix = ("runuser", "-u", "postgres", "--") if self._as_postgres else ()
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=60, cwd=self.dir)
        if done.returncode != 0:
            pytest.fail(f"{command[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(_binary("pg_ctl"), "-D", self.data, "-l", os.path.join(self.dir, "log"), "-o", options,
                  "-w", "-t", "30", "start")  # fmt: skip
        try:
            psycopg2.connect(self.url, connect_timeout=5).close()
        except psycopg2.Error as exc:
            pytest.fail(f"private PostgreSQL on port {self.port} does not answer: {exc}")

    def stop(self) -> None:
        """Fast shutdown: every connection is ended, as when the server goes away."""
        self._run(_binary("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "-t", "30", "stop")

    def close(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
