"""Every key the loader knows, by table.

The keys of a table are the fields of its dataclass in the model, in field
order: a host and port pair is the one `"host:port"` key (`listen`,
`address`), and the keys that hold tables or lists of them (`admin`,
`services`, `backends`, `health`, `outlier`) come last, by name.
"""

from __future__ import annotations

import typing
from dataclasses import fields, is_dataclass

from balancer.config.model import (
    AdminConfig,
    BackendConfig,
    Config,
    HealthConfig,
    OutlierConfig,
    ServiceConfig,
)


def _holds_tables(hint: object) -> bool:
    """A field of a config dataclass, or of a tuple of them."""
    if typing.get_origin(hint) is tuple:
        return any(is_dataclass(arg) for arg in typing.get_args(hint))
    return is_dataclass(hint)


def table_keys(
    cls: type, *, skip: tuple[str, ...] = (), address: tuple[str, str, str] | None = None
) -> tuple[str, ...]:
    """The keys of `cls`'s table; `address` is (key, host field, port field)."""
    hints = typing.get_type_hints(cls)
    settings: list[str] = []
    tables: list[str] = []
    for f in fields(cls):
        name = f.name
        if name in skip or (address is not None and name == address[2]):
            continue
        if address is not None and name == address[1]:
            name = address[0]
        (tables if _holds_tables(hints[f.name]) else settings).append(name)
    return (*settings, *sorted(tables))


TOP_KEYS = table_keys(Config, skip=("source",))
ADMIN_KEYS = table_keys(AdminConfig, address=("listen", "host", "port"))
SERVICE_KEYS = table_keys(
    ServiceConfig, skip=("name",), address=("listen", "listen_host", "listen_port")
)
OUTLIER_KEYS = table_keys(OutlierConfig)
HEALTH_KEYS = table_keys(HealthConfig)
BACKEND_KEYS = table_keys(BackendConfig, address=("address", "host", "port"))
SERVER_KEYS = table_keys(BackendConfig)

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
