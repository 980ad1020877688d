"""The pipeline's pure stages, without a broker."""

from __future__ import annotations

import dataclasses
import decimal
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import codec
from schemas.events import validate_event
from schemas.records import PricedEvent, PriceResult, Rollup, money
from streams import meter
from streams.app import UnwrittenWindows, expired, table_key, table_value, unpriced_model_alerts
from streams.meter import priced_message
from streams.pipeline import Deduplicator, RawMessage, RecentIds, dead_letter_record, decode_batch, price_batch
from streams.pricing import PriceBook


def usage(**overrides: object) -> dict[str, object]:
    return {
        "event_id": "e-1",
        "timestamp": "2025-07-01T10:00:00Z",
        "tenant_id": "acme",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 100,
        "output_tokens": 10,
        **overrides,
    }


def raw(value: bytes | None, offset: int = 0) -> RawMessage:
    return RawMessage("usage.raw", 0, offset, b"k", value)


def test_decode_batch_separates_good_events_from_rejects_with_reasons() -> None:
    good_json = json.dumps(usage()).encode()
    good_avro = validate_event(usage(event_id="e-2")).to_avro()
    messages = [
        raw(good_json, 0),
        raw(good_avro, 1),
        raw(b"not json", 2),
        raw(None, 3),
        raw(b"\x00\xff\xfe", 4),
        raw(json.dumps(usage(input_tokens=-1)).encode(), 5),
        raw(json.dumps(usage(tenant_id="")).encode(), 6),
        raw(json.dumps(usage(tenant_id="x" * 5000)).encode(), 7),
        raw(json.dumps(usage(output_tokens="9")).encode(), 8),
        raw(codec.MAGIC + b"\x01" * 8 + b"junk", 9),
        raw(b"{" + b" " * 70_000 + b"}", 10),
    ]
    events, rejected = decode_batch(messages)
    assert [e.event_id for e in events] == ["e-1", "e-2"]
    reasons = {r.message.offset: r.reason for r in rejected}
    assert set(reasons) == set(range(2, 11))
    assert "neither Avro" in reasons[2] and "null value" in reasons[3] and "neither Avro" in reasons[4]
    assert "input_tokens" in reasons[5] and "tenant_id" in reasons[6] and "tenant_id" in reasons[7]
    assert "output_tokens" in reasons[8] and "fingerprint" in reasons[9] and "exceeds" in reasons[10]
    letter = dead_letter_record(rejected[0], datetime(2025, 1, 1, tzinfo=UTC))
    assert letter["original_value"] == b"not json" and letter["source_offset"] == 2
    assert codec.decode("dead_letter", codec.encode("dead_letter", letter))["reason"] == rejected[0].reason


def test_deduplicator_drops_repeats_in_a_batch_and_after_commit_within_its_horizon() -> None:
    events = [validate_event(usage(event_id=f"e-{i % 3}")) for i in range(5)]
    dedup = Deduplicator(capacity=2)
    fresh = dedup.fresh(events)
    assert [e.event_id for e in fresh] == ["e-0", "e-1", "e-2"]
    assert dedup.fresh(events) == fresh  # nothing is marked before the sinks commit
    dedup.mark_seen(fresh)
    assert len(dedup) == 2  # bounded: the oldest id fell out (Postgres still de-duplicates it)
    assert [e.event_id for e in dedup.fresh(events)] == ["e-0"]


def test_priced_records_round_like_postgres_and_encode() -> None:
    event = validate_event(usage())
    (item,) = price_batch(PriceBook(), [event])
    record = item.to_avro()
    assert record["total_cost"] == Decimal("0.00035")  # 100 x $2.50/M + 10 x $10/M
    assert (
        codec.decode("priced_event", codec.record_writer("priced_event")(record))["total_cost"] == record["total_cost"]
    )
    assert money(Decimal("0.0000000000005")) == Decimal("0.000000000001")  # half away from zero, as numeric
    assert money(Decimal("-0.0000000000005")) == Decimal("-0.000000000001")


def test_a_priced_message_reuses_the_received_avro_body_and_is_byte_for_byte_the_full_encoding() -> None:
    book = PriceBook()
    events = [
        usage(event_id="avro-1"),
        usage(event_id="avro-2", user_id="u", feature="f", tags={"k": "v"}, cache_read_tokens=40, latency_ms=9),
        usage(event_id="avro-3", model="no-such-model"),  # unpriced
    ]
    messages = [raw(validate_event(e).to_avro(), i) for i, e in enumerate(events)]
    messages.append(raw(json.dumps(usage(event_id="json-1")).encode(), 9))  # JSON: nothing to reuse
    bodies: dict[str, bytes] = {}
    decoded, rejected = decode_batch(messages, bodies)
    assert not rejected and sorted(bodies) == ["avro-1", "avro-2", "avro-3"]
    priced = price_batch(book, decoded, bodies)
    for item in priced:
        assert (item.usage_avro is None) == (item.event.event_id == "json-1")
        full = codec.record_writer("priced_event")(item.to_avro())
        assert priced_message(item) == full
        assert codec.decode("priced_event", full)["usage"]["event_id"] == item.event.event_id


_COSTS = st.one_of(
    st.decimals(min_value=Decimal("-1e9"), max_value=Decimal("1e14"), places=14, allow_nan=False),
    st.integers(min_value=0, max_value=10**20).map(lambda n: Decimal(n).scaleb(-13)),  # halves at the 13th place
    st.just(Decimal("0.0000000000005")),
    st.just(Decimal(0)),
)


@given(
    input_cost=_COSTS,
    output_cost=_COSTS,
    status=st.sampled_from(["priced", "unpriced"]),
    source=st.text(max_size=300),
)
def test_the_price_fields_written_by_hand_are_byte_for_byte_the_generic_writers(
    input_cost: Decimal, output_cost: Decimal, status: str, source: str
) -> None:
    assert meter.WRITE_PRICE_FIELDS  # a new priced_event version: update priced_message (else it writes slowly)
    event = validate_event(usage(event_id="hand"))
    item = PricedEvent(
        event,
        PriceResult(status, input_cost, output_cost, source),  # type: ignore[arg-type]
        event.to_avro()[codec.HEADER_LEN :],  # the body as received
    )
    generic = codec.record_writer_after_first("priced_event")(item.usage_avro or b"", item.price_fields())
    assert priced_message(item) == generic
    assert priced_message(item) == priced_message(item)  # the cached source tail too


def test_price_fields_past_38_digits_are_refused_like_the_ledger_refuses_them() -> None:
    out = bytearray()
    codec.write_rounded_decimal(out, Decimal("9" * 26 + ".999999999999"), 12)  # 38 digits: the ledger's widest
    with pytest.raises(decimal.InvalidOperation):
        codec.write_rounded_decimal(out, Decimal("1e26"), 12)


def rollup(
    granularity: str, start: datetime, dimension: str = "model", value: str = "x/y", unpriced: int = 0
) -> Rollup:
    return Rollup(
        "acme", granularity, start, dimension, value, 3, unpriced, 30, 3, 0, 0, Decimal(0), Decimal(0), Decimal("1.5")
    )


def test_rollup_records_round_trip_and_table_windows_expire() -> None:
    r = rollup("minute", datetime(2025, 7, 1, 10, 5, tzinfo=UTC))
    back = Rollup.from_avro(codec.decode("rollup", codec.encode("rollup", r.to_avro())))
    assert (back.tenant_id, back.granularity, back.window_start, back.cost) == (
        "acme",
        "minute",
        r.window_start,
        r.cost,
    )
    day = table_key(rollup("day", datetime(2025, 7, 1, tzinfo=UTC)))  # the table keeps day windows 8 days
    assert not expired(day, datetime(2025, 7, 9, tzinfo=UTC)) and expired(day, datetime(2025, 7, 11, tzinfo=UTC))
    for other in ("minute", "hour", "month"):  # what older versions kept goes at the next expiry round
        assert expired(table_key(rollup(other, datetime(2025, 7, 1, tzinfo=UTC))), datetime(2025, 7, 1, 1, tzinfo=UTC))


def test_unpriced_models_alert_once_per_month_scope() -> None:
    start = datetime(2025, 7, 1, tzinfo=UTC)
    rollups = [
        rollup("month", start, unpriced=2),
        rollup("day", start, unpriced=2),
        rollup("month", start),
        rollup("month", start, "feature", "f", unpriced=2),
    ]
    alerts = unpriced_model_alerts(rollups, start)
    assert [a.alert_id for a in alerts] == ["anomaly.unpriced_model:acme:x/y:2025-07"]
    assert codec.decode("alert", codec.encode("alert", alerts[0].to_avro()))["kind"] == "anomaly.unpriced_model"


def test_a_dead_letter_of_a_huge_message_is_truncated_with_its_length_and_hash() -> None:
    import hashlib

    from streams.pipeline import DEAD_LETTER_MAX_VALUE, decode_one

    huge = b'{"event_id": "' + b"x" * 1_200_000 + b'"}'
    rejected = decode_one(RawMessage("usage.raw", 3, 7, b"k" * 100_000, huge))
    assert not isinstance(rejected, type(None)) and hasattr(rejected, "reason")
    letter = dead_letter_record(rejected)  # type: ignore[arg-type]
    encoded = codec.encode("dead_letter", letter)
    assert len(encoded) < 100_000  # always fits on the topic (brokers refuse ~1 MB)
    back = codec.decode("dead_letter", encoded)
    assert back["truncated"] is True and back["original_size"] == len(huge)
    assert back["original_sha256"] == hashlib.sha256(huge).hexdigest()
    assert back["original_value"] == huge[:DEAD_LETTER_MAX_VALUE] and len(back["original_key"]) == 4096
    small = dead_letter_record(decode_one(raw(b"nope")))  # type: ignore[arg-type]
    assert small["truncated"] is False and small["original_value"] == b"nope" and small["original_size"] == 4


@given(
    capacity=st.integers(min_value=1, max_value=8),
    batches=st.lists(st.lists(st.sampled_from("abcdefghijkl"), max_size=6), max_size=12),
)
def test_recent_ids_hold_the_last_ids_added_up_to_their_capacity(capacity: int, batches: list[list[str]]) -> None:
    recent = RecentIds(capacity)
    order: list[str] = []  # the independent model: ids by their last addition, oldest first
    for batch in batches:
        recent.add_all(batch)
        for id_ in batch:
            order = [x for x in order if x != id_] + [id_]
    kept = set(order[-capacity:])
    assert len(recent) == len(kept)
    assert all(id_ in recent for id_ in kept) and not any(id_ in recent for id_ in set(order) - kept)


def test_unwritten_day_windows_keep_the_newest_value_until_taken() -> None:
    day = datetime(2025, 7, 1, tzinfo=UTC)
    unwritten = UnwrittenWindows()
    first, newer = rollup("day", day, "user", "u1"), dataclasses.replace(rollup("day", day, "user", "u1"), calls=9)
    hour = rollup("hour", day, "user", "u1")
    other = rollup("day", day, "user", "u2")
    unwritten.note({table_key(first): first, table_key(hour): hour, table_key(other): other})
    unwritten.note({table_key(newer): newer})  # a later batch: absolute values, the newest wins
    assert len(unwritten) == 2  # only day windows go to the table
    assert unwritten.value(table_key(first)) == table_value(newer)
    assert unwritten.value(table_key(hour)) is None
    taken = unwritten.take(lambda key: key != table_key(other))  # say u2's partition is not being written
    assert taken == {table_key(newer): newer}
    assert unwritten.value(table_key(newer)) is None  # written: the table answers from now on
    assert unwritten.take(lambda _key: True) == {table_key(other): other} and len(unwritten) == 0
