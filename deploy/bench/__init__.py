"""Benchmarks of DESIGN.md §7, run by ``tokenmeter bench``; none of it is imported at run time.

They sit at the top layer (``deploy``) because they drive every layer below: the producer library, an
isolated pipeline with its own worker (``deploy.isolation``), the sinks' reports.

- ``producer``: what ``UsageProducer.record()`` costs the calling thread, p50/p99/max in µs, against the
  real broker: busy callers at 5,000/s and 1,000/s, back to back, and an idle caller.
- ``pipeline``: on an isolated pipeline of the running stack (own topics, worker, consumer groups, a
  scratch Postgres database and Redis database 15, dropped afterwards): end-to-end events/s through
  the worker, how far stage 2 trails, produce-to-quota latency under background traffic, the quota
  check itself, produce-to-budget-alert latency, and in the same run the ceiling (a bare
  confluent-kafka consume + decode loop) and the naive approach (one INSERT per event).
- ``reports``: report and invoice times over a scratch ledger of N rows (``--report-rows N``).
- ``workload``: the one synthetic workload (seeded usage events) the pipeline bench, the demo and the
  tests share.

Run against a stack that is up (``tokenmeter dev up``; your data is not touched)::

    tokenmeter bench                        # record() latency, then the pipeline on 100,000 events
    tokenmeter bench --events 20000 --json  # smaller; the last line is JSON (pipeline_events_per_s, …)
    tokenmeter bench --no-pipeline --report-rows 1000000

The machine matters more than the code for absolute figures: compare figures measured in one run
(``pipeline_events_per_s`` against ``naive_postgres_events_per_s`` and ``bare_consume_events_per_s``).
"""
