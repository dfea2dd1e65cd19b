"""A running balancer: services, health checks, reload and stop."""
