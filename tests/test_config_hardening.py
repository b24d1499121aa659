"""Config values that cannot work are refused up front, with one line naming the flag (issue 16): numbers that are
not finite in any field, recipe values of the wrong TOML type, run names no directory can have, a --config that
is not a file, an evaluation without a single target."""

from __future__ import annotations

import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import assert_clean_error

from lmsprint.config import SECTIONS, build_config
from lmsprint.config.values import hints
from lmsprint.errors import ConfigError

FLOAT_KEYS = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)
              if hints(cls)[f.name] in (float, float | None)]


def test_every_float_field_is_covered() -> None:
    assert {"train.epochs", "model.init_std", "model.logit_softcap", "optim.lr", "guard.ema"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_refused_in_every_field(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"--{key} must be a finite number, got"):
        build_config(None, [f"--{key}={value}"])


def test_non_finite_numbers_in_a_list_and_in_a_recipe_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--optim.betas must be a finite number, got \[0.9, inf\]"):
        build_config(None, ["--optim.betas=0.9,inf"])
    recipe = tmp_path / "r.toml"
    recipe.write_text("[model]\ninit_std = inf\n")
    with pytest.raises(ConfigError, match="--model.init_std must be a finite number, got inf"):
        build_config(str(recipe))


@pytest.mark.parametrize(("line", "message"), [
    ('steps = "10"', "--train.steps: expected an integer, got the string '10'; write the value without quotes"),
    ('clip_norm = "1.0"', "--train.clip_norm: expected a number, got the string '1.0'"),
    ('compile = "true"', "--train.compile: expected true or false, got the string 'true'"),
    ("steps = 10.0", "--train.steps: expected an integer, got 10.0"),
    ("steps = true", "--train.steps: expected an integer, got True"),
    ("run_name = 5", "--train.run_name: expected a string, got 5"),
])
def test_recipe_values_of_the_wrong_type_are_refused(tmp_path: Path, line: str, message: str) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"[train]\n{line}\n")
    with pytest.raises(ConfigError) as e:
        build_config(str(recipe))
    assert str(e.value).startswith(f"config {recipe}: {message}"), str(e.value)


def test_recipe_values_of_the_right_type_still_load(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\nsteps = 10\nclip_norm = 1\nepochs = "none"\n[optim]\nbetas = [0.8, 0.9]\n')
    cfg = build_config(str(recipe))
    assert cfg.train.steps == 10 and cfg.train.clip_norm == 1.0 and cfg.train.epochs is None
    assert cfg.optim.betas == [0.8, 0.9]
    # the command line spells every value as text: parsed there, as before
    assert build_config(None, ["--train.steps=10", "--train.clip_norm=1"]).train.steps == 10


@pytest.mark.parametrize(("name", "message"), [
    ("a\x00b", "--train.run_name must be text without NUL characters"),
    ("x" * 300, "--train.run_name is 300 bytes long; a directory name can have at most 255"),
    ("é" * 128, "--train.run_name is 256 bytes long"),
    ("tab\there", "--train.run_name must be a plain directory name (no '/', no control characters)"),
    ("bad\ud800", "--train.run_name must be text without NUL characters or lone surrogates"),
])
def test_run_names_no_directory_can_have_are_refused(name: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(None, [f"--train.run_name={name}"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_run_name_of_255_bytes_is_fine() -> None:
    assert build_config(None, ["--train.run_name=" + "x" * 255]).train.run_name == "x" * 255


def test_one_eval_token_is_refused() -> None:
    """One token has no next token: the validation loss would average over 0 targets ("0.0000")."""
    with pytest.raises(ConfigError, match="--train.eval_tokens must be at least 2"):
        build_config(None, ["--train.eval_tokens=1"])
    assert build_config(None, ["--train.eval_tokens=2"]).train.eval_tokens == 2


def _cli(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
         ) -> subprocess.CompletedProcess:
    from lmsprint.cli import main

    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as e:
        main(args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, e.value.code, captured.out, captured.err)


@pytest.mark.parametrize("command", ["train", "schedule", "data stats"])
def test_config_naming_a_directory_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture, command: str) -> None:
    (tmp_path / "recipes").mkdir()
    proc = _cli([*command.split(), "--config", "recipes"], tmp_path, monkeypatch, capsys)
    assert_clean_error(proc, "config 'recipes' is not a file; pass a TOML file or one of: baseline, fast")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes"]


def test_config_with_a_nul_byte_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    proc = _cli(["train", "--config", "a\x00b.toml"], tmp_path, monkeypatch, capsys)
    assert_clean_error(proc, "not found")
