"""The client library's public surface: ``from producers import …`` without the worker's dependencies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import producers

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = {
    "InvalidEvent",
    "ProducerStats",
    "QuotaClient",
    "QuotaDecision",
    "Reservation",
    "UsageEvent",
    "UsageProducer",
    "current_attribution",
    "estimate_event",
    "from_anthropic",
    "from_anthropic_batch_result",
    "from_bedrock_converse",
    "from_gemini",
    "from_openai_batch_line",
    "from_openai_chat",
    "from_openai_responses",
    "usage_context",
}
HEAVY = {"psycopg", "psycopg_pool", "genai_prices", "faust", "aiokafka", "mode"}


def test_all_names_exactly_the_public_surface_and_each_resolves() -> None:
    assert set(producers.__all__) == PUBLIC
    assert len(producers.__all__) == len(PUBLIC)
    for name in producers.__all__:
        assert getattr(producers, name) is not None, name


def test_importing_the_library_loads_no_postgres_pricing_or_stream_framework() -> None:
    """In a fresh interpreter: the test process has long since imported everything."""
    code = (
        "import json, sys\n"
        "import producers\n"
        "from producers import *\n"
        "producers.QuotaClient; producers.UsageProducer\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout.splitlines()[-1]))
    packages = {name.split(".")[0] for name in modules}
    assert "producers" in packages
    assert not HEAVY & packages, HEAVY & packages
    assert not {"sinks", "streams"} & packages  # the library imports nothing beside or above it
    # settings, and the client options built from them (kafka_config, redis_client: Kafka security, Redis Cluster)
    assert {name for name in modules if name.split(".")[0] == "deploy"} <= {
        "deploy",
        "deploy.settings",
    }
