"""The client library services use: record usage events (UsageProducer) and ask for quota."""
