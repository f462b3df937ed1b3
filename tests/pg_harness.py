"""A real PostgreSQL server for the tests: Debian's ``postgresql`` (initdb into a temp dir, a free port of
127.0.0.1, its unix socket in that dir), one database per test, torn down at the end of the session.

Running as root (as these machines do), initdb and postgres refuse to start; the server then runs as the
``postgres`` user that Debian's package creates (``subprocess.Popen(user=...)``, no runuser/su in between, so
the PID we hold is the server's), in a temp dir under /tmp chowned to it (pytest's own tmp dirs are 0700 root).
As any other user, it runs as that user. ``fsync=off``: the server's own durability is not what the tests test
(a daemon is killed, never the machine); ``durable=True`` keeps PostgreSQL's defaults (for measurements).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.pipeline_harness import free_port, stop_process

def _pg_bin() -> Path:
    """UNLEARND_TEST_PG_BIN, else the newest Debian server (/usr/lib/postgresql/<major>/bin)."""
    if os.environ.get("UNLEARND_TEST_PG_BIN"):
        return Path(os.environ["UNLEARND_TEST_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if
                   p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
SUPERUSER = "unlearnd"


def postgres_available() -> bool:
    return (PG_BIN / "initdb").is_file() and (PG_BIN / "postgres").is_file()


class PostgresServer:
    """One throwaway server; :meth:`new_database` makes an empty database and returns its URL."""

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable                  # True: PostgreSQL's default fsync and commit settings (benchmarks)
        self.port = free_port()
        self.root: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._names = itertools.count(1)
        self._user: str | None = "postgres" if os.geteuid() == 0 else None

    @property
    def admin_url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        if not postgres_available():
            raise RuntimeError(f"no PostgreSQL server under {PG_BIN} (make test-deps installs Debian's postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="unlearnd-pg-"))
        if self._user is not None:
            pw = pwd.getpwnam(self._user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        data, log = self.root / "data", self.root / "initdb.log"
        with open(log, "wb") as out:
            rc = subprocess.run([str(PG_BIN / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E",
                                 "UTF8", "--no-sync", "--no-instructions"], stdout=out, stderr=subprocess.STDOUT,
                                user=self._user, cwd=self.root).returncode
        if rc != 0:
            raise RuntimeError(f"initdb failed ({rc}): {log.read_text()[-2000:]}")
        self._launch()
        return self

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server (fast shutdown: every client connection is cut) and start it again on the same data
        and port after ``down_s`` seconds: what a managed database's restart or failover looks like to a client."""
        self._shutdown()
        time.sleep(down_s)
        self._launch()

    def _shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)    # fast shutdown: open connections are closed, not waited for
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, timeout=1)
        self.proc = None

    def _launch(self) -> None:
        assert self.root is not None
        data = self.root / "data"
        self.proc = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.root),
             *([] if self.durable else ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c",
                                        "full_page_writes=off"]),
             "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "server.log", "ab"), user=self._user, cwd=self.root)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}): "
                                   f"{(self.root / 'server.log').read_text()[-2000:]}")
            try:
                psycopg.connect(self.admin_url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def new_database(self, prefix: str = "ledger") -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as db:
            db.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def stop(self) -> None:
        self._shutdown()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
