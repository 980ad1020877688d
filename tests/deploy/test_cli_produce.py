"""`tokenmeter produce` publishes JSON lines and reports rejected lines by number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.events import decode_usage
from tests.helpers import create_topic, read_all


def test_produce_reports_bad_lines_and_publishes_good_ones(
    stack: LocalStack, settings: Settings, unique: str, tmp_path: Path
) -> None:
    topic = f"test.produce.{unique}"
    create_topic(settings, topic)
    good = {
        "event_id": f"p-{unique}",
        "timestamp": "2025-05-01T00:00:00Z",
        "tenant_id": "t1",
        "provider": "openai",
        "model": "o3",
        "input_tokens": 100,
        "output_tokens": 10,
    }
    lines = [
        json.dumps(good),
        "not json",
        json.dumps({**good, "event_id": "p2", "tenant_id": "x" * 5000}),
        "",
        json.dumps({**good, "event_id": "p3", "input_tokens": "100"}),
        json.dumps({**good, "event_id": "p4"}),
    ]
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "TOKENMETER_TOPIC_RAW": topic, "TOKENMETER_SPOOL_DIR": str(tmp_path / "spool")}
    done = subprocess.run(
        [sys.executable, "-m", "deploy", "produce", str(source)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "line 2: malformed JSON" in done.stderr
    assert "line 3: tenant_id: String should have at most 200 characters" in done.stderr
    assert "line 5: input_tokens: Input should be a valid integer" in done.stderr
    assert "accepted 2, rejected 3" in done.stdout
    ids = sorted(decode_usage(v).event_id for v in read_all(settings, topic, expect=2))
    assert ids == sorted([f"p-{unique}", "p4"])

    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps({**good, "event_id": "p5"}) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "deploy", "produce", "-"],
        env=env,
        input=clean.read_text(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
