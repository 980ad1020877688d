"""The client library services use: record one usage event per model call, and ask for quota.

    from producers import UsageProducer, QuotaClient, usage_context, from_openai_chat

    producer = UsageProducer()  # one per process; reads TOKENMETER_* settings
    with usage_context(tenant_id="acme", user_id="u-42", feature="search"):
        response = client.chat.completions.create(...)
        producer.record(from_openai_chat(response))

Importing it loads only what a service needs (confluent-kafka, fastavro, pydantic, redis): no Postgres
driver, price data or stream framework. Quota checks read the Redis keys described in
``schemas/redis_keys.py``; pricing a call before making it is ``streams.pricing.estimate_cost``.
"""

from producers.context import current_attribution, usage_context
from producers.producer import ProducerStats, UsageProducer
from producers.providers import (
    estimate_event,
    from_anthropic,
    from_anthropic_batch_result,
    from_bedrock_converse,
    from_gemini,
    from_openai_batch_line,
    from_openai_chat,
    from_openai_responses,
)
from producers.quota import QuotaClient, QuotaDecision, Reservation
from schemas.events import InvalidEvent, UsageEvent

__all__ = [
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
]
