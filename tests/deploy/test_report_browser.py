"""The HTML report in a real browser: Debian's headless Chromium renders the page and every chart
shows up in the screenshot (kept under .tokenmeter-test/artifacts/ and named in the test output)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from PIL import Image

from deploy.report_render import PALETTE
from deploy.settings import Settings
from deploy.stack import LocalStack
from tests.sinks.test_reports import seed

WIDTH, HEIGHT = 1280, 2400


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url) as connection:
        yield connection


def chart_bands(image: Image.Image, left: int, right: int) -> list[tuple[int, int]]:
    """Vertical bands of rows holding chart colours between x=left and x=right (a chart's bars are
    less than 30 px apart; charts are further apart)."""
    colours = {tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in PALETTE}
    pixels = image.convert("RGB").load()
    assert pixels is not None
    rows = [y for y in range(image.height) if sum(pixels[x, y] in colours for x in range(left, right, 2)) >= 10]
    bands: list[tuple[int, int]] = []
    for y in rows:
        if bands and y - bands[-1][1] <= 30:
            bands[-1] = (bands[-1][0], y)
        else:
            bands.append((y, y))
    return bands


def test_html_report_charts_render_in_headless_chromium(
    conn: psycopg.Connection, unique: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: deploy/test installs it before running the tests"
    tenant = f"html-{unique}"
    seed(conn, tenant)
    page = tmp_path / "report.html"
    command = [
        sys.executable,
        "-m",
        "deploy",
        "report",
        "--tenant",
        tenant,
        "--period",
        "2025-07-01..2025-07-20",
        "--format",
        "html",
    ]
    made = subprocess.run([*command, "--output", str(page)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    shot = Path(os.environ["TOKENMETER_HOME"]) / "artifacts" / "report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    shown = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--window-size={WIDTH},{HEIGHT}",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0 and shot.exists(), shown.stderr[-2000:]
    with capsys.disabled():
        print(f"\n  report screenshot: {shot}")
    image = Image.open(shot)
    assert image.size == (WIDTH, HEIGHT)
    # Six charts in two columns: spend per day | model mix, providers | features, environments | users.
    left, right = chart_bands(image, 0, WIDTH // 2), chart_bands(image, WIDTH // 2, WIDTH)
    assert len(left) == 3 and len(right) == 3, (left, right)
    assert all(end - start >= 40 for start, end in left + right), (left, right)  # each chart has real bars
    rgb = image.convert("RGB")  # once: converting per pixel took minutes
    used = {rgb.getpixel((x, y)) for x in range(0, WIDTH, 3) for y in range(0, 1200, 3)}
    assert sum(tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) in used for c in PALETTE) >= 3  # a model mix
