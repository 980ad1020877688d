"""Stage 2 writes its day windows to the table (the anomaly rules' history) every
``worker_table_write_interval_s``, not per batch; a worker that stops writes what it holds first."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from deploy.isolation import WorkerProcess, drop_isolated, isolated
from deploy.settings import Settings
from deploy.stack import LocalStack
from deploy.topics import changelog_topic
from producers.producer import UsageProducer
from streams.app import window_key
from streams.lag import wait_for_sinks
from tests.helpers import read_keyed


def day_windows(own: Settings, tenant: str) -> dict[str, int]:
    """The tenant's own day windows (dimension ``tenant``, value empty) in the table's changelog: key → calls."""
    found: dict[str, int] = {}
    for key, value in read_keyed(own, changelog_topic(own), timeout=15):
        text = (key or b"").decode()
        text = json.loads(text) if text.startswith('"') else text
        if text.startswith(f"{tenant}\x1fday\x1f") and text.endswith("\x1ftenant\x1f") and value:
            found[text] = int(json.loads(value)["calls"])
    return found


def test_a_stopping_worker_writes_the_day_windows_it_holds(
    stack: LocalStack, settings: Settings, tmp_path: Path
) -> None:
    # The timer would write them only after 5 minutes: what reaches the changelog comes from the stop.
    own = isolated(settings, uuid.uuid4().hex[:10], worker_table_write_interval_s=300.0)
    tenant = f"stop-{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC).replace(microsecond=0)
    yesterday = datetime(now.year, now.month, now.day, 12, tzinfo=UTC) - timedelta(days=1)
    calls = [(yesterday + timedelta(minutes=i), "y") for i in range(7)] + [(now, "t") for _ in range(4)]
    worker = WorkerProcess(own, tmp_path)
    worker.start()
    try:
        with UsageProducer(own.model_copy(update={"spool_dir": tmp_path / "spool"})) as producer:
            for moment, _day in calls:
                producer.record(
                    {
                        "event_id": uuid.uuid4().hex,
                        "timestamp": moment,
                        "tenant_id": tenant,
                        "provider": "openai",
                        "model": "gpt-4o",
                        "input_tokens": 100,
                        "output_tokens": 10,
                    }
                )
        assert wait_for_sinks(own, timeout=120), worker.output()
        assert wait_for_sinks(own, 120, topic=own.topic_rollups, group=own.worker_id), worker.output()
        assert day_windows(own, tenant) == {}  # judged, not written yet
        worker.stop()
        assert worker.process is not None and worker.process.returncode == 0, worker.output()
        expected = {
            window_key(tenant, "day", datetime(d.year, d.month, d.day, tzinfo=UTC), "tenant", ""): sum(
                1 for moment, _ in calls if moment.date() == d.date()
            )
            for d in (yesterday, now)
        }
        assert day_windows(own, tenant) == expected
    finally:
        worker.stop()
        drop_isolated(own)
