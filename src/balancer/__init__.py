"""balancer: a fast, fault-tolerant TCP load balancer."""

from balancer import native

__version__ = "0.1.0"

native.install_finder()
