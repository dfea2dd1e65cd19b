"""Every key the loader knows, by table: the schema of the config formats."""

from __future__ import annotations

TOP_KEYS = ("drain_timeout", "drain_close_window", "access_log", "admin", "services")
ADMIN_KEYS = ("listen", "token", "read_token", "read_access", "allowed_hosts", "enabled")
SERVICE_KEYS = (
    "listen",
    "mode",
    "algorithm",
    "backend_framing",
    "client_framing",
    "max_line",
    "retries",
    "connect_timeout",
    "response_timeout",
    "backend_connections",
    "hash_key",
    "hash_balance_factor",
    "slow_start",
    "policy_options",
    "client_timeout",
    "idle_timeout",
    "max_connections",
    "max_backend_connections",
    "connect_buffer",
    "max_backend_requests",
    "queue_size",
    "queue_timeout",
    "retry_budget_percent",
    "retry_budget_min",
    "max_buffered",
    "backends",
    "health",
    "outlier",
)
OUTLIER_KEYS = (
    "consecutive_failures",
    "base_ejection_time",
    "max_ejection_time",
    "max_ejection_percent",
    "enabled",
)
HEALTH_KEYS = ("interval", "timeout", "rise", "fall", "jitter", "send", "expect", "enabled")
BACKEND_KEYS = ("address", "weight")
SERVER_KEYS = ("host", "port", "weight")

TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "": TOP_KEYS,
    "admin": ADMIN_KEYS,
    "services.NAME": SERVICE_KEYS,
    "services.NAME.health": HEALTH_KEYS,
    "services.NAME.outlier": OUTLIER_KEYS,
    "services.NAME.backends[]": BACKEND_KEYS,
    "servers[]": SERVER_KEYS,
}
"""Every key the loader knows, by table (`NAME` any service, `[]` any list item)."""
