"""The usage event's rules, the same for library dicts, JSON and Avro."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.events import (
    MAX_USAGE_DETAILS,
    NAMED_USAGE_KEYS,
    USAGE_DETAIL_KEYS,
    InvalidEvent,
    UsageEvent,
    decode_usage,
    decode_usage_body,
    parse_json_event,
    printable_problem,
    surely_valid,
    trusted_event,
    validate_event,
)

write_usage = codec.record_writer("usage_event")


def event(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "evt-1",
        "timestamp": "2025-07-01T12:00:00+02:00",
        "tenant_id": "acme",
        "provider": "anthropic",
        "model": "claude-sonnet-4-5",
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_read_tokens": 600,
        "cache_write_tokens": 300,
    }
    base.update(overrides)
    return base


def test_valid_event_is_normalised_to_utc() -> None:
    e = validate_event(event())
    assert e.timestamp == datetime(2025, 7, 1, 10, 0, tzinfo=UTC)
    assert e.timestamp.tzinfo == UTC


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"input_tokens": -1}, "input_tokens"),
        ({"output_tokens": "12"}, "output_tokens"),
        ({"output_tokens": True}, "output_tokens"),
        ({"input_tokens": 1.5}, "input_tokens"),
        ({"tenant_id": ""}, "tenant_id"),
        ({"tenant_id": "x" * 5000}, "tenant_id"),
        ({"timestamp": "2025-07-01T12:00:00"}, "timestamp"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"timestamp": (datetime.now(UTC) + timedelta(days=2)).isoformat()}, "more than 24 h in the future"),
        ({"cache_read_tokens": 900}, "cache_write_tokens must not exceed"),
        ({"reasoning_tokens": 201}, "reasoning_tokens"),
        ({"tags": {f"k{i}": "v" for i in range(33)}}, "at most 32 tags"),
        ({"tags": {"k": "v" * 300}}, "longer than 256"),
        ({"surprise": 1}, "surprise"),
        ({"model": None}, "model"),
    ],
)
def test_invalid_events_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_event(event(**overrides))
    assert field in info.value.reason


def test_missing_required_field_is_named() -> None:
    data = event()
    del data["provider"]
    with pytest.raises(InvalidEvent, match="provider: Field required"):
        validate_event(data)


def test_json_and_avro_decode_to_the_same_event() -> None:
    e = validate_event(event(tags={"team": "search"}, user_id="u-1", estimated=True))
    assert decode_usage(e.to_avro()) == e
    assert decode_usage(e.to_json().encode()) == e
    assert parse_json_event(e.to_json()) == e


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty message"),
        (b"\x00\xff\x10binary", "neither Avro"),
        (b"not json at all", "neither Avro"),
        (b'{"event_id": "x",', "malformed JSON"),
        (b'{"event_id": 5}', "event_id"),
        (b"\xc3\x01garbage!!", "unknown writer schema"),
    ],
)
def test_raw_bytes_rejections_have_reasons(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        decode_usage(payload)


def test_other_offsets_compare_equal_after_normalising() -> None:
    a = validate_event(event(timestamp=datetime(2025, 1, 1, 5, tzinfo=timezone(timedelta(hours=5)))))
    b = validate_event(event(timestamp=datetime(2025, 1, 1, 0, tzinfo=UTC)))
    assert a.timestamp == b.timestamp
    assert isinstance(a, UsageEvent)


# ---------------------------------------------------------------- printable text
STRING_FIELDS = [
    "event_id",
    "tenant_id",
    "provider",
    "model",
    "user_id",
    "feature",
    "environment",
    "trace_id",
    "request_id",
    "status",
    "session_id",
    "team_id",
]
# (character, how the reason names it); pairs, not a dict literal: ruff cannot tell lone surrogates apart.
UNPRINTABLE_CASES = [
    ("\x00", "control character U+0000"),
    ("\x1f", "control character U+001F"),
    ("\n", "control character U+000A"),
    ("\x7f", "control character U+007F"),
    ("\x85", "control character U+0085"),
    ("\x9f", "control character U+009F"),
    ("\ud800", "lone surrogate U+D800"),
    ("\udfff", "lone surrogate U+DFFF"),
]
UNPRINTABLE = dict(UNPRINTABLE_CASES)
# Odd but printable: non-ASCII spaces, a line separator, joiners, a BOM, emoji, right-to-left text.
ODD_BUT_FINE = ["a\u00a0b", "a\u2028b", "\U0001f469\u200d\U0001f4bb", "\ufeffx", "\u05e9\u05dc\u05d5\u05dd", "a b", "é"]


def test_printable_problem_names_the_character_and_its_position() -> None:
    assert printable_problem("acme") is None
    assert printable_problem("acm\x00e") == "control character U+0000 at position 3 is not allowed"
    assert printable_problem("\ud83d") == "lone surrogate U+D83D at position 0 is not allowed"
    assert printable_problem("\U0001f600 ok") is None  # a real emoji is one code point, not a surrogate pair


@pytest.mark.parametrize("field", STRING_FIELDS)
@pytest.mark.parametrize("char", list(UNPRINTABLE))
def test_every_id_and_name_rejects_control_characters_and_lone_surrogates(field: str, char: str) -> None:
    data = event(**{field: f"ab{char}c"}, timestamp=datetime(2025, 7, 1, tzinfo=UTC))
    assert not surely_valid(data)
    with pytest.raises(InvalidEvent) as info:
        validate_event(data)
    assert info.value.reason == f"{field}: {UNPRINTABLE[char]} at position 2 is not allowed"


@pytest.mark.parametrize("char", list(UNPRINTABLE))
def test_tag_keys_and_values_reject_control_characters_and_lone_surrogates(char: str) -> None:
    for tags, reason in [({f"k{char}": "v"}, "tags: tag key"), ({"k": f"v{char}"}, "tags: tag 'k'")]:
        data = event(tags=tags, timestamp=datetime(2025, 7, 1, tzinfo=UTC))
        assert not surely_valid(data)
        with pytest.raises(InvalidEvent, match=reason) as info:
            validate_event(data)
        assert UNPRINTABLE[char] in info.value.reason
        info.value.reason.encode()  # the reason itself is safe to log and to put in a dead letter


@pytest.mark.parametrize("text", ODD_BUT_FINE)
def test_odd_but_printable_text_is_accepted(text: str) -> None:
    data = event(user_id=text, feature=text, tags={text: text}, timestamp=datetime(2025, 7, 1, tzinfo=UTC))
    e = validate_event(data)
    assert decode_usage(e.to_avro()) == e == parse_json_event(e.to_json())
    if surely_valid(data):  # the fast check may leave unusual text to pydantic, never the other way round
        write_usage(data)


def test_unknown_field_with_an_unprintable_name_gives_a_printable_reason() -> None:
    for name in ["bad\x00name", "bad\ud800name"]:
        with pytest.raises(InvalidEvent) as info:
            validate_event({**event(), name: 1})
        assert printable_problem(info.value.reason) is None


@pytest.mark.parametrize(
    ("escaped", "reason"),
    [
        ("\\u0000", r"event_id: control character U\+0000 at position 1"),
        ("\\u009f", r"event_id: control character U\+009F at position 1"),
        ("\\ud800", "malformed JSON"),
        ("\\udc00", "malformed JSON"),
        ("\x01", "malformed JSON"),
    ],
)
def test_json_escapes_of_unprintable_characters_are_rejected_with_a_reason(escaped: str, reason: str) -> None:
    body = json.dumps(event(event_id="e@")).replace("@", escaped)
    with pytest.raises(InvalidEvent, match=reason):
        parse_json_event(body)
    with pytest.raises(InvalidEvent, match=reason):
        decode_usage(body.encode())


def test_avro_with_unprintable_or_undecodable_strings_is_rejected_with_a_reason() -> None:
    good = validate_event(event(tenant_id="abc"))
    with_nul = codec.encode("usage_event", {**good.model_dump(), "tenant_id": "a\x00c"})
    with pytest.raises(InvalidEvent, match="tenant_id: control character U\\+0000 at position 1"):
        decode_usage(with_nul)
    surrogate_bytes = good.to_avro().replace(b"\x06abc", b"\x06\xed\xa0\x80")  # U+D800 as CESU-8, not UTF-8
    with pytest.raises(InvalidEvent, match="corrupt usage_event"):
        decode_usage(surrogate_bytes)


# ---------------------------------------------------------------- the library's fast check
_AWARE = st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7))]))
# Everyday text, any code point (lone surrogates included) and short mixes of the odd characters above.
_ODD_CHARS = st.sampled_from([*UNPRINTABLE, "\u00a0", "\u2028", "\u200d", "\ufeff", "\U0001f600", "\t", " "])
_TEXT = st.one_of(
    st.text(max_size=210),
    st.text(st.characters(exclude_categories=()), max_size=210),
    st.lists(st.one_of(_ODD_CHARS, st.characters(codec="ascii")), max_size=12).map("".join),
)
_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**13),
    _TEXT,
    _TEXT,
    _AWARE,
    st.datetimes(),
    st.dictionaries(_TEXT, _TEXT, max_size=34),
    st.dictionaries(
        st.one_of(st.sampled_from(sorted(USAGE_DETAIL_KEYS)), st.sampled_from(["input_tokens", "foo"]), _TEXT),
        st.one_of(st.integers(-5, 2_000), st.integers(0, 10**13), st.booleans(), _TEXT),
        max_size=34,
    ),
    st.sampled_from(["batch", "priority", "flex", "Priority", "default", "", "x" * 33, "a b"]),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
)
_FIELDS = [*UsageEvent.model_fields, "unknown_field"]


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _ANY_VALUE), st.booleans())
def test_surely_valid_accepts_only_what_the_model_accepts(mutations: dict[str, Any], plausible: bool) -> None:
    data = {**event(timestamp=datetime(2025, 7, 1, tzinfo=UTC)), **mutations} if plausible else mutations
    if surely_valid(data):
        filled = {"timestamp": datetime.now(UTC), **data}  # the producer fills in now
        validate_event(filled).to_avro()  # must not raise
        write_usage(filled)  # nor may the producer's own writer, on its background thread


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"user_id": "u-1", "feature": "search", "tags": {"team": "ml"}, "latency_ms": 812, "estimated": True},
        {"reasoning_tokens": 100, "session_id": "s-1", "environment": "prod"},
    ],
)
def test_everyday_library_events_take_the_fast_path(overrides: dict[str, Any]) -> None:
    data = {**event(timestamp=datetime(2025, 7, 1, tzinfo=UTC)), **overrides}
    assert surely_valid(data)
    without_timestamp = {k: v for k, v in data.items() if k != "timestamp"}
    assert surely_valid(without_timestamp)  # the producer fills in now
    assert not surely_valid({**data, "input_tokens": -1})
    assert not surely_valid({**data, "timestamp": "2025-07-01T00:00:00Z"})  # strings go through pydantic
    assert not surely_valid({**data, "timestamp": datetime.now(UTC) + timedelta(days=2)})  # a clock far ahead


# ---------------------------------------------------------------- the worker's fast path
@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _ANY_VALUE), st.booleans())
def test_a_trusted_event_is_exactly_what_the_model_makes_of_the_record(
    mutations: dict[str, Any], plausible: bool
) -> None:
    data = {**event(timestamp=datetime(2025, 7, 1, tzinfo=UTC)), **mutations} if plausible else mutations
    full = {
        name: data.get(name, UsageEvent.model_fields[name].get_default(call_default_factory=True))
        for name in UsageEvent.model_fields
    }
    trusted = trusted_event(dict(full))
    if trusted is None:
        return
    validated = UsageEvent.model_validate(full)  # must not raise: trusted means valid
    assert trusted == validated
    assert trusted.model_dump() == validated.model_dump() and trusted.model_dump_json() == validated.model_dump_json()
    assert trusted.model_fields_set == validated.model_fields_set


def _schema_typed(field: str) -> st.SearchStrategy[Any]:
    """Values the Avro reader can give ``field`` (of the newest usage schema's type), valid or not."""
    schema = codec.latest("usage_event").parsed
    kind = next(f["type"] for f in schema["fields"] if f["name"] == field)
    nullable = isinstance(kind, list)
    kind = kind[1] if nullable else kind
    if kind == "string":
        values: st.SearchStrategy[Any] = st.one_of(
            _TEXT, st.sampled_from(["batch", "priority", "flex", "Priority", "default", "", "x" * 33, "a b"])
        )
    elif kind == "long":
        values = st.one_of(st.integers(-5, 2_000), st.integers(-(2**63), 2**63 - 1))
    elif kind == "boolean":
        values = st.booleans()
    elif isinstance(kind, dict) and kind.get("logicalType") == "timestamp-micros":
        values = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))
    elif isinstance(kind, dict) and kind.get("values") == "string":
        values = st.dictionaries(_TEXT, _TEXT, max_size=34)
    else:
        keys = st.one_of(st.sampled_from(sorted(USAGE_DETAIL_KEYS)), st.sampled_from(["input_tokens", "foo"]), _TEXT)
        values = st.dictionaries(keys, st.one_of(st.integers(-5, 2_000), st.integers(0, 10**13)), max_size=34)
    return st.one_of(st.none(), values) if nullable else values


_DECODED = st.fixed_dictionaries({}, optional={name: _schema_typed(name) for name in UsageEvent.model_fields})


@settings(max_examples=800, deadline=None)
@given(_DECODED)
def test_the_check_of_decoded_records_decides_as_the_general_one(mutations: dict[str, Any]) -> None:
    # Stage 1's cheaper check of what the Avro reader made: same answer as ``surely_valid`` (which is
    # property-tested against the model above) for every record of the schema's types.
    valid = validate_event(event(timestamp=datetime(2025, 7, 1, tzinfo=UTC))).model_dump()
    record = {**valid, **mutations}
    assert (trusted_event(dict(record), decoded=True) is None) == (trusted_event(dict(record)) is None)
    assert trusted_event(dict(record), decoded=True) == trusted_event(dict(record))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"user_id": "u-1", "feature": "search", "tags": {"team": "ml"}, "latency_ms": 812, "estimated": True},
        {"reasoning_tokens": 100, "session_id": "s-1", "environment": "prod", "cache_read_tokens": 10},
    ],
)
def test_avro_events_of_the_newest_schema_are_trusted_and_keep_their_body(overrides: dict[str, Any]) -> None:
    e = validate_event({**event(timestamp=datetime(2025, 7, 1, tzinfo=UTC)), **overrides})
    data = e.to_avro()
    decoded, body = decode_usage_body(data)
    assert decoded == e and body == data[codec.HEADER_LEN :]
    assert trusted_event(codec.decode("usage_event", data)) == e
    older = codec.encode(
        "usage_event",
        e.model_dump(
            exclude={
                "session_id",
                "team_id",
                "reasoning_tokens",
                "input_audio_tokens",
                "output_audio_tokens",
                "input_image_tokens",
                "estimated",
                "tags",
            }
        ),
        version=1,
    )
    decoded_older, older_body = decode_usage_body(older)
    assert older_body is None and decoded_older.event_id == e.event_id  # read as the newest schema: no reuse
    assert decode_usage_body(e.to_json().encode()) == (e, None)
    assert trusted_event({**codec.decode("usage_event", data), "input_tokens": -1}) is None
    assert (
        trusted_event(
            {
                **codec.decode("usage_event", data),
                "timestamp": datetime(2025, 7, 1, tzinfo=timezone(timedelta(hours=2))),
            }
        )
        is None
    )


# ---------------------------------------------------------------- contract v3: price context and usage details
@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"service_tier": "Priority"}, "service_tier: must be a lowercase token"),
        ({"service_tier": ""}, "service_tier: must be a lowercase token"),
        ({"service_tier": "p" * 33}, "service_tier: must be a lowercase token"),
        ({"service_tier": "a\x00"}, "service_tier: must be a lowercase token"),
        ({"service_tier": 3}, "service_tier"),
        ({"processing": "flex"}, "processing: Input should be 'batch'"),
        ({"cache_write_1h_tokens": 301}, "cache_write_1h_tokens must not exceed cache_write_tokens"),
        ({"cache_write_1h_tokens": -1}, "cache_write_1h_tokens"),
        ({"usage_details": {"foo": 1}}, "usage_details: 'foo' is not a genai-prices usage key"),
        ({"usage_details": {"input_tokens": 1}}, "usage_details: 'input_tokens' has its own field: input_tokens"),
        ({"usage_details": {"output_reasoning_tokens": 1}}, "has its own field: reasoning_tokens"),
        ({"usage_details": {"web_searches": -1}}, "usage_details.web_searches"),
        ({"usage_details": {"web_searches": 10**13}}, "usage_details.web_searches"),
        ({"usage_details": {"web_searches": True}}, "usage_details.web_searches"),
        ({"usage_details": {"web_searches": 1.5}}, "usage_details.web_searches"),
        (
            {"usage_details": {"output_image_tokens": 201}},
            "usage_details.output_image_tokens must not exceed output_tokens",
        ),
        ({"usage_details": {"cache_text_read_tokens": 1001}}, "must not exceed input_tokens"),
        ({"usage_details": dict.fromkeys(sorted(USAGE_DETAIL_KEYS)[:33], 0)}, "at most 32 usage keys"),
        ({"usage_details": None}, "usage_details"),
    ],
)
def test_price_context_and_usage_details_follow_the_count_rules(overrides: dict[str, Any], reason: str) -> None:
    data = event(**overrides, timestamp=datetime(2025, 7, 1, tzinfo=UTC))
    assert not surely_valid(data)
    with pytest.raises(InvalidEvent) as info:
        validate_event(data)
    assert reason in info.value.reason
    with pytest.raises(InvalidEvent):
        parse_json_event(json.dumps({**data, "timestamp": "2025-07-01T00:00:00Z"}))


def test_usage_details_keys_are_exactly_genai_prices_usage_keys_without_a_named_field() -> None:
    """Upgrading genai-prices with a new unit fails here: add its key to USAGE_DETAIL_KEYS (no schema change)."""
    from genai_prices.units import _get_registry

    reported = _get_registry()._reported_usage_keys
    assert set(NAMED_USAGE_KEYS) <= reported
    assert reported - set(NAMED_USAGE_KEYS) == USAGE_DETAIL_KEYS
    assert set(NAMED_USAGE_KEYS.values()) <= set(UsageEvent.model_fields)
    assert len(USAGE_DETAIL_KEYS) > MAX_USAGE_DETAILS  # bounded per event, not by what genai-prices knows


V3 = {
    "service_tier": "priority",
    "processing": "batch",
    "cache_write_1h_tokens": 200,
    "usage_details": {"web_searches": 3, "output_image_tokens": 150, "cache_write_5m_tokens": 100},
}


def test_v3_fields_travel_in_avro_and_json_and_take_both_fast_paths() -> None:
    data = {**event(timestamp=datetime(2025, 7, 1, tzinfo=UTC)), **V3}
    assert surely_valid(data)
    e = validate_event(data)
    assert decode_usage(e.to_avro()) == e == parse_json_event(e.to_json()) == decode_usage(e.to_json().encode())
    assert write_usage(data) == e.to_avro()  # the library's writer
    decoded, body = decode_usage_body(e.to_avro())
    assert decoded == e and body is not None  # trusted, its body reused in usage.priced
    assert trusted_event(codec.decode("usage_event", e.to_avro())) == e
    assert "usage_details" not in validate_event(event()).to_json()  # empty: left out of JSON


def test_records_of_older_producers_still_decode_with_v3_defaults() -> None:
    e = validate_event({**event(timestamp=datetime(2025, 7, 1, tzinfo=UTC)), "tags": {"k": "v"}})
    v2 = codec.encode("usage_event", e.model_dump(exclude=set(V3)), version=2)
    assert codec.writer_of(v2).version == 2
    decoded, body = decode_usage_body(v2)
    assert decoded == e and body is None  # read as v3; its v2 body cannot be embedded in a v3 priced event
    assert (decoded.service_tier, decoded.processing, decoded.cache_write_1h_tokens, decoded.usage_details) == (
        None,
        None,
        None,
        {},
    )
