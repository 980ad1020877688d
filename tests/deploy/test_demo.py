"""The main job, as a user runs it: `tokenmeter demo` on the (test) stack, to the end."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal

from deploy.settings import Settings
from deploy.stack import LocalStack


def test_demo_runs_to_the_end_and_its_report_adds_up(stack: LocalStack, settings: Settings) -> None:
    done = subprocess.run([sys.executable, "-m", "deploy", "demo", "--duration", "25", "--rate", "400"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5", "By model", "By feature", "By user", "HTML report"):
        assert step in out, step
    assert "budget.blocked" in out and "globex" in out, out[-4000:]  # the hard budget was crossed, blocked
    assert (settings.home / "report.html").read_text().count("<svg") == 6
    blocked = subprocess.run([sys.executable, "-m", "deploy", "quota", "check", "--tenant", "globex", "--format",
                              "json"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert json.loads(blocked.stdout)["allowed"] is False
    shown = subprocess.run([sys.executable, "-m", "deploy", "report", "--format", "json"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    report = json.loads(shown.stdout)
    total = Decimal(report["totals"]["cost"])
    assert total > 0
    for key in ("by_provider", "by_model", "by_feature", "by_environment"):
        assert sum(Decimal(r["cost"]) for r in report[key]) == total, key
