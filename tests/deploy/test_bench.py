"""``tokenmeter bench`` (deploy/bench/) and the one synthetic workload the bench, the demo and the tests
share: seeded events that the library, the Avro codec and the JSON path all accept."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from deploy.bench.workload import (
    FEATURES,
    MODELS,
    UNPRICED,
    EncodedCalls,
    Model,
    Tenant,
    Workload,
    as_tenants,
    to_json,
    usage_events,
)
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas import codec
from schemas.events import decode_usage, parse_json_event, validate_event

START = datetime(2025, 6, 30, 20, tzinfo=UTC)


def test_the_same_seed_gives_the_same_events_and_another_seed_others() -> None:
    first = usage_events(500, seed=3, start=START, duplicates=0.1)
    assert first == usage_events(500, seed=3, start=START, duplicates=0.1)
    assert first != usage_events(500, seed=4, start=START, duplicates=0.1)
    assert next(Workload().calls(seed=9)) == next(Workload().calls(seed=9)) != next(Workload().calls(seed=8))


def test_events_are_valid_for_the_library_the_avro_codec_and_the_json_path() -> None:
    events = usage_events(300, seed=5, start=START, models=(*MODELS, UNPRICED))
    for data in events:
        event = validate_event(data)
        assert decode_usage(codec.encode("usage_event", data)) == event
        assert parse_json_event(to_json(data)) == event
        assert 0 <= data["cache_read_tokens"] <= data["input_tokens"] // 2
        assert 1 <= data["output_tokens"] <= 1024
    live = [next(Workload().calls(seed=n)) for n in range(50)]
    assert all("event_id" not in c and "timestamp" not in c for c in live)  # the library fills them in
    assert all(validate_event({**c, "event_id": "x", "timestamp": START}) for c in live)


def test_ids_times_and_retries() -> None:
    span = timedelta(hours=8)
    events = usage_events(1_000, seed=1, start=START, span=span, duplicates=0.1, prefix="run7")
    ids = [e["event_id"] for e in events]
    assert sorted(set(ids), key=lambda i: int(i.rsplit("-", 1)[1])) == [f"run7-{n}" for n in range(1_000)]
    retries = len(ids) - len(set(ids))
    assert 60 < retries < 140  # about 10 %
    for before, after in pairwise(events):
        assert before["timestamp"] <= after["timestamp"]  # in time order, a retry right after its event
        if after["event_id"] == before["event_id"]:
            assert after == before and after is not before
    assert events[0]["timestamp"] == START and events[-1]["timestamp"] < START + span
    assert events[-1]["timestamp"] > START + span * 0.99  # spread over the span
    unseeded = usage_events(100, seed=1)  # ids from the seed, times one millisecond apart from now
    assert len({e["event_id"] for e in unseeded}) == 100 and all(len(e["event_id"]) == 32 for e in unseeded)
    assert unseeded[-1]["timestamp"] - unseeded[0]["timestamp"] == timedelta(milliseconds=99)
    assert abs(unseeded[0]["timestamp"] - datetime.now(UTC)) < timedelta(minutes=1)


def test_encoded_calls_are_the_codecs_bytes_with_fresh_ids_and_the_given_time() -> None:
    """The bench's cheap load generator splices ids and times into encoded calls: the same bytes as
    encoding each event whole, every id new."""
    traffic = EncodedCalls(distinct=40, seed=9)
    calls = Workload().calls(seed=9)
    expected_calls = [next(calls) for _ in range(40)]
    ids = set()
    for n, now in enumerate(
        datetime(2026, 11, 26, 12, tzinfo=UTC) + timedelta(microseconds=7_777 * k) for k in range(120)
    ):
        key, value = traffic.message(n, now)
        event = decode_usage(value)
        ids.add(event.event_id)
        whole = {**expected_calls[n % 40], "event_id": event.event_id, "timestamp": now}
        assert value == codec.encode("usage_event", whole)
        assert key == whole["tenant_id"].encode() and event.timestamp == now
    assert len(ids) == 120


def test_make_up_tenants_users_features_models() -> None:
    events = usage_events(20_000, seed=2, start=START)
    tenants = Counter(e["tenant_id"] for e in events)
    assert set(tenants) <= {f"tenant-{k}" for k in range(1, 21)} and len(tenants) >= 15
    assert tenants["tenant-1"] > 0.45 * len(events) > tenants["tenant-2"]  # a few big tenants
    assert {e["feature"] for e in events} == set(FEATURES)
    models = Counter(e["model"] for e in events)
    assert set(models) == {m.model for m in MODELS}
    assert models["gpt-4o"] > 4 * models["o3"]  # by weight: 30 against 5
    users = {e["user_id"] for e in events if e["tenant_id"] == "tenant-1"}
    assert all(u.startswith("tenant-1-user-") and 1 <= int(u.rsplit("-", 1)[1]) <= 300 for u in users)
    assert 0.8 < sum(e["environment"] == "prod" for e in events) / len(events) < 0.9
    named = usage_events(3_000, seed=2, start=START, tenants=["a", "b"], users_per_tenant=4, features=["x"])
    assert Counter(e["tenant_id"] for e in named).keys() == {"a", "b"}
    assert {e["user_id"] for e in named} <= {f"{t}-user-{n}" for t in "ab" for n in range(1, 5)}
    assert {e["feature"] for e in named} == {"x"}
    assert [t.name for t in as_tenants(3)] == ["tenant-1", "tenant-2", "tenant-3"]


def test_tenants_own_models_and_a_daily_shape() -> None:
    make_up = Workload(
        tenants=(Tenant("big", 3, (Model("openai", "o3"),)), Tenant("small", 1)), models=(Model("google", "x"),)
    )
    office = [0.0] * 24
    office[9], office[14] = 1.0, 3.0
    midnight = datetime(2025, 3, 3, tzinfo=UTC)
    events = make_up.events(4_000, seed=1, start=midnight, span=timedelta(days=2), daily_shape=office, prefix="d")
    assert {(e["tenant_id"], e["model"]) for e in events} == {("big", "o3"), ("small", "x")}
    assert 0.7 < sum(e["tenant_id"] == "big" for e in events) / len(events) < 0.8
    assert [e["event_id"] for e in events] == [f"d-{n}" for n in range(4_000)]
    assert events == sorted(events, key=lambda e: e["timestamp"])
    hours = Counter((e["timestamp"].date(), e["timestamp"].hour) for e in events)
    assert set(hours) == {
        (day, hour) for day in (midnight.date(), midnight.date() + timedelta(days=1)) for hour in (9, 14)
    }
    assert (
        2.5 < sum(n for (_, h), n in hours.items() if h == 14) / sum(n for (_, h), n in hours.items() if h == 9) < 3.5
    )


PIPELINE_KEYS = {
    "events",
    "pipeline_events_per_s",
    "bare_consume_events_per_s",
    "naive_postgres_events_per_s",
    "naive_durable_postgres_events_per_s",
    "p50_event_to_quota_ms",
    "p99_event_to_quota_ms",
    "quota_probes",
    "quota_check_p50_us",
    "quota_check_p99_us",
    "p50_budget_alert_ms",
    "p99_budget_alert_ms",
    "stage_two_behind_s",
    "cpu_us_per_event",
    "quota_background_events_per_s",
    "record_p50_us",
    "record_p99_us",
    "record_p99_us_idle_caller",
    "record_latency",
    "pipeline_vs_naive_postgres",
    "pipeline_vs_naive_durable_postgres",
    "pipeline_vs_bare_consume",
}
REPORT_KEYS = {
    "ledger_rows",
    "fill_s",
    "rollups_s",
    "summaries_s",
    "report_all_tenants_ms",
    "report_one_tenant_ms",
    "invoice_ms",
}


@pytest.mark.integration
def test_a_small_bench_run_prints_its_figures_and_leaves_no_faust_folder(
    stack: LocalStack, settings: Settings, tmp_path: Path
) -> None:
    command = ["bench", "--events", "3000", "--record-calls", "300", "--report-rows", "5000", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "deploy", *command], capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    assert set(figures) == PIPELINE_KEYS | {"report_bench"}, figures
    assert set(figures["record_latency"]) == {"back-to-back", "busy 5000/s", "busy 1000/s", "idle 5000/s"}
    assert set(figures["report_bench"]) == REPORT_KEYS and figures["report_bench"]["ledger_rows"] == 5000
    assert figures["events"] >= 3000  # the workload, its producer retries included
    rates = ("pipeline_events_per_s", "bare_consume_events_per_s", "naive_postgres_events_per_s")
    for key in (*rates, "naive_durable_postgres_events_per_s"):
        assert figures[key] > 0, key
        assert f"{key:>28}: " in done.stderr
    assert figures["pipeline_vs_naive_postgres"] == round(
        figures["pipeline_events_per_s"] / figures["naive_postgres_events_per_s"], 2
    )
    assert figures["pipeline_vs_naive_durable_postgres"] == round(
        figures["pipeline_events_per_s"] / figures["naive_durable_postgres_events_per_s"], 2
    )
    assert figures["quota_probes"] == 100 and 0 < figures["p99_event_to_quota_ms"] < 30_000
    assert "events (1% producer retries)" in done.stderr
    # Every component of this stack was found and used CPU (the stages, the stores, the broker).
    cpu = figures["cpu_us_per_event"]
    assert {"stage1_meter", "stage2_faust", "postgres", "kafka", "redis", "bench_client"} <= set(cpu), cpu
    assert all(cpu[name] > 0 for name in ("stage1_meter", "stage2_faust", "postgres", "kafka")), cpu
    # The bench's worker kept its Faust data under the stack's state folder, not in the current folder.
    assert list(tmp_path.iterdir()) == []
    assert any(path.name.startswith("wbench") for path in (settings.home / "faust").iterdir())
    # Nor its topics on the broker (each run left ~20 behind, and later runs slowed down with them).
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    deadline = time.monotonic() + 15
    while (left := [t for t in admin.list_topics(timeout=10).topics if t.startswith(("tbench", "wbench"))]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert left == []
