"""Alerts in Postgres: stored once per ``alert_id``, listed by ``tokenmeter alerts list``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg

from schemas.records import ALERT_FIELDS, Alert


def store_alerts(conn: psycopg.Connection, alerts: Sequence[Alert]) -> set[str]:
    """Insert the alerts not stored yet; return the ids that were new (the ones to deliver)."""
    new: set[str] = set()
    with conn.transaction():
        for alert in alerts:
            row = conn.execute(
                "INSERT INTO tokenmeter.alerts (alert_id, kind, tenant_id, scope, period, threshold_percent, current,"
                ' baseline, "limit", message, details, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s,'
                " %s, %s) ON CONFLICT (alert_id) DO NOTHING RETURNING alert_id",
                (
                    alert.alert_id,
                    alert.kind,
                    alert.tenant_id,
                    json.dumps(alert.scope),
                    alert.period,
                    alert.threshold_percent,
                    alert.current,
                    alert.baseline,
                    alert.limit,
                    alert.message,
                    json.dumps(alert.details),
                    alert.created_at,
                ),
            ).fetchone()
            if row:
                new.add(row[0])
    return new


def top_contributors(
    conn: psycopg.Connection, tenant_id: str, granularity: str, window_start: datetime, limit: int = 3
) -> dict[str, str]:
    """The biggest features, users and models of a tenant's window, for an alert's details."""
    details = {}
    for dimension in ("feature", "user", "model"):
        rows = conn.execute(
            "SELECT dimension_value, cost FROM tokenmeter.rollups WHERE tenant_id = %s AND granularity = %s"
            " AND window_start = %s AND dimension = %s AND dimension_value <> '' ORDER BY cost DESC LIMIT %s",
            (tenant_id, granularity, window_start, dimension, limit),
        ).fetchall()
        if rows:
            details[f"top_{dimension}s"] = ", ".join(f"{name}=${cost.normalize():f}" for name, cost in rows)
    return details


def list_alerts(conn: psycopg.Connection, tenant_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    rows = conn.execute(
        f"SELECT {', '.join(f'{chr(34)}{f}{chr(34)}' for f in ALERT_FIELDS)} FROM tokenmeter.alerts"
        " WHERE %(tenant)s::text IS NULL OR tenant_id = %(tenant)s"
        " ORDER BY created_at, threshold_percent NULLS LAST, alert_id LIMIT %(limit)s",
        {"tenant": tenant_id, "limit": limit},
    ).fetchall()
    alerts = []
    for row in rows:
        alert = dict(zip(ALERT_FIELDS, row, strict=True))
        for money in ("current", "baseline", "limit"):
            if isinstance(alert[money], Decimal):
                alert[money] = str(alert[money])
        alert["created_at"] = alert["created_at"].isoformat()
        alerts.append(alert)
    return alerts
