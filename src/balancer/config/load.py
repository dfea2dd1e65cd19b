"""Loading a config file: TOML, JSON (both forms) or the tutorial's config.txt.

How it works: the file is read and decoded once; its extension picks the
parser (`.toml`, `.json`, anything else is the tutorial's text format). TOML
and the object form of JSON give the same nested mapping, which
`document.build` walks with `Table` readers: each knows its dotted key path
and its allowed keys. Nothing stops at the first problem: an unknown key, a
wrong type or an out-of-range value is recorded (`checks.Problems`) at its
exact key path, the default takes its place and the walk goes on, so an error
in one service does not hide one in the next. A value that must be a table
and is not (`health = 3`) stops the checks under it: there is nothing to
check. Checks that need several values (`hash_key` against `mode`, the checks
of `checks` across services) run only on values that were valid. At the end
`keylines` finds the line of each key path and one ConfigError lists every
problem, in line order.
"""

from __future__ import annotations

import os
from pathlib import Path

from balancer.config.addresses import parse_address
from balancer.config.bounds import show_value
from balancer.config.checks import Problems
from balancer.config.document import build
from balancer.config.errors import ConfigError
from balancer.config.keylines import json_lines, toml_lines
from balancer.config.model import DEFAULT_LISTEN, AdminConfig, Config
from balancer.config.reader import parse_json, parse_toml, read_text
from balancer.config.tutorial import parse_servers, parse_text


def load(source: str, default_listen: str, admin_listen: AdminConfig | None = None) -> Config:
    """`load_config`: read, parse and check `source`; one ConfigError lists every problem."""
    parse_address(
        default_listen,
        where="listen",
        source="<command line>",
        default_host="localhost",
        allow_port_zero=True,
    )
    text = read_text(source)
    problems = Problems(source)
    suffix = Path(source).suffix.lower()
    if suffix == ".toml":
        config = build(parse_toml(text, source), problems, default_listen, admin_listen)
        problems.raise_if_any(lambda: toml_lines(text))
    elif suffix == ".json":
        doc = parse_json(text, source)
        if not isinstance(doc, dict):
            raise ConfigError(
                source,
                "",
                f'expected a JSON object with "services" or "servers", got {show_value(doc)}',
            )
        if "servers" in doc and "services" not in doc:
            config = parse_servers(doc, problems, default_listen, admin_listen)
        else:
            config = build(doc, problems, default_listen, admin_listen)
        problems.raise_if_any(lambda: json_lines(text))
    else:
        config = parse_text(text, problems, default_listen, admin_listen)
        problems.raise_if_any()
    return config


def load_config(
    path: str | os.PathLike[str],
    *,
    default_listen: str = DEFAULT_LISTEN,
    admin_listen: AdminConfig | None = None,
) -> Config:
    """Read and validate a config file; raise one ConfigError listing every problem.

    `.toml` is the full format, `.json` is either the same structure or the
    tutorial's `{"servers": [...]}`, anything else is the tutorial's text
    format. Single-service formats listen on `default_listen`; so does a
    TOML service without `listen`. `admin_listen` (the command line's
    `--admin`) replaces the file's admin listen address and `enabled` before
    the checks across the file, so they judge the listeners that will be.
    """
    return load(os.fspath(path), default_listen, admin_listen)
