"""Versioned message contracts (pydantic v2) exchanged over Kafka."""
