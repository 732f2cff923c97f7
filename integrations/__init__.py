"""Clients of the outside world, one module per service, each with the only timeouts and error mapping for it."""
