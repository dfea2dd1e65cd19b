"""The balancer's errors: one hierarchy, and no HTTP in it.

    BalancerError                 every error the balancer raises on purpose
      ConfigError                 a config file or value that cannot be used (balancer.config.model)
      ListenError                 a listen address that cannot be bound (balancer.runtime.services)
      NotFound                    no such service or backend
      Conflict                    a change the running state refuses (already there, the last
                                  one, a stop under way, an address busy)
      InvalidInput                a value out of its bounds, or a backend that is the balancer
      BackendError                a backend failed a connection or a request
        ConnectTimeout, ConnectRefused, BackendReset, ResponseTimeout, BackendProtocolError

The core raises these; the admin endpoint alone turns them into HTTP statuses
(`balancer.admin.checks.http_status`). The message of each is `str(error)`.
"""

from __future__ import annotations


class BalancerError(Exception):
    """Every error the balancer raises on purpose."""


class NotFound(BalancerError):
    """No such service or backend."""


class Conflict(BalancerError):
    """A change the running state refuses: already there, the last one, a stop under way."""


class InvalidInput(BalancerError):
    """A value out of its bounds, or a backend that would be the balancer itself."""


class Unavailable(BalancerError):
    """A change that needs a service the balancer cannot reach now (as etcd): not made."""


class BackendError(BalancerError):
    """A backend failed a connection or a request."""


class ConnectTimeout(BackendError):
    """The backend did not accept the connection in time."""


class ConnectRefused(BackendError):
    """The backend refused the connection (nothing listens there)."""


class BackendReset(BackendError):
    """The backend closed or reset the connection with work in flight."""


class ResponseTimeout(BackendError):
    """The backend accepted the request and did not answer in time."""


class BackendProtocolError(BackendError):
    """The backend answered something the protocol does not allow."""
