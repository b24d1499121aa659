"""Property-based fuzzing of the config: any command-line overrides and any recipe file end in a valid config or in
one :class:`~lmsprint.errors.ConfigError` line, never in another exception; and a valid config's ``config.toml``
reads back to the same config (a resume reads it).

Derandomized with a bounded number of examples, so CI runs the same cases every time, in seconds.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lmsprint.config import SECTIONS, RunConfig, build_config, to_toml  # noqa: E402
from lmsprint.config.values import hints  # noqa: E402
from lmsprint.errors import ConfigError  # noqa: E402
from lmsprint.training.run import preflight  # noqa: E402

KEYS = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)]
SETTINGS = settings(max_examples=250, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# values that have broken parsers before: non-finite and huge numbers, NULs, surrogates, list syntax, none
SPECIAL = ["inf", "-inf", "nan", "1e400", "-0", "0", "-1", "1e-320", "9" * 5000, "", " ", "none", "null", "true",
           "false", "maybe", "[1,2]", "[", "]", ",", "1,2,3", "0.9,0.95", "\x00", "a\x00b", "\ud800", "x" * 300,
           "../x", "/", ".", "~", "1_000", "0x10", "1e3", "2.5", "tiny", "adamw", "muon", "wsd", "pack", "cpu"]
text_values = st.one_of(st.sampled_from(SPECIAL), st.text(max_size=12), st.integers().map(str),
                        st.floats().map(repr), st.lists(st.floats(), max_size=4).map(lambda v: ",".join(map(str, v))))
toml_scalars = st.one_of(st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
                         st.floats(), st.text(max_size=12), st.sampled_from(SPECIAL))
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=4),
                        st.dictionaries(st.text(max_size=5), toml_scalars, max_size=2))


def _plausible(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a field's own type, mostly in a useful range (so that many examples are valid configs)."""
    origin = get_origin(tp)
    if origin is Literal:
        return st.sampled_from(get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return st.one_of(*[_plausible(a) for a in get_args(tp) if a is not type(None)])
    if origin is list:
        return st.lists(_plausible(get_args(tp)[0]), max_size=3)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(min_value=-1, max_value=300)
    if tp is float:
        return st.one_of(st.floats(min_value=0, max_value=1), st.floats(min_value=0, max_value=1),
                         st.floats(min_value=-10, max_value=1e4), st.sampled_from([math.inf, -math.inf, math.nan]))
    return st.text(max_size=10)


def _as_text(value: Any) -> str:
    """How the command line spells a value."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def _field(key: str) -> st.SearchStrategy[Any]:
    section, name = key.split(".")
    return _plausible(hints(SECTIONS[section])[name])


typed_pair = st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), _field(k).map(_as_text)))
any_pair = st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), text_values)
overrides = st.lists(st.one_of(typed_pair, typed_pair, typed_pair, any_pair), max_size=6)


def _section_body(section: str) -> st.SearchStrategy[dict[str, Any]]:
    """A recipe's [section]: fields with values of their type, sometimes a wrong key or a value of any type."""
    names = [f.name for f in fields(SECTIONS[section])]
    typed = st.lists(st.sampled_from(names).flatmap(lambda n: st.tuples(st.just(n), _field(f"{section}.{n}"))),
                     max_size=6)
    junk = st.one_of(st.just([]), st.just([]), st.just([]),
                     st.lists(st.tuples(st.one_of(st.sampled_from(names), st.text(max_size=6)), toml_values),
                              min_size=1, max_size=2))
    return st.tuples(typed, junk).map(lambda parts: dict(parts[0] + parts[1]))


recipes = st.one_of(
    st.lists(st.sampled_from(list(SECTIONS)).flatmap(lambda sec: st.tuples(st.just(sec), _section_body(sec))),
             max_size=4).map(dict),
    st.dictionaries(st.text(max_size=6), st.one_of(st.dictionaries(st.text(max_size=6), toml_values, max_size=3),
                                                   toml_scalars), max_size=3))


def _toml(value: Any) -> str:
    """A TOML literal of any value the strategies make (floats as TOML spells inf and nan)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return ("nan" if math.isnan(value) else "inf" if value > 0 else "-inf") if not math.isfinite(value) \
            else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + "}"


def _recipe_text(recipe: dict[str, Any]) -> str:
    lines = []
    for section, body in recipe.items():
        if isinstance(body, dict):
            lines.append(f"[{_toml(section)}]")
            lines += [f"{_toml(k)} = {_toml(v)}" for k, v in body.items()]
        else:
            lines.insert(0, f"{_toml(section)} = {_toml(body)}")
    return "\n".join(lines) + "\n"


def _outcome(recipe: str | None, args: list[str]) -> RunConfig | None:
    """The config, or None after a one-line ConfigError; any other exception fails the test."""
    try:
        cfg = build_config(recipe, args)
        preflight(cfg, world=1)
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, repr(message)
        return None
    return cfg


def _reads_back(cfg: RunConfig) -> None:
    """A run's config.toml is the config again (``--resume`` builds the run from it)."""
    assert RunConfig.from_dict(tomllib.loads(to_toml(cfg)), where="config.toml") == cfg


@SETTINGS
@given(overrides)
def test_any_overrides_give_a_config_or_one_error_line(pairs: list[tuple[str, str]]) -> None:
    args = [f"--{key}={value}" for key, value in pairs]
    cfg = _outcome(None, args)
    if cfg is not None:
        _reads_back(cfg)


@SETTINGS
@given(recipes, overrides)
def test_any_recipe_file_gives_a_config_or_one_error_line(tmp_path: Path, recipe: dict[str, Any],
                                                           pairs: list[tuple[str, str]]) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(_recipe_text(recipe))
    cfg = _outcome(str(path), [f"--{key}={value}" for key, value in pairs[:1]])
    if cfg is not None:
        _reads_back(cfg)


@SETTINGS
@given(st.binary(max_size=200))
def test_any_bytes_as_a_recipe_give_a_config_or_one_error_line(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "recipe.toml"
    path.write_bytes(raw)
    _outcome(str(path), [])


@pytest.mark.parametrize("recipe", ["tiny-cpu", "fast", "baseline", "gpt2-124m"])
def test_shipped_recipes_read_back(recipe: str) -> None:
    _reads_back(build_config(recipe))
