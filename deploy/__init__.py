"""Operating tokenmeter: settings, the local dev stack, topics and the `tokenmeter` command line."""
