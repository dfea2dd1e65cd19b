"""Logs and the access log."""
