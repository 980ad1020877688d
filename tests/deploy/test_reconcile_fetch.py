"""``reconcile --fetch`` against a local HTTP server serving the documented shapes (never a real
endpoint): request URLs and headers, pagination, retries on 429/5xx, clear errors. No stack needed."""

from __future__ import annotations

import urllib.parse
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from deploy.cli import cli
from deploy.cli_reconcile import default_fetch_range
from deploy.provider_costs import FetchError, fetch_pages, request_url
from sinks.reconcile import merge_exports, parse_export
from tests.deploy.cost_api_server import ADMIN_KEY, CostApi, sample_pages, serve

NOV2, NOV3 = date(2026, 11, 2), date(2026, 11, 3)


def test_openai_pages_are_followed_with_the_bearer_key() -> None:
    waits: list[float] = []
    with serve(CostApi({"openai": sample_pages("openai")})) as api:
        pages = fetch_pages("openai", api.url, ADMIN_KEY, NOV2, NOV3, sleep=waits.append)
    assert len(pages) == 2 and waits == []
    first, second = api.seen
    assert first.path == "/v1/organization/costs"
    assert first.headers["authorization"] == f"Bearer {ADMIN_KEY}"
    assert first.query == {
        "start_time": ["1793577600"],  # 2026-11-02T00:00Z
        "end_time": ["1793750400"],  # 2026-11-04T00:00Z: the last day is inclusive
        "bucket_width": ["1d"],
        "group_by": ["line_item"],
        "limit": ["180"],
    }
    assert second.query["page"] == ["page_AAAAAGdZ2QA="]
    export = merge_exports([parse_export("openai", {**page, "has_more": False}) for page in pages])
    assert export.days == {NOV2, NOV3}
    assert sum(line.amount for line in export.lines) == Decimal("5.15")  # the file's numbers, exactly


def test_anthropic_uses_its_key_header_version_and_groups_by_description() -> None:
    with serve(CostApi({"anthropic": sample_pages("anthropic")})) as api:
        pages = fetch_pages("anthropic", api.url, ADMIN_KEY, NOV2, NOV3, project="wrkspc_01")
    (seen,) = api.seen
    assert seen.path == "/v1/organizations/cost_report"
    assert (seen.headers["x-api-key"], seen.headers["anthropic-version"]) == (ADMIN_KEY, "2023-06-01")
    assert "authorization" not in seen.headers
    assert seen.query["starting_at"] == ["2026-11-02T00:00:00Z"]
    assert seen.query["ending_at"] == ["2026-11-04T00:00:00Z"]
    assert seen.query["group_by[]"] == ["description", "workspace_id"]
    assert parse_export("anthropic", pages[0]).lines[0].amount == Decimal("1.50")


def test_openai_project_filter_is_sent_to_the_api() -> None:
    url = request_url("openai", "https://api.example", NOV2, NOV2, "proj_a", "tok")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["project_ids"] == ["proj_a"] and query["page"] == ["tok"]
    assert query["group_by"] == ["line_item", "project_id"]  # lines say their project: --project keeps them


def test_429_waits_for_retry_after_and_5xx_backs_off_then_succeeds() -> None:
    waits: list[float] = []
    failures = [
        (429, {"Retry-After": "7"}, b'{"error": {"message": "slow down"}}'),
        (503, {}, b"upstream unavailable"),
        (429, {"Retry-After": "3600"}, b"{}"),  # capped: nobody waits an hour in a CLI
    ]
    with serve(CostApi({"anthropic": sample_pages("anthropic")}, failures=failures)) as api:
        pages = fetch_pages("anthropic", api.url, ADMIN_KEY, NOV2, NOV3, sleep=waits.append)
    assert len(pages) == 1 and len(api.seen) == 4
    assert waits == [7.0, 2.0, 60.0]


def test_persistent_server_errors_give_up_with_the_last_reason() -> None:
    failures: list[tuple[int, dict[str, str], bytes]] = [(500, {}, b'{"error": {"message": "internal"}}')] * 4
    gave_up = r"gave up after 4 attempts \(HTTP 500: internal\)"
    with (
        serve(CostApi({"openai": sample_pages("openai")}, failures=failures)) as api,
        pytest.raises(FetchError, match=gave_up),
    ):
        fetch_pages("openai", api.url, ADMIN_KEY, NOV2, NOV3, sleep=lambda _s: None)


def test_a_refused_key_stops_at_once_and_is_never_shown() -> None:
    refused = "HTTP 401, the admin key was refused: invalid admin key"
    with serve(CostApi({"openai": sample_pages("openai")})) as api, pytest.raises(FetchError, match=refused) as caught:
        fetch_pages("openai", api.url, "sk-admin-wrong-secret", NOV2, NOV3, sleep=lambda _s: None)
    assert len(api.seen) == 1
    assert "sk-admin-wrong-secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>proxy error</html>", "not JSON"),
        (b'{"value": NaN}', "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"data": [], "has_more": true}', "next_page is missing"),
        (b'{"data": [], "has_more": true, "next_page": "p1"}', "next_page is missing or repeats"),
    ],
)
def test_malformed_answers_are_clear_errors(body: bytes, message: str) -> None:
    # The fixture server answers every request with this body (the repeat case sees p1 twice).
    failures: list[tuple[int, dict[str, str], bytes]] = [(200, {}, body)] * 3
    with serve(CostApi({"openai": []}, failures=failures)) as api, pytest.raises(FetchError, match=message):
        fetch_pages("openai", api.url, ADMIN_KEY, NOV2, NOV3, sleep=lambda _s: None)


def test_missing_key_and_bad_base_url_are_refused_before_any_request() -> None:
    with pytest.raises(FetchError, match="TOKENMETER_OPENAI_ADMIN_KEY"):
        fetch_pages("openai", "https://api.openai.com", "", NOV2, NOV3)
    with pytest.raises(FetchError, match="not an http"):
        fetch_pages("anthropic", "file:///etc/passwd", ADMIN_KEY, NOV2, NOV3)


def test_connection_refused_is_retried_then_reported() -> None:
    with serve(CostApi({})) as api:
        url = api.url  # the server is gone after this block: nothing listens there
    with pytest.raises(FetchError, match="cannot connect"):
        fetch_pages("openai", url, ADMIN_KEY, NOV2, NOV3, sleep=lambda _s: None)


def reconcile_cli(*args: str, **env: str) -> tuple[int, str]:
    from deploy.settings import get_settings

    get_settings.cache_clear()
    try:
        done = CliRunner().invoke(cli, ["reconcile", *args], env=env)
    finally:
        get_settings.cache_clear()
    return done.exit_code, done.output


def test_bad_input_exits_2_with_a_reason_before_reaching_any_store(tmp_path: Path) -> None:
    broken = tmp_path / "costs.json"
    broken.write_text('{"data": [{"start_time": 1, "end_time": 2, "results": []}]}')
    status, output = reconcile_cli("--provider", "openai", "--file", str(broken))
    assert status == 2 and "not at a UTC midnight" in output
    broken.write_text('{"data": [], "has_more": false, "x": 1' + "]" * 3)
    status, output = reconcile_cli("--provider", "openai", "--file", str(broken))
    assert status == 2 and "not valid JSON" in output
    status, output = reconcile_cli("--provider", "anthropic", "--file", str(tmp_path / "missing.json"))
    assert status == 2 and "cannot read" in output
    status, output = reconcile_cli("--provider", "openai", "--fetch", TOKENMETER_OPENAI_ADMIN_KEY="")
    assert status == 2 and "TOKENMETER_OPENAI_ADMIN_KEY" in output
    status, output = reconcile_cli("--provider", "openai")
    assert status == 2 and "--file EXPORT or --fetch" in output
    status, output = reconcile_cli("--provider", "openai", "--fetch", "--tenant", "a\x1bb")
    assert status == 2 and "control character" in output
    status, output = reconcile_cli("--provider", "openai", "--fetch", "--threshold", "-1")
    assert status == 2 and "between 0 and 1e9" in output
    status, output = reconcile_cli("--provider", "openai", "--fetch", "--from", "2026-11-05", "--to", "2026-11-01")
    assert status == 2 and "--to is before --from" in output


def test_an_echoed_key_and_terminal_escapes_in_error_bodies_never_reach_the_output() -> None:
    echoed = f'{{"error": {{"message": "key {ADMIN_KEY} is not an admin key\\u001b[2J"}}}}'.encode()
    with (
        serve(CostApi({"openai": []}, failures=[(403, {}, echoed)])) as api,
        pytest.raises(FetchError, match="HTTP 403") as caught,
    ):
        fetch_pages("openai", api.url, ADMIN_KEY, NOV2, NOV3, sleep=lambda _s: None)
    assert ADMIN_KEY not in str(caught.value) and "\x1b" not in str(caught.value)
    assert "key [redacted] is not an admin key\\x1b[2J" in str(caught.value)


def test_a_nan_retry_after_waits_the_default() -> None:
    waits: list[float] = []
    failures = [(429, {"Retry-After": "nan"}, b"{}")]
    with serve(CostApi({"anthropic": sample_pages("anthropic")}, failures=failures)) as api:
        assert len(fetch_pages("anthropic", api.url, ADMIN_KEY, NOV2, NOV3, sleep=waits.append)) == 1
    assert waits == [1.0]


def test_a_key_with_a_stray_newline_or_a_broken_url_is_refused_without_showing_it() -> None:
    with pytest.raises(FetchError, match="stray newline") as caught:
        fetch_pages("openai", "https://api.openai.com", ADMIN_KEY + "\n", NOV2, NOV3)
    assert ADMIN_KEY not in str(caught.value)
    for url in ("http://[::1", "http://example.com:99999", "https://"):
        with pytest.raises(FetchError, match="not an http"):
            fetch_pages("openai", url, ADMIN_KEY, NOV2, NOV3)


def test_days_and_numbers_out_of_range_are_usage_errors() -> None:
    status, output = reconcile_cli("--provider", "openai", "--fetch", "--to", "9999-12-31")
    assert status == 2 and "not between 2000-01-01 and 2100-12-31" in output
    status, output = reconcile_cli("--provider", "openai", "--fetch", "--min-delta", "0." + "0" * 12 + "1")
    assert status == 2 and "more than 12 decimal places" in output


def test_an_endless_file_is_read_only_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import deploy.cli_reconcile

    monkeypatch.setattr(deploy.cli_reconcile, "MAX_EXPORT_BYTES", 4 * 2**20)
    status, output = reconcile_cli("--provider", "openai", "--file", "/dev/zero")  # stat() says 0 bytes
    assert status == 2 and "/dev/zero is larger than 4 MiB" in output


def test_the_default_fetch_range_ends_two_days_ago_when_cost_data_is_final() -> None:
    today = date(2026, 11, 10)
    assert default_fetch_range(today, None, None) == (date(2026, 11, 2), date(2026, 11, 8))  # 7 days, not the 9th
    assert default_fetch_range(today, date(2026, 11, 5), None) == (date(2026, 11, 5), date(2026, 11, 8))
    assert default_fetch_range(today, None, date(2026, 11, 9)) == (date(2026, 11, 3), date(2026, 11, 9))  # asked for
    assert default_fetch_range(date(2026, 3, 1), None, None) == (date(2026, 2, 21), date(2026, 2, 27))
    with pytest.raises(click.UsageError, match=r"--from 2026-11-09 is after the default --to \(2026-11-08"):
        default_fetch_range(today, date(2026, 11, 9), None)


def test_fetch_without_a_range_asks_the_provider_for_the_week_ending_two_days_ago() -> None:
    today = datetime.now(UTC).date()
    with serve(CostApi({"openai": sample_pages("openai")})) as api:
        status, output = reconcile_cli(
            "--provider",
            "openai",
            "--fetch",
            TOKENMETER_OPENAI_ADMIN_KEY=ADMIN_KEY,
            TOKENMETER_OPENAI_ADMIN_BASE_URL=api.url,
            TOKENMETER_DATABASE_URL="postgresql://tokenmeter@127.0.0.1:1/none",  # nothing listens: exit 2 after
        )
    assert status == 2 and "Postgres" in output, output
    midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)
    asked = api.seen[0].query
    # Independent of the code: the 7 UTC days from today−8 to today−2 inclusive, as [start, end) in seconds.
    assert int(asked["start_time"][0]) == int((midnight - timedelta(days=8)).timestamp())
    assert int(asked["end_time"][0]) == int((midnight - timedelta(days=1)).timestamp())
