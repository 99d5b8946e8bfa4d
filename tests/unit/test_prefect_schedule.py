"""The daily deployment's cron schedule really creates flow runs with the pinned stack.

prefect 3.8.8's scheduler inserts scheduled runs with an ORM bulk insert that SQLAlchemy 2.1 refuses
("Can't evaluate bulk DML statement"): the server logs the error every loop and no scheduled run ever
exists, while runs triggered by hand work. pyproject.toml pins sqlalchemy 2.0 for that; this test runs
the scheduler's own insertion (`models.deployments.schedule_runs`, what the scheduler service calls)
on a fresh in-process Prefect database, with the schedule of prefect.yaml's csmf-daily/daily.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _daily_cron() -> str:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    daily = next(d for d in spec["deployments"] if d["name"] == "daily")
    return daily["schedules"][0]["cron"]


SCRIPT = """
import asyncio, json, sys
from prefect.server import models, schemas
from prefect.server.database import provide_database_interface

async def main(cron):
    db = provide_database_interface()
    await db.create_db()
    async with db.session_context(begin_transaction=True) as s:
        flow = await models.flows.create_flow(session=s, flow=schemas.core.Flow(name="csmf-daily"))
        dep = await models.deployments.create_deployment(
            session=s, deployment=schemas.core.Deployment(name="daily", flow_id=flow.id))
        await models.deployments.create_deployment_schedules(session=s, deployment_id=dep.id, schedules=[
            schemas.actions.DeploymentScheduleCreate(
                schedule=schemas.schedules.CronSchedule(cron=cron, timezone="UTC"), active=True)])
    async with db.session_context(begin_transaction=True) as s:
        ids = await models.deployments.schedule_runs(session=s, deployment_id=dep.id)
    async with db.session_context() as s:
        runs = await models.flow_runs.read_flow_runs(session=s)
    return {"scheduled": len(ids), "runs": [r.expected_start_time.isoformat() for r in runs]}

print("RESULT " + json.dumps(asyncio.run(main(sys.argv[1]))))
"""


def test_scheduler_inserts_runs_for_the_daily_cron(tmp_path):
    """A fresh process (Prefect reads its database setting at import) with its own SQLite database."""
    import datetime as dt
    import json
    import os
    import subprocess
    import sys

    cron = _daily_cron()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"
    env.pop("PREFECT_API_URL", None)
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, cron], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    assert out["scheduled"] >= 1 and len(out["runs"]) == out["scheduled"], out
    hours = {dt.datetime.fromisoformat(r).astimezone(dt.UTC).hour for r in out["runs"]}
    assert hours == {int(cron.split()[1])}, (cron, hours)  # every run at the cron's hour, UTC
