-- What a tenant is billed: pass-through cost, cost plus a markup, or custom per-token rates per model
-- (models without a custom rate are billed at cost).
CREATE TABLE tokenmeter.rate_cards (
    tenant_id      text PRIMARY KEY,
    mode           text NOT NULL CHECK (mode IN ('pass_through', 'cost_plus', 'custom')),
    markup_percent numeric(12, 6) NOT NULL DEFAULT 0,
    rates          jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
