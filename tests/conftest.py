"""Suite-wide settings and the real-MNIST fixture shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.registry_stores import store  # noqa: F401 - fixture: every registry engine
from tests.s3_harness import moto_endpoint, s3  # noqa: F401 - fixtures: moto's real S3 server

# The suite runs tiny models on a shared 2-core machine: a second intra-op thread only spins.
torch.set_num_threads(1)

E2E_MODEL = "mnist-cnn"


@pytest.fixture(scope="session")
def mnist_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding a real MNIST classifier (one epoch: ~98% test accuracy, ~15 s on this CPU)."""
    from daemon.cli import main

    reg = tmp_path_factory.mktemp("registry")
    rc = main(["pretrain", "--dataset", "mnist", "--registry", str(reg), "--model", E2E_MODEL, "--epochs", "1"])
    assert rc == 0
    return reg


@pytest.fixture()
def broker():
    """A real Kafka-protocol broker (Tansu, in memory) on a free port of 127.0.0.1, for one test."""
    from tests.pipeline_harness import Broker

    b = Broker().start()
    yield b
    b.stop()


# -- the ledger's two engines (issue 24) -------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/pg_harness.py: initdb into a temp dir, a free port)."""
    from tests.pg_harness import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


class LedgerDatabases:
    """Ledger targets of one engine for one test: ``target(name)`` is a SQLite path or a PostgreSQL URL (an empty
    database made on first use), the same for the same name; ``raw(name)`` a DB-API connection to it that goes
    around the ledger (to tamper with it as someone with database access could)."""

    def __init__(self, engine: str, tmp_path: Path, server=None) -> None:
        self.engine, self._tmp, self._server = engine, tmp_path, server
        self._targets: dict[str, str] = {}

    def target(self, name: str = "l") -> str:
        if name not in self._targets:
            self._targets[name] = (str(self._tmp / f"{name}.sqlite") if self.engine == "sqlite"
                                   else self._server.new_database())
        return self._targets[name]

    def raw(self, name: str = "l"):  # noqa: ANN201 - sqlite3.Connection | psycopg.Connection
        if self.engine == "sqlite":
            import sqlite3
            return sqlite3.connect(self.target(name))
        import psycopg
        return psycopg.connect(self.target(name))

    def daemon_env(self) -> dict[str, str]:
        """The environment that puts a daemon's ledger on this engine: nothing for SQLite (state.dir), else
        ``UNLEARND_STATE_URL`` of this test's database "daemon"."""
        return {} if self.engine == "sqlite" else {"UNLEARND_STATE_URL": self.target("daemon")}

    def daemon_target(self, state_dir: Path) -> str:
        """Where that daemon's ledger is, to open it after the daemon stopped."""
        return str(state_dir / "ledger.sqlite") if self.engine == "sqlite" else self.target("daemon")

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What the database raises when it refuses a statement."""
        import sqlite3
        if self.engine == "sqlite":
            return (sqlite3.DatabaseError,)
        import psycopg
        return (psycopg.Error,)

    def close(self) -> None:
        if self._server is not None:
            for url in self._targets.values():
                self._server.drop_database(url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_db(request: pytest.FixtureRequest, tmp_path: Path):
    """The one parametrised fixture the ledger's tests run through: each test runs on SQLite and PostgreSQL."""
    server = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    dbs = LedgerDatabases(request.param, tmp_path, server)
    yield dbs
    dbs.close()
