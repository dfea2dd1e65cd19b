"""balancer: a fast, fault-tolerant TCP load balancer."""

__version__ = "0.1.0"
