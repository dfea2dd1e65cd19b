"""Reading a config file: its text, and TOML or JSON parsed with the line of an error."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from balancer.config.errors import ConfigError

_TOML_POSITION_RE = re.compile(
    r"^(?P<msg>.*?)\s*\(at (?P<where>line \d+, column \d+|end of document)\)$"
)
_LONG_INT_RE = re.compile(r"[0-9](?:_?[0-9]){4300,}")


def read_text(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            path,
            f"line {line}",
            f"cannot read: expected UTF-8 text, got byte {data[exc.start]:#04x}",
        ) from None


def _long_int_error(text: str, source: str, kind: str) -> ConfigError:
    """The error for an integer too long for Python to read (over 4300 digits)."""
    m = _LONG_INT_RE.search(text)
    where = f"line {text.count(chr(10), 0, m.start()) + 1}" if m else ""
    return ConfigError(
        source, where, f"invalid {kind}: expected a number of at most 4300 digits, got a longer one"
    )


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_POSITION_RE.match(str(exc))
        where, message = (match["where"], match["msg"]) if match else ("", str(exc))
        raise ConfigError(source, where, f"invalid TOML: {message}") from None
    except ValueError:
        raise _long_int_error(text, source, "TOML") from None
    except RecursionError:
        raise ConfigError(source, "", "invalid TOML: arrays or tables nested too deeply") from None


def parse_json(text: str, source: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            source, f"line {exc.lineno}, column {exc.colno}", f"invalid JSON: {exc.msg}"
        ) from None
    except ValueError:
        raise _long_int_error(text, source, "JSON") from None
    except RecursionError:
        raise ConfigError(source, "", "invalid JSON: arrays or objects nested too deeply") from None
