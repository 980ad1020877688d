"""The shared records: custom-rate arithmetic, scope labels, Avro mappings."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.events import validate_event
from schemas.records import ALERT_FIELDS, Alert, TokenRates, scope_label

_RATE = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    _RATE,
    _RATE,
    st.none() | _RATE,
    st.none() | _RATE,
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
)
def test_the_per_event_cost_equals_the_invoice_lines_of_the_same_rates(
    input_rate: Decimal,
    output_rate: Decimal,
    read_rate: Decimal | None,
    write_rate: Decimal | None,
    uncached: int,
    read: int,
    write: int,
    output: int,
) -> None:
    rates = TokenRates(input_rate, output_rate, read_rate, write_rate)
    event = validate_event(
        {
            "event_id": "e",
            "timestamp": datetime(2025, 7, 1, tzinfo=UTC),
            "tenant_id": "t",
            "provider": "p",
            "model": "m",
            "input_tokens": uncached + read + write,
            "output_tokens": output,
            "cache_read_tokens": read,
            "cache_write_tokens": write,
        }
    )
    lines = {kind: amount for kind, _tokens, _rate, amount in rates.lines(uncached + read + write, output, read, write)}
    assert rates.cost(event) == (lines["input_uncached"] + lines["cache_read"] + lines["cache_write"], lines["output"])


def test_scopes_are_labelled_one_way_and_alerts_encode_with_every_field() -> None:
    assert scope_label("acme", "tenant", "") == "acme"
    assert scope_label("acme", "feature", "search") == "acme/feature=search"
    alert = Alert(
        alert_id="a-1",
        kind="budget.threshold",
        tenant_id="acme",
        scope={"dimension": "tenant", "value": ""},
        period="month:2025-07-01",
        threshold_percent=50,
        current=Decimal("5.5"),
        limit=Decimal(10),
        message="acme has spent $5.5 of $10",
        created_at=datetime(2025, 7, 2, tzinfo=UTC),
    )
    decoded = codec.decode("alert", codec.encode("alert", alert.to_avro()))
    assert set(decoded) == set(ALERT_FIELDS) and decoded["current"] == Decimal("5.5") and alert.is_budget
