"""Programs beside the balancer: load client, sample service, status, demo."""
