"""aligndata: read, validate and convert chat and preference JSON into token-exact Arrow shards."""

__version__ = "0.1.0"
