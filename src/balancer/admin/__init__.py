"""The admin endpoint: API, dashboard, metrics."""
