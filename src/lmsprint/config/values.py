"""Config values: field docstrings and type names (the help text), parsing and checking a value against its
field's type (one rule, one message), and the ``--section.key value`` spelling of the command line."""

from __future__ import annotations

import ast
import inspect
import math
import re
import types
import typing
from functools import cache
from typing import Any, Literal, get_args, get_origin

from lmsprint.errors import ConfigError


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field to the docstring written under it (PEP 257 attribute docstrings)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _parse_scalar(text: str, tp: Any, key: str) -> Any:
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}: expected true or false, got {text!r}")
    if tp is int:
        try:
            return int(text)  # exact (a 20-digit seed stays itself)
        except ValueError:
            pass
        try:
            value = float(text)  # 1e3
        except (ValueError, OverflowError):
            raise ConfigError(f"--{key}: expected an integer, got {text!r}") from None
        if not value.is_integer():
            raise ConfigError(f"--{key}: expected an integer, got {text!r}")
        return int(value)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--{key}: expected a number, got {text!r}") from None
    if tp is str:
        return text
    raise ConfigError(f"--{key}: cannot parse {text!r} as {type_name(tp)}")


def coerce(value: Any, tp: Any, key: str, *, typed: bool = False) -> Any:
    """Check (and convert, for strings from the command line) ``value`` against the annotation ``tp``.

    ``typed``: ``value`` comes from a file with types of its own (a TOML recipe): a string is then only a string,
    never parsed as the number or boolean it spells (``steps = "10"`` is refused, as ``--train.steps=ten`` is).
    """
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, typed=typed)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"--{key}: invalid value {value!r}")
    if origin is Literal:
        check_choice(value, tp, key)
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str) and not typed:
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"--{key}: expected a list, got {value!r}")
        return [coerce(v, item_tp, key, typed=typed) for v in value]
    if isinstance(value, str) and tp is not str:
        if typed:
            raise ConfigError(f"--{key}: expected {_A[tp] if tp in _A else type_name(tp)}, got the string "
                              f"{value!r}; write the value without quotes")
        return _parse_scalar(value, tp, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"--{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"--{key}: expected an integer, got {value!r}")
    if tp is float and not isinstance(value, float):
        raise ConfigError(f"--{key}: expected a number, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"--{key}: expected a string, got {value!r}")
    return value


_A = {int: "an integer", float: "a number", bool: "true or false"}


NOUNS = {"model.preset": "preset", "optim.name": "optimizer"}
"""Name fields tied to a registry (tests/test_architecture.py): an unknown value is an unknown <noun>."""


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([hms])")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float | None:
    """Seconds of a duration written as ``90s``, ``10m``, ``2h``, ``1.5h`` or ``1h30m``; None if it is not one (or
    is not positive)."""
    text = text.strip().lower()
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text or len({u for _, u in parts}) < len(parts):
        return None
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    return seconds if seconds > 0 else None


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``ok``: one rule, one message."""
    if not ok:
        raise ConfigError(message)


def check_choice(value: Any, tp: Any, key: str) -> None:
    """``value`` is one of the ``Literal`` type ``tp``'s choices (``key``: the field, ``section.name``)."""
    choices = get_args(tp)
    if value not in choices:
        if key in NOUNS:
            raise ConfigError(f"--{key}: unknown {NOUNS[key]} {value!r}; choose from {', '.join(choices)}")
        raise ConfigError(f"--{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def check_fields(section: str, obj: Any) -> None:
    """The rules every field of a section follows (a config built in Python is not parsed): a ``Literal`` field
    holds one of its choices, a number is finite (inf and nan reach no useful run: an infinite init or soft-cap
    gives NaN weights, infinite epochs never end) and a string is UTF-8 text without NUL (as a path, a name and
    config.toml need)."""
    for name, tp in hints(type(obj)).items():
        key, value = f"{section}.{name}", getattr(obj, name)
        if get_origin(tp) is Literal:
            check_choice(value, tp, key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"--{key} must be a finite number, got {value}")
            if isinstance(v, str) and ("\0" in v or not _encodable(v)):
                raise ConfigError(f"--{key} must be text without NUL characters or lone surrogates, got {v!r}")


def _encodable(text: str) -> bool:
    """UTF-8 can hold it (as config.toml and file names must): no lone surrogates."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def join_spaced_overrides(args: list[str]) -> list[str]:
    """``--optim.name lion`` as ``--optim.name=lion`` (a ``--section.key`` followed by a value); other arguments as
    they are. The CLI does this before argparse, which would otherwise take ``lion`` for a positional argument."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg[2:]
        if (arg.startswith("--") and "." in name and "=" not in name and i + 1 < len(args)
                and not args[i + 1].startswith("--")):
            out.append(f"{arg}={args[i + 1]}")
            i += 2
        else:
            out.append(arg)
            i += 1
    return out
