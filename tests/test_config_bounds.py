"""Every bounded number of the config: generated from BOUNDS, so a new bound is covered too."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.config.bounds import Bound
from balancer.config.doc import BEGIN, END, bounds_table
from balancer.config.errors import ConfigError
from balancer.config.load import load_config
from balancer.config.model import BOUNDS, INTEGER_KEYS, Config
from balancer.config.policies import ALGORITHMS
from balancer.config.schema import TABLE_KEYS
from tests.config_files import named_files, write_named_files
from tests.support import write_config

ROOT = Path(__file__).resolve().parent.parent

SERVICE = (
    '[services.s]\nlisten = "127.0.0.1:0"\nalgorithm = "least_connections"\n'
    'backends = ["h:2", "h:1"]\n'
)
TOP = ("drain_timeout", "drain_close_window", "workers")
TLS_FILES = {"cert": "cert.pem", "key": "key.pem"}
"""What a `tls` table needs besides the number: files beside the config (see `pem_files`)."""

# every bounded number: BOUNDS, and each policy's options (as "policy:ALGORITHM.KEY")
NUMBERS: dict[str, tuple[Bound, bool]] = {
    name: (bound, name in INTEGER_KEYS) for name, bound in BOUNDS.items()
}
for _algorithm, _policy in ALGORITHMS.items():
    for _key, _spec in _policy.options.items():
        NUMBERS[f"policy:{_algorithm}.{_key}"] = (_spec.bound, _spec.integer)


def placed(name: str, value: str) -> tuple[str, str, int]:
    """A config setting `name` to the TOML `value`: (text, key path, line of the key)."""
    table, _, key = name.rpartition(".")
    if name.startswith("policy:"):
        algorithm = table.removeprefix("policy:")
        text = SERVICE.replace("least_connections", algorithm)
        text += f"[services.s.policy_options]\n{key} = {value}\n"
        return text, f"services.s.policy_options.{key}", 6
    if name in TOP:
        return f"{key} = {value}\n" + SERVICE, key, 1
    if table == "discovery":
        return f"[discovery]\n{key} = {value}\n" + SERVICE, name, 2
    if name == "weight":
        text = SERVICE.replace('"h:1"', f'{{ address = "h:1", weight = {value} }}')
        return text, "services.s.backends[1].weight", 4
    if table:
        extra = "base_ejection_time = 0.01\n" if name == "outlier.max_ejection_time" else ""
        if table == "tls":
            extra = "".join(f'{k} = "{v}"\n' for k, v in TLS_FILES.items())
        mode = 'mode = "http"\n' if table == "http" else ""
        text = SERVICE + mode + f"[services.s.{table}]\n{extra}{key} = {value}\n"
        return text, f"services.s.{name}", 6 + extra.count("\n") + bool(mode)
    if name == "max_buffered":  # it must hold a line of max_line bytes
        return SERVICE + f"max_line = 1\n{key} = {value}\n", f"services.s.{key}", 6
    return SERVICE + f"{key} = {value}\n", f"services.s.{key}", 5


def loaded(config: Config, name: str) -> object:
    svc = config.service("s")
    table, _, key = name.rpartition(".")
    if name.startswith("policy:"):
        return svc.policy_options[key]
    if name in TOP:
        return getattr(config, key)
    if table == "discovery":
        return getattr(config.discovery, key)
    if name == "weight":
        return svc.backends[1].weight
    if table:
        return getattr(getattr(svc, table), key)
    return getattr(svc, key)


@pytest.fixture(autouse=True)
def pem_files(tmp_path: Path) -> None:
    """The files `TLS_FILES` names, beside each test's config: dummies, since the loader
    only checks that they exist and are readable."""
    write_named_files(tmp_path, {"services": {"s": {"tls": TLS_FILES}}})


def toml_number(value: float, integer: bool) -> str:
    return str(int(value)) if integer else repr(float(value))


def edges(bound: Bound, integer: bool) -> list[float]:
    values: list[float] = [bound.low, bound.high]
    if integer:
        values = [math.ceil(bound.low), math.floor(bound.high)]
    return values + ([0] if bound.off else [])


def outside(bound: Bound, integer: bool) -> list[float]:
    """Numbers just outside the bound (below, above, and between 0 and low when off)."""
    step = 1 if integer else max(bound.low / 2, 1e-9)
    values = [bound.low - step, bound.high + step, bound.high * 10 + 1, -1]
    if bound.off and bound.low > step:
        values.append(bound.low - step)
    return [v for v in values if not bound.admits(v) and not (bound.off and v == 0)]


@pytest.mark.parametrize("name", sorted(NUMBERS))
def test_each_bounded_number_loads_at_its_edges(tmp_path: Path, name: str) -> None:
    bound, integer = NUMBERS[name]
    for value in edges(bound, integer):
        text, _, _ = placed(name, toml_number(value, integer))
        path = tmp_path / "c.toml"
        path.write_text(text)
        got = loaded(load_config(path), name)
        assert got == value, (name, value)
        if integer and not name.startswith("policy:"):  # policy options are kept as floats
            assert type(got) is int


WRONG_TYPES = ['"5"', "true", "[1]", "{ a = 1 }", "nan", "inf", "-inf", "1979-05-27"]


@pytest.mark.parametrize("name", sorted(NUMBERS))
def test_each_bounded_number_out_of_bounds_or_of_the_wrong_type_is_an_error(
    tmp_path: Path, name: str
) -> None:
    bound, integer = NUMBERS[name]
    values = [toml_number(v, integer) for v in outside(bound, integer)] + WRONG_TYPES
    if integer:
        values += ["1.5", repr(float(math.ceil(bound.low) or 1))]
    for value in values:
        text, where, line = placed(name, value)
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        err = info.value
        assert [(e.where, e.line) for e in err.errors] == [(where, line)], (name, value)
        if name.endswith("table_size"):
            assert err.message.startswith("expected a prime number from 2 to 524287")
        else:
            assert err.message.startswith(f"expected {bound.expected(integer)}, got "), err.message


# ---------------------------------------------------------------- any value at any number

TEXT = st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), max_size=4)
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(10**400), max_value=10**400),
        st.floats(),
        st.sampled_from([1e308, -1e308, 5e-324, 0.0, -0.0, 2**53 + 1]),
        TEXT,
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=6,
)


def toml_value(value: object) -> str | None:
    """`value` as TOML, or None when TOML cannot say it (null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        items = [toml_value(v) for v in value]
        return None if None in items else "[" + ", ".join(str(i) for i in items) + "]"
    assert isinstance(value, dict)
    pairs = [(json.dumps(k), toml_value(v)) for k, v in value.items()]
    if any(v is None for _, v in pairs):
        return None
    return "{ " + ", ".join(f"{k} = {v}" for k, v in pairs) + " }"


def json_doc(name: str, value: object) -> dict[str, object]:
    table, _, key = name.rpartition(".")
    doc = tomllib.loads(SERVICE)
    svc = doc["services"]["s"]
    if name.startswith("policy:"):
        svc["algorithm"] = table.removeprefix("policy:")
        svc["policy_options"] = {key: value}
    elif name in TOP:
        doc[key] = value
    elif table == "discovery":
        doc["discovery"] = {key: value}
    elif name == "weight":
        svc["backends"][1] = {"address": "h:1", "weight": value}
    elif table:
        svc[table] = {key: value}
        if table == "http":
            svc["mode"] = "http"
        if name == "outlier.max_ejection_time":
            svc[table]["base_ejection_time"] = 0.01
        if table == "tls":
            svc[table] = {**TLS_FILES, key: value}
    else:
        svc[key] = value
        if name == "max_buffered":
            svc["max_line"] = 1
    return doc


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(sorted(NUMBERS)), value=JSON_VALUES, form=st.sampled_from(["json", "toml"])
)
def test_any_value_at_any_number_loads_within_its_bound_or_names_that_key(
    tmp_path: Path, name: str, value: object, form: str
) -> None:
    if form == "toml":
        text = toml_value(value)
        if text is None:
            return
        doc_text, where, _ = placed(name, text)
        path = tmp_path / "c.toml"
    else:
        doc_text = json.dumps(json_doc(name, value))
        where = placed(name, "0")[1]
        path = tmp_path / "c.json"
    path.write_text(doc_text)
    bound, integer = NUMBERS[name]
    try:
        config = load_config(path)
    except ConfigError as exc:
        errors = [e.where for e in exc.errors]
    else:
        errors = []
    if errors:
        assert errors == [where], (name, value)
        return
    got = loaded(config, name)
    assert isinstance(got, int | float)
    assert not isinstance(got, bool)
    assert bound.admits(got)
    assert got == value
    if integer:
        assert float(got).is_integer()


# ---------------------------------------------------------------- the configuration guide


def guide() -> str:
    return (ROOT / "docs" / "config-guide.md").read_text(encoding="utf-8")


def test_the_guides_table_of_bounds_is_the_generated_one() -> None:
    """Regenerate with `python -m balancer.config.doc --write docs/config-guide.md`."""
    text = guide()
    start = text.index(BEGIN) + len(BEGIN)
    assert text[start : text.index(END, start)].strip("\n") == bounds_table()


def test_the_bounds_table_lists_every_bounded_number() -> None:
    rows = bounds_table().splitlines()[2:]
    assert len(rows) == len(NUMBERS)
    for name in BOUNDS:
        assert any(row.startswith(f"| `{name.rpartition('.')[2]}` |") for row in rows), name


def test_the_guides_example_loads_and_sets_every_key(tmp_path: Path) -> None:
    text = guide()
    start = text.index("```toml\n", text.index("## Configuration")) + len("```toml\n")
    example = text[start : text.index("```", start)]
    doc = tomllib.loads(example)
    guide_dir = tmp_path / "guide"
    guide_dir.mkdir()
    path = guide_dir / "example.toml"
    path.write_text(example)
    with pytest.raises(ConfigError) as info:  # the certificates it names are not there yet
        load_config(path)
    errors = info.value.errors
    assert all("no such file" in e.message for e in errors)
    assert len(errors) == len(named_files(doc)) > 0
    files = write_named_files(guide_dir, doc)  # dummies: the loader checks they exist
    config = load_config(path)
    assert config.services
    tls_paths = set()
    for svc in config.services:
        if svc.tls is not None:
            tls_paths |= {svc.tls.client_ca} | {p for c in svc.tls.certs for p in (c.cert, c.key)}
        if svc.backend_tls is not None:
            b = svc.backend_tls
            tls_paths |= {b.ca, b.client_cert, b.client_key}
    assert tls_paths - {""} == {str(f) for f in files}
    etcd_start = text.index("```toml\n", text.index("### etcd discovery")) + len("```toml\n")
    etcd_example = text[etcd_start : text.index("```", etcd_start)]
    etcd = load_config(write_config(tmp_path, "etcd.toml", etcd_example)).discovery
    assert etcd is not None
    assert (etcd.kind, len(etcd.endpoints)) == ("etcd", 3)
    seen: dict[str, set[str]] = {
        "": set(doc),
        "admin": set(doc["admin"]),
        "discovery": set(doc.get("discovery", {})) | set(tomllib.loads(etcd_example)["discovery"]),
    }
    for svc in doc["services"].values():
        seen.setdefault("services.NAME", set()).update(svc)
        for sub in ("health", "outlier", "http"):
            seen.setdefault(f"services.NAME.{sub}", set()).update(svc.get(sub, {}))
        for sub in ("tls", "backend_tls"):
            seen.setdefault(f"services.NAME.{sub}", set()).update(svc.get(sub, {}))
        for cert in svc.get("tls", {}).get("certs", []):
            seen.setdefault("services.NAME.tls.certs[]", set()).update(cert)
        for route in svc.get("routes", []):
            seen.setdefault("services.NAME.routes[]", set()).update(route)
        for route in svc.get("sni_routes", []):
            seen.setdefault("services.NAME.sni_routes[]", set()).update(route)
        for backend in svc["backends"]:
            if isinstance(backend, dict):
                seen.setdefault("services.NAME.backends[]", set()).update(backend)
    for table, keys in TABLE_KEYS.items():
        if table != "servers[]":
            assert seen[table] == set(keys), table
