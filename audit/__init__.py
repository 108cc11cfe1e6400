"""Audit trail: decision records, durable spool, SQLAlchemy store, query API (coming)."""
