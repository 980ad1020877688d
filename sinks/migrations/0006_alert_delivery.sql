-- Webhook delivery as an outbox: each stored alert is posted until a webhook accepts it.
ALTER TABLE tokenmeter.alerts
    ADD COLUMN delivered_at timestamptz,
    ADD COLUMN delivery_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_error text;
CREATE INDEX alerts_undelivered ON tokenmeter.alerts (next_attempt_at) WHERE delivered_at IS NULL;
