"""How every client reaches Kafka and Redis: one place that turns ``Settings`` into client options.

Each Kafka client the project builds (stage 1's consumer and idempotent producer, the producer
library, the CLI, ``lag``, ``topics``, the config followers) starts from :func:`kafka_config`; Faust's
aiokafka clients get the same security from ``streams.app.faust_credentials``. Postgres needs nothing here: its
URL carries the password and ``sslmode``. Redis's URL carries an ACL user and password, and
``rediss://`` turns on TLS; :func:`redis_client` adds Redis Cluster.
"""

from __future__ import annotations

from typing import Any

import redis

from deploy.settings import Settings


def kafka_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """librdkafka properties for ``settings``' cluster: bootstrap, security, then the pass-through
    properties, then ``overrides`` (the caller's own, e.g. ``group.id``)."""
    config: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap}
    protocol = settings.kafka_security_protocol
    if protocol != "PLAINTEXT":
        config["security.protocol"] = protocol
    if protocol.startswith("SASL_"):
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    tls_files = {
        "ssl.ca.location": settings.kafka_ssl_ca_location,
        "ssl.certificate.location": settings.kafka_ssl_certificate_location,
        "ssl.key.location": settings.kafka_ssl_key_location,
    }
    config.update({name: str(path) for name, path in tls_files.items() if path is not None})
    if settings.kafka_ssl_key_password.get_secret_value():
        config["ssl.key.password"] = settings.kafka_ssl_key_password.get_secret_value()
    config.update(settings.kafka_client_properties)
    config.update(overrides)
    return config


def faust_brokers(settings: Settings) -> list[str]:
    """Faust's broker URLs: one ``kafka://host:port`` per bootstrap server."""
    return [f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",") if server.strip()]


def redis_client(settings: Settings, socket_timeout: float = 5.0, **options: Any) -> redis.Redis:
    """A Redis client for ``settings.redis_url`` (a Redis Cluster client when ``redis_cluster``)."""
    if settings.redis_cluster:
        cluster: Any = redis.RedisCluster.from_url(settings.redis_url, socket_timeout=socket_timeout, **options)
        return cluster  # same command surface for what the project uses; typed as Redis for the callers
    return redis.Redis.from_url(settings.redis_url, socket_timeout=socket_timeout, **options)
