"""flows.tracking's MLflow database template: a home seeded from it is, once MLflow has opened it, the
store a new home gets from MLflow itself (same tables, rows, schema revision, Default experiment with
the home's own artifact location, experiment ids), and nothing is ever copied over a store."""

from __future__ import annotations

import sqlite3

import mlflow
import pytest

from flows.tracking import build_mlflow_template, seed_mlflow_database


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return build_mlflow_template(tmp_path_factory.mktemp("template") / "mlflow.db")


def _rows(db) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {n: con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in sorted(names)}
    finally:
        con.close()


def _open(db):
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    client.search_registered_models(max_results=1)
    return client


def test_template_has_the_schema_and_no_experiment(template):
    rows = _rows(template)
    assert rows["experiments"] == 0 and rows["alembic_version"] == 1 and rows["runs"] == 0


def test_a_seeded_home_opens_as_a_new_one(template, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    fresh, seeded = tmp_path / "fresh" / "mlflow.db", tmp_path / "seeded" / "mlflow.db"
    fresh.parent.mkdir()
    assert seed_mlflow_database(f"sqlite:///{seeded}", template) is True
    clients = {"fresh": _open(fresh), "seeded": _open(seeded)}
    defaults = {k: c.get_experiment("0") for k, c in clients.items()}
    assert defaults["seeded"].name == defaults["fresh"].name == "Default"
    assert defaults["seeded"].artifact_location == defaults["fresh"].artifact_location
    ids = {
        k: c.create_experiment("csmf", artifact_location=(tmp_path / k).as_uri()) for k, c in clients.items()
    }
    assert ids["seeded"] == ids["fresh"] == "1"
    assert _rows(seeded) == _rows(fresh)
    con = [sqlite3.connect(p) for p in (fresh, seeded)]
    try:
        versions = [c.execute("SELECT version_num FROM alembic_version").fetchall() for c in con]
    finally:
        for c in con:
            c.close()
    assert versions[0] == versions[1]


def test_never_over_a_store_and_only_for_sqlite(template, tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"someone's store")
    assert seed_mlflow_database(f"sqlite:///{db}", template) is False
    assert db.read_bytes() == b"someone's store"
    wal = tmp_path / "b" / "mlflow.db"
    wal.parent.mkdir()
    (wal.parent / "mlflow.db-wal").write_bytes(b"x")  # a store mid-creation: left alone
    assert seed_mlflow_database(f"sqlite:///{wal}", template) is False and not wal.exists()
    assert seed_mlflow_database("postgresql://u@h/db", template) is False
    assert seed_mlflow_database("http://127.0.0.1:5000", template) is False
    assert seed_mlflow_database(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "missing.db") is False
