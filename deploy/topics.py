"""The pipeline's topics (DESIGN.md §2), created idempotently from settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from deploy.connections import kafka_config
from deploy.settings import Settings
from producers.kafka_logging import logged


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    parts, repl = settings.topic_partitions, settings.topic_replication
    data = {"cleanup.policy": "delete"}
    # Config topics are compacted: the latest budget / override per key is the state, kept forever.
    compacted = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
    return [
        TopicSpec(settings.topic_raw, parts, repl, data),
        TopicSpec(settings.topic_priced, parts, repl, data),
        TopicSpec(settings.topic_dlq, parts, repl, data),
        TopicSpec(settings.topic_alerts_budget, parts, repl, data),
        TopicSpec(settings.topic_alerts_anomaly, parts, repl, data),
        TopicSpec(settings.topic_rollups, parts, repl, data),
        TopicSpec(settings.topic_budgets, 1, repl, compacted),
        TopicSpec(settings.topic_price_overrides, 1, repl, compacted),
    ]


@dataclass(frozen=True)
class TopicChange:
    topic: str
    action: str  # "created", "partitions raised", "config updated", "unchanged"
    detail: str = ""


def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[TopicChange]:
    admin = AdminClient(kafka_config(settings, **logged()))
    existing = admin.list_topics(timeout=timeout).topics
    specs = topic_specs(settings)
    changes: list[TopicChange] = []

    to_create = [s for s in specs if s.name not in existing]
    if to_create:
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, s.replication, config=s.config) for s in to_create],
            request_timeout=timeout,
        )
        for spec in to_create:
            try:
                futures[spec.name].result()
                changes.append(TopicChange(spec.name, "created", f"{spec.partitions} partitions"))
            except Exception as exc:  # another process may have created it meanwhile
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
                changes.append(TopicChange(spec.name, "unchanged", "created concurrently"))

    for spec in specs:
        if spec.name not in existing:
            continue
        detail = []
        have = len(existing[spec.name].partitions)
        if have < spec.partitions:
            admin.create_partitions([NewPartitions(spec.name, spec.partitions)])[spec.name].result()
            changes.append(TopicChange(spec.name, "partitions raised", f"{have} -> {spec.partitions}"))
            detail.append("partitions")
        resource = ConfigResource(ConfigResource.Type.TOPIC, spec.name)
        current = admin.describe_configs([resource])[resource].result()
        stale = {k: v for k, v in spec.config.items() if k not in current or current[k].value != v}
        if stale:
            update = ConfigResource(
                ConfigResource.Type.TOPIC,
                spec.name,
                incremental_configs=[
                    ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in stale.items()
                ],
            )
            admin.incremental_alter_configs([update])[update].result()
            changes.append(TopicChange(spec.name, "config updated", ", ".join(f"{k}={v}" for k, v in stale.items())))
            detail.append("config")
        if not detail:
            changes.append(TopicChange(spec.name, "unchanged", f"{have} partitions"))
    return changes


class TopicsMissing(RuntimeError):
    """Topics the worker needs are absent and it may not (or could not) create them."""


def verify_topics(settings: Settings, create: bool, timeout: float = 30.0) -> list[TopicChange]:
    """Before a worker starts: every topic it reads or writes must exist. Missing ones are created
    when ``create`` (the default setting); otherwise, or if creating fails, ``TopicsMissing`` names them."""
    admin = AdminClient(kafka_config(settings, **logged()))
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except Exception as exc:
        raise TopicsMissing(f"cannot reach Kafka at {settings.kafka_bootstrap} to check the topics: {exc}") from None
    missing = [spec.name for spec in topic_specs(settings) if spec.name not in existing]
    if not missing:
        return []
    if not create:
        raise TopicsMissing(
            f"topic {missing[0]!r} does not exist{f' (and {len(missing) - 1} more)' if missing[1:] else ''}"
            "; run `tokenmeter topics ensure` or set TOKENMETER_WORKER_CREATE_TOPICS=true"
        )
    try:
        return [change for change in ensure_topics(settings, timeout) if change.action != "unchanged"]
    except Exception as exc:
        raise TopicsMissing(f"topic {missing[0]!r} does not exist and could not be created: {exc}") from None
