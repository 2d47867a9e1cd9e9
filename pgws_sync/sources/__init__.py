"""Notification sources: the Source protocol, PostgreSQL (listener, NOTIFY pool) and Redis."""
