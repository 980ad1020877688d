"""Where metered usage lands: Postgres (ledger, rollups, invoices) and Redis (live spend for quota checks)."""
