"""The transactional outbox (being written)."""
