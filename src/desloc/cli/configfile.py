"""``--config FILE`` and ``--print-config``: a (partial) TrainConfig dict read from TOML or JSON, in
the shape of a run's ``config.json`` (nested ``method``, ``inner``, ``data``, ``time``, ``ft``,
``model_overrides``), checked key by key against the configuration's fields, and the resolved
configuration written back as TOML.

Precedence is defaults < file < flags: :func:`desloc.cli.flags._train_config` starts from
:func:`desloc.config.unresolved_defaults` (or a resumed run's settings), lays the file over it with
:func:`overlay`, then the flags given. A field the file leaves out keeps its unresolved default, so
a file that sets ``method.period_x`` but not ``period_u`` gets K_u = 3 K_x, as ``--kx`` does; a value
the file gives (a config.json's resolved ``period_u = 48``) is taken as given.

TOML has no null: a sync period "never" is the string ``"none"`` (as the flags spell it), in TOML
and JSON alike; any other None is the default of its field and is left out (printed as a comment).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

from desloc.errors import ConfigError

FORMATS = {".toml": "TOML", ".json": "JSON"}
# fields whose None means "never sync": spelled "none" in a file (TOML has no null), as the flags do
_NEVER_FIELDS = ("method.period_u", "method.period_v")
_NEVER_LISTS = ("method.momentum_periods",)
INT64_MAX = 2**63 - 1


def read(path: Path) -> dict[str, Any]:
    """The file's values, parsed by extension (``.toml`` or ``.json``), checked against the
    configuration's fields (:func:`check`) and with "none" periods turned into None. Errors are one
    line naming the file (and, for a syntax error, the line and column)."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"--config {path}: unknown format {path.suffix or '(no extension)'!r}; a config file is "
                          "TOML (.toml) or JSON (.json), e.g. the config.json of a run")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot read it ({err})") from None
    try:
        if kind == "TOML":
            import tomllib

            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ValueError as err:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ConfigError(f"--config {path}: invalid {kind}: {_syntax(err)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: a config file holds a table of settings (a JSON object, like a run's "
                          f"config.json), got a {type(values).__name__}")
    check(values, path)
    return values


def _syntax(err: ValueError) -> str:
    """A decoder's message as ``line L, column C: what``, on one line."""
    if isinstance(err, json.JSONDecodeError):
        return f"line {err.lineno}, column {err.colno}: {err.msg}"
    msg = str(err)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)", msg)  # tomllib's spelling before Python 3.14
    if m:
        return f"line {m.group(1)}, column {m.group(2)}: {msg[:m.start()] + msg[m.end():]}"
    return " ".join(msg.split())


def schema() -> dict[str, Any]:
    """Every valid key with its default, nested as in config.json; ``ft`` (None by default) as
    FtConfig's fields. ``model_overrides`` lists the model fields (see :func:`check`)."""
    from desloc.config import unresolved_defaults
    from desloc.ft import FtConfig
    from desloc.model import GPTConfig

    d = unresolved_defaults()
    d["ft"] = dataclasses.asdict(FtConfig())
    d["model_overrides"] = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"}
    return d


def _annotations() -> dict[str, str]:
    """Dotted field -> its annotation as written (``"float | None"``), for int -> float coercion."""
    from desloc.config import TrainConfig

    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):  # annotations are strings (from __future__ import annotations)
            ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            out[prefix + f.name] = ann

    walk(TrainConfig, "")
    from desloc.algorithms import MethodConfig
    from desloc.data import DataConfig
    from desloc.ft import FtConfig
    from desloc.model import GPTConfig
    from desloc.optim import InnerConfig
    from desloc.timing import TimeConfig

    for name, cls in (("method", MethodConfig), ("inner", InnerConfig), ("data", DataConfig), ("time", TimeConfig),
                      ("ft", FtConfig), ("model_overrides", GPTConfig)):
        walk(cls, name + ".")
    return out


def check(values: dict[str, Any], path: Path) -> None:
    """Refuse an unknown key (with the closest valid one), a table where a value belongs and a value
    where a table belongs; in place: "none" -> None for sync periods, an integer -> a float for a
    float field (as a float flag parses it), and an integer beyond 64 bits refused."""
    valid = schema()
    floats = {k for k, ann in _annotations().items() if "float" in ann and "int" not in ann}
    dotted_all = sorted(_dotted(valid))

    def walk(node: dict[str, Any], spec: dict[str, Any], prefix: str) -> None:
        for key in list(node):
            name = prefix + str(key)
            if key not in spec:
                raise ConfigError(f"unknown key {name!r} in {path}; {_suggest(name, spec, prefix, dotted_all)}")
            value, default = node[key], spec[key]
            if isinstance(default, dict):
                if value is None and name == "ft":
                    continue
                if not isinstance(value, dict):
                    raise ConfigError(f"{name} in {path} is a table of settings ([{name}] in TOML, an object in "
                                      f"JSON), got {value!r}; e.g. {name}.{next(iter(default), 'field')} = ...")
                walk(value, default, name + ".")
                continue
            if isinstance(value, dict):
                raise ConfigError(f"{name} in {path} is one value, got a table {value!r}; e.g. {name} = "
                                  f"{_value(default) if default is not None else '...'}")
            node[key] = _normalize(name, value, name in floats, path)

    walk(values, valid, "")


def _normalize(name: str, value: Any, is_float: bool, path: Path) -> Any:
    def one(v: Any, never: bool) -> Any:
        if never and isinstance(v, str) and v.strip().lower() == "none":
            return None
        if isinstance(v, int) and not isinstance(v, bool):
            if abs(v) > INT64_MAX:
                raise ConfigError(f"{name} in {path} must fit a 64-bit integer (|n| <= {INT64_MAX}), got {v}")
            if is_float:
                return float(v)
        return v

    if isinstance(value, list):
        return [one(v, name in _NEVER_LISTS) for v in value]
    return one(value, name in _NEVER_FIELDS)


def _dotted(node: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out += _dotted(v, prefix + k + ".") if isinstance(v, dict) else [prefix + k]
    return out


def _suggest(name: str, spec: dict[str, Any], prefix: str, dotted_all: list[str]) -> str:
    """``did you mean 'method.period_x'?``: the closest key of the same table, else of any table
    (``lr`` at the top -> ``inner.lr``), else the table's keys."""
    key = name[len(prefix):]
    close = difflib.get_close_matches(key, list(spec), n=1)
    if close:
        return f"did you mean {prefix + close[0]!r}?"
    leaf = [d for d in dotted_all if d.rsplit(".", 1)[-1] == key]
    close = leaf or difflib.get_close_matches(name, dotted_all, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    where = f"[{prefix[:-1]}]" if prefix else "the top level"
    return f"the keys of {where} are {', '.join(sorted(spec))}"


def file_values(args: argparse.Namespace) -> dict[str, Any]:
    """The values of ``--config FILE`` ({} without one), read once per command (compare builds a
    configuration per method)."""
    path = getattr(args, "config", None)
    if path is None:
        return {}
    cached = getattr(args, "_config_values", None)
    if cached is None:
        cached = read(path)
        args._config_values = cached
    return json.loads(json.dumps(cached))  # a copy: callers overlay it into their own dicts


def drop(args: argparse.Namespace, keys: list[str]) -> list[str]:
    """Remove dotted ``keys`` from the values of ``--config FILE`` (a command that sets them itself
    ignores them); returns those the file set (to a value other than None)."""
    file_values(args)  # read and cached
    values = getattr(args, "_config_values", None) or {}
    found = []
    for key in keys:
        *tables, leaf = key.split(".")
        node = values
        for t in tables:
            node = node.get(t) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            if node.pop(leaf) is not None:
                found.append(key)
    return found


def overlay(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` laid over ``base`` in place, table by table (a table given in part keeps the other
    keys of ``base``); returns ``base``."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "model_overrides":
            overlay(base[key], value)
        elif isinstance(value, dict) and key == "model_overrides":
            base[key] = {**(base.get(key) or {}), **value}
        else:
            base[key] = value
    return base


# --- writing TOML ------------------------------------------------------------------------------

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _key(k: str) -> str:
    return k if _BARE.match(k) else _string(k)


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if v is None:
        return '"none"'  # only where None means "never" (see to_toml)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest repr that reads back to the same double: 0.003, 1e-08, 312.0
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} ({type(v).__name__}) as TOML")


def to_toml(config: dict[str, Any], header: str = "") -> str:
    """A TrainConfig dict (``TrainConfig.to_dict()``) as TOML that :func:`read` reads back to the same
    dict: scalars first, then one ``[table]`` per nested dict. None is ``"none"`` for a sync period
    (its "never") and a comment ``# key = none`` elsewhere (the field's default, left out)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]

    def body(node: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for k, v in node.items():
            if isinstance(v, dict):
                continue
            name = prefix + k
            if v is None and name not in _NEVER_FIELDS:
                out.append(f"# {_key(k)} = none")
            elif isinstance(v, list) and None in v and name not in _NEVER_LISTS:
                raise ValueError(f"{name} = {v!r}: TOML has no null in an array")
            else:
                out.append(f"{_key(k)} = {_value(v)}")
        return out

    def tables(node: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for k, v in node.items():
            if isinstance(v, dict):
                out += ["", f"[{prefix}{_key(k)}]", *body(v, prefix + k + "."), *tables(v, prefix + _key(k) + ".")]
        return out

    lines += body(config, "") + tables(config, "")
    return "\n".join(lines) + "\n"
