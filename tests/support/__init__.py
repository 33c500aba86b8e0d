"""Helpers that start the real components the integration tests talk to."""
