"""The audit store: decisions in SQL (SQLite by default, PostgreSQL by URL)."""
