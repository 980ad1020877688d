-- Issue #16 part 4: currencies. A rate card may bill in another currency than USD (what usage is priced
-- in); invoices convert at the FX rate in effect for their month (schemas/currencies.py).
--
-- fx_rates is append-only: a rate is never edited or deleted. A correction is a new row for the same pair
-- and effective date, and the row entered last wins (entered_at, then id). Finalized invoices keep the
-- rate they used in their own columns below, so a later correction never changes them.
-- The checks repeat the validation of `tokenmeter fx set` (schemas/currencies.py), so a row written by
-- hand cannot make invoices fail to read it.
CREATE TABLE tokenmeter.fx_rates (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    from_currency text NOT NULL CHECK (from_currency ~ '^[A-Z]{3}$'),
    to_currency   text NOT NULL CHECK (to_currency ~ '^[A-Z]{3}$'),
    rate          numeric NOT NULL CHECK (rate > 0 AND rate <= 100000000 AND scale(rate) <= 18),
    effective     date NOT NULL CHECK (effective BETWEEN '2000-01-01' AND '2100-12-31'),
    source        text NOT NULL CHECK (length(source) BETWEEN 1 AND 200 AND source = btrim(source)),
    entered_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (from_currency <> to_currency)
);
CREATE INDEX fx_rates_pair ON tokenmeter.fx_rates (from_currency, to_currency, effective);

-- The currency a tenant is billed in (ISO 4217); existing cards keep billing in USD.
ALTER TABLE tokenmeter.rate_cards
    ADD COLUMN currency text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$');

-- A finalized invoice's currency (its total is in it) and the rate it was converted with, frozen
-- (NULL for a USD invoice: nothing converted). Invoices finalized before stay USD.
ALTER TABLE tokenmeter.invoices
    ADD COLUMN currency text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    ADD COLUMN fx_rate numeric,
    ADD COLUMN fx_effective date,
    ADD COLUMN fx_source text,
    ADD COLUMN fx_entered_at timestamptz,
    ADD COLUMN fx_id bigint,
    ADD CONSTRAINT invoices_fx_complete CHECK (
        (currency = 'USD') = (fx_rate IS NULL)
        AND (fx_rate IS NULL) = (fx_effective IS NULL)
        AND (fx_rate IS NULL) = (fx_source IS NULL)
    );
