"""The Faust stream app: decode, validate, de-duplicate, price and aggregate usage events."""
