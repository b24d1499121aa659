"""Run configuration: typed section dataclasses, TOML recipes, ``--section.key=value`` overrides, validation.

A run is described by one :class:`RunConfig`. Each section is a dataclass whose field docstrings are the
``--help`` text and the generated config reference (``docs/config.md``). Values are resolved in this order:
dataclass defaults, then a TOML recipe (``--config fast`` or ``--config path.toml``), then command-line
overrides. The resolved config is saved in the run directory as ``config.toml``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lmsprint.config.sections import (
    DataConfig,
    DistConfig,
    GuardConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from lmsprint.config.values import (
    NOUNS,
    check_choice,
    coerce,
    field_docs,
    hints,
    join_spaced_overrides,
    parse_duration,
    type_name,
)
from lmsprint.errors import ConfigError

RECIPES_DIR = Path(__file__).parent.parent / "configs"

__all__ = [
    "NOUNS",
    "RECIPES_DIR",
    "SECTIONS",
    "DataConfig",
    "DistConfig",
    "GuardConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "build_config",
    "check_choice",
    "coerce",
    "field_docs",
    "help_lines",
    "join_spaced_overrides",
    "load_toml",
    "parse_duration",
    "parse_overrides",
    "recipe_names",
    "set_value",
    "to_toml",
    "type_name",
    "update",
    "validate",
]


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "guard": GuardConfig,
    "log": LogConfig,
    "dist": DistConfig,
}


@dataclass
class RunConfig:
    """Everything that describes a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> RunConfig:
        cfg = cls()
        update(cfg, data, where=where)
        return cfg


def set_value(cfg: RunConfig, dotted: str, value: Any, *, typed: bool = False) -> None:
    """Set ``section.key`` on ``cfg``, converting and type-checking ``value`` (``typed``: a value of a TOML file,
    see :func:`~lmsprint.config.values.coerce`)."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key:
        raise ConfigError(f"unknown config key {dotted!r}; keys look like section.key with section one of "
                          f"{', '.join(SECTIONS)}")
    cls = SECTIONS[section]
    types = hints(cls)
    if key not in types:
        raise ConfigError(f"unknown config key {dotted!r}; {section} has: {', '.join(types)}")
    setattr(getattr(cfg, section), key, coerce(value, types[key], dotted, typed=typed))


def update(cfg: RunConfig, data: dict[str, Any], *, where: str) -> None:
    """Apply a nested ``{section: {key: value}}`` mapping (a parsed TOML file) to ``cfg``."""
    for section, values in data.items():
        if section not in SECTIONS:
            shown = section if section.isprintable() else repr(section)
            raise ConfigError(f"{where}: unknown section [{shown}]; choose from {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{section}] must be a table of key = value lines")
        for key, value in values.items():
            try:
                set_value(cfg, f"{section}.{key}", value, typed=True)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# TOML files and command-line overrides


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long, or with a NUL byte: no such file either
        return False


def load_toml(path_or_name: str) -> dict[str, Any]:
    """Read a recipe: a path to a TOML file or the name of a shipped recipe (see ``configs/``)."""
    path = Path(path_or_name)
    if not _exists(path) and not path.suffix:
        path = RECIPES_DIR / f"{path_or_name}.toml"
    if not _exists(path):
        raise ConfigError(f"config {path_or_name!r} not found; pass a TOML file or one of: {', '.join(recipe_names())}")
    if not path.is_file():
        raise ConfigError(f"config {path_or_name!r} is not a file; pass a TOML file or one of: "
                          f"{', '.join(recipe_names())}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path}: not valid TOML ({str(e).splitlines()[0]}); fix the file") from None
    except OSError as e:
        raise ConfigError(f"config {path}: cannot be read ({e.strerror or e}); check the path") from None


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Turn ``["--optim.lr=1e-3", "--optim.name", "lion"]`` into ``[("optim.lr", "1e-3"), ...]``."""
    pairs: list[tuple[str, str]] = []
    for arg in join_spaced_overrides(args):
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            section, _, name = key.partition(".")
            is_bool = section in SECTIONS and hints(SECTIONS[section]).get(name) is bool
            hint = f"--{key}=true" if is_bool else f"--{key}=VALUE"
            raise ConfigError(f"--{key} needs a value, e.g. {hint}")
        pairs.append((key, value))
    return pairs


def build_config(recipe: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the recipe, then the overrides; validated."""
    cfg = RunConfig()
    if recipe is not None:
        update(cfg, load_toml(recipe), where=f"config {recipe}")
    for key, value in parse_overrides(overrides or []):
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def _escape(char: str) -> str:
    code = ord(char)
    return {'"': '\\"', "\\": "\\\\"}.get(char) or (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def to_toml(cfg: RunConfig) -> str:
    """Serialise a config as TOML that :func:`load_toml` reads back to the same values (None is omitted)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
        if isinstance(v, str):  # a basic string: quotes, backslashes and control characters escaped
            return '"' + "".join(c if c.isprintable() and c not in '"\\' else _escape(c) for c in v) + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} to TOML")

    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# validation and help


def validate(cfg: RunConfig) -> None:
    """Reject values that cannot work, naming the flag and what would: every section's own checks."""
    cfg.model.check()
    cfg.data.check()
    cfg.optim.check()
    cfg.schedule.check(peak_lr=cfg.optim.lr)
    cfg.train.check()
    cfg.guard.check()
    cfg.log.check()
    cfg.dist.check()


def help_lines(values: RunConfig | None = None) -> list[str]:
    """``--section.key TYPE (default X): doc`` for every field, for ``lmsprint train --help-config``; the defaults
    are ``values`` (a recipe's, with ``--config``) or the dataclass defaults."""
    out: list[str] = []
    defaults = values or RunConfig()
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        out.append(f"[{section}] {inspect.getdoc(cls)}")
        for f in fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            out.append(f"  --{section}.{f.name} {type_name(hints(cls)[f.name])} (default {default!r})")
            out.append(f"      {docs.get(f.name, '')}")
    return out
