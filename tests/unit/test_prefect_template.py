"""flows.local_api.seed_database: a migrated template is copied only into a PREFECT_HOME that has no
database, and only when that database is the default SQLite file (default_database)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flows.local_api as la

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch):
    db = tmp_path / "prefect" / "prefect.db"
    monkeypatch.setattr(la, "default_database", lambda: db)
    template = tmp_path / "template.db"
    template.write_bytes(b"migrated schema " * 1000)
    return db, template


def test_copies_into_a_new_home(home):
    db, template = home
    assert la.seed_database(template) is True
    assert db.read_bytes() == template.read_bytes()


@pytest.mark.parametrize("existing", ["", "-wal", "-shm", "-journal"])
def test_never_touches_an_existing_database(home, existing):
    db, template = home
    db.parent.mkdir(parents=True)
    Path(f"{db}{existing}").write_bytes(b"the user's runs")
    assert la.seed_database(template) is False
    assert Path(f"{db}{existing}").read_bytes() == b"the user's runs"
    if existing:
        assert not db.exists()


def test_no_template_no_copy(home, tmp_path):
    db, _ = home
    assert la.seed_database(tmp_path / "missing.db") is False
    assert not db.exists()


def test_other_database_no_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(la, "default_database", lambda: None)  # e.g. PostgreSQL
    template = tmp_path / "template.db"
    template.write_bytes(b"x")
    assert la.seed_database(template) is False


def _default_database(tmp_path: Path, **extra: str) -> str | None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "ph"), "PYTHONPATH": str(REPO), **extra}
    code = "import json; from flows.local_api import default_database as d; r = d(); print(json.dumps(r and str(r)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_database_follows_prefect_settings(tmp_path):
    assert _default_database(tmp_path) == str(tmp_path / "ph" / "prefect.db")
    pg = "postgresql+asyncpg://u:p@localhost:5432/prefect"
    assert _default_database(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=pg) is None
    other = f"sqlite+aiosqlite:///{tmp_path / 'elsewhere.db'}"
    assert _default_database(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=other) is None
