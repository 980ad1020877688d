"""The pipeline's topics (DESIGN.md §2), created idempotently from settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from deploy.settings import Settings, kafka_config
from producers.kafka_logging import logged


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    config: dict[str, str] = field(default_factory=dict)


def replication(settings: Settings, brokers: int) -> int:
    """Replicas per topic: the setting, else min(3, brokers in the cluster)."""
    return settings.topic_replication or max(1, min(3, brokers))


def min_insync_replicas(settings: Settings, replicas: int) -> int:
    """The setting, else 2 for 3+ replicas (writes go on with one broker down, never with one copy only)
    and 1 below that."""
    return settings.topic_min_insync_replicas or (2 if replicas >= 3 else 1)


def topic_specs(settings: Settings, brokers: int = 1) -> list[TopicSpec]:
    """Every topic of DESIGN.md §2 for a cluster of ``brokers`` brokers."""
    parts, repl = settings.topic_partitions, replication(settings, brokers)
    safety = {"min.insync.replicas": str(min_insync_replicas(settings, repl))}
    data = {"cleanup.policy": "delete", **safety}
    # Config topics are compacted: the latest budget / override per key is the state, kept forever.
    compacted = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", **safety}
    return [
        TopicSpec(settings.topic_raw, parts, repl, data),
        TopicSpec(settings.topic_priced, parts, repl, data),
        TopicSpec(settings.topic_dlq, parts, repl, data),
        TopicSpec(settings.topic_alerts_budget, parts, repl, data),
        TopicSpec(settings.topic_alerts_anomaly, parts, repl, data),
        TopicSpec(settings.topic_rollups, parts, repl, data),
        TopicSpec(settings.topic_budgets, 1, repl, compacted),
        TopicSpec(settings.topic_price_overrides, 1, repl, compacted),
        # Stage 2's table (Faust's name for it): created here, not by Faust, whose topic creation at start
        # fails while the broker it takes for the controller is down.
        TopicSpec(changelog_topic(settings), parts, repl, {"cleanup.policy": "compact", **safety}),
    ]


def changelog_topic(settings: Settings) -> str:
    """The changelog of stage 2's ``rollups`` table (Faust names it ``<app id>-<table>-changelog``)."""
    return f"{settings.worker_id}-rollups-changelog"


@dataclass(frozen=True)
class TopicChange:
    topic: str
    action: str  # "created", "partitions raised", "config updated", "unchanged"
    detail: str = ""


def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[TopicChange]:
    admin = AdminClient(kafka_config(settings, **logged()))
    cluster = admin.list_topics(timeout=timeout)
    existing = cluster.topics
    specs = topic_specs(settings, len(cluster.brokers))
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
        _await_metadata(admin, [s.name for s in to_create], timeout)

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


def _await_metadata(admin: AdminClient, names: list[str], timeout: float) -> None:
    """Creation returns once the controller has the topic; the broker a client asks next may not know it
    for a moment (no partitions in its metadata, UNKNOWN_TOPIC_OR_PART). Wait, bounded, until every
    partition has a leader, so whoever runs next (a worker, a test reading the layout) finds it usable."""
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            topic = admin.list_topics(name, timeout=max(0.1, deadline - time.monotonic())).topics.get(name)
            if topic is None or topic.error is not None or not topic.partitions:
                continue
            if all(p.leader >= 0 for p in topic.partitions.values()):
                pending.discard(name)
        if pending:
            time.sleep(0.1)


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
    missing = [spec.name for spec in topic_specs(settings) if spec.name not in existing]  # names only
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


def cluster_replication(settings: Settings, timeout: float = 30.0) -> int:
    """The replication the pipeline's topics get on the cluster ``settings`` name (Faust's changelog
    topics get the same)."""
    admin = AdminClient(kafka_config(settings, **logged()))
    return replication(settings, len(admin.list_topics(timeout=timeout).brokers))
