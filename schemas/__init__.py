"""Event contracts: Avro schemas (one file per version), the pydantic models and the wire codec."""
