"""Client options built from settings (deploy/settings.py): every Kafka client gets the same security,
Faust's aiokafka clients the equivalent credentials."""

from __future__ import annotations

import ssl
from pathlib import Path

import faust
import pytest
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import Producer

from deploy.settings import Settings, faust_brokers, kafka_config
from streams.app import faust_credentials, tenant_partition


def test_plaintext_is_just_the_bootstrap_servers() -> None:
    settings = Settings(kafka_bootstrap="a:1,b:2")
    assert kafka_config(settings) == {"bootstrap.servers": "a:1,b:2"}
    assert faust_credentials(settings) is None
    assert faust_brokers(settings) == ["kafka://a:1", "kafka://b:2"]


def test_sasl_scram_and_tls_files_are_mapped_then_passthrough_then_overrides(tmp_path: Path) -> None:
    settings = Settings(
        kafka_bootstrap="k:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="svc",
        kafka_sasl_password="s3cret",
        kafka_ssl_ca_location=tmp_path / "ca.pem",
        kafka_client_properties={"ssl.endpoint.identification.algorithm": "none", "client.id": "x"},
    )
    config = kafka_config(settings, **{"client.id": "mine", "group.id": "g"})
    assert config == {
        "bootstrap.servers": "k:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "svc",
        "sasl.password": "s3cret",
        "ssl.ca.location": str(tmp_path / "ca.pem"),
        "ssl.endpoint.identification.algorithm": "none",
        "client.id": "mine",
        "group.id": "g",
    }
    assert "s3cret" not in repr(settings)  # a logged settings object does not leak the password


def test_faust_gets_the_same_sasl_credentials() -> None:
    settings = Settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="worker",
        kafka_sasl_password="pw",
    )
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("worker", "pw")
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert credentials.protocol.value == "SASL_PLAINTEXT"


def test_faust_over_tls_verifies_the_broker_unless_told_not_to() -> None:
    settings = Settings(kafka_security_protocol="SSL")
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.context.verify_mode == ssl.CERT_REQUIRED
    assert credentials.context.check_hostname


def test_a_bad_security_protocol_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="kafka_security_protocol"):
        Settings(kafka_security_protocol="SASL")  # type: ignore[arg-type]


@pytest.mark.parametrize("partitions", [1, 4, 12])
def test_tenant_partition_is_kafkas_default_partitioner(partitions: int) -> None:
    """Stage 2's table puts a tenant's windows where Kafka's default partitioner (aiokafka's here; the
    integration test below checks librdkafka's) sends the tenant's rollup messages."""
    all_partitions = list(range(partitions))
    for tenant in ["acme", "", "ü-tenant", "x" * 300, *(f"t{i}" for i in range(200))]:
        expected = DefaultPartitioner()(tenant.encode(), all_partitions, all_partitions)
        assert tenant_partition(tenant, partitions) == expected


def test_tenant_partition_matches_stage_ones_producer(stack: object, settings: Settings, unique: str) -> None:
    """The partitions librdkafka chose for real messages keyed by tenant (stage 1's producer settings)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"partitioner-{unique}"  # metering.rollups' partition count, without feeding a worker junk
    admin = AdminClient(kafka_config(settings))
    admin.create_topics([NewTopic(topic, settings.topic_partitions, 1)])[topic].result(30)
    chosen: dict[str, int] = {}
    producer = Producer(kafka_config(settings, partitioner="murmur2_random"))
    tenants = [f"tenant-{unique}-{i}" for i in range(100)]

    def delivered(err: object, msg: object) -> None:
        assert err is None
        chosen[msg.key().decode()] = msg.partition()  # type: ignore[attr-defined]

    for tenant in tenants:
        producer.produce(topic, key=tenant.encode(), value=b"{}", on_delivery=delivered)
    assert producer.flush(30) == 0
    assert len(set(chosen.values())) > 1  # the test means something only if tenants spread
    assert chosen == {t: tenant_partition(t, settings.topic_partitions) for t in tenants}
