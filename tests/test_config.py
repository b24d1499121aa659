from dataclasses import fields
from pathlib import Path

import pytest

from lmsprint.config import (
    SECTIONS,
    RunConfig,
    build_config,
    field_docs,
    help_lines,
    load_toml,
    parse_overrides,
    recipe_names,
    to_toml,
)
from lmsprint.errors import ConfigError


def test_overrides_both_spellings() -> None:
    assert parse_overrides(["--optim.lr=1e-3", "--optim.name", "lion"]) == [("optim.lr", "1e-3"),
                                                                             ("optim.name", "lion")]
    cfg = build_config(None, ["--optim.lr=1e-3", "--optim.name", "lion", "--train.compile=true",
                              "--optim.betas=0.9,0.99", "--train.micro_batch_size=none", "--train.steps=1e3"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.name == "lion" and cfg.train.compile is True
    assert cfg.optim.betas == [0.9, 0.99] and cfg.train.micro_batch_size is None and cfg.train.steps == 1000



def test_cli_takes_the_spaced_spelling_without_a_corpus(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``lmsprint train --optim.name lion``: the value is the override's, not the optional corpus argument."""
    from lmsprint.cli import main
    from lmsprint.config import join_spaced_overrides

    assert join_spaced_overrides(["--optim.name", "lion", "c.txt", "--resume", "r", "--data.seq_len", "64",
                                  "--optim.lr"]) == ["--optim.name=lion", "c.txt", "--resume", "r",
                                                     "--data.seq_len=64", "--optim.lr"]
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--optim.name", "nonesuch"])
    assert exit_.value.code == 2
    assert "unknown optimizer 'nonesuch'" in capsys.readouterr().err

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["schedule", "--optim.lr", "0.0123", "--train.steps", "100", "--at", "0,99", "--png", ""])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "peak 0.0123, 100 steps" in out and "plot:" not in out
    assert not list(tmp_path.iterdir())  # --png '' draws nothing

    # with a GPU, `lmsprint schedule` shows the schedule `lmsprint train` would use: the fast recipe's
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(SystemExit):
        main(["schedule", "--train.steps", "100", "--at", "0", "--png", ""])
    assert capsys.readouterr().out.startswith("wsd schedule")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optim.lr=abc"], "--optim.lr: expected a number"),
        (["--optim.lr=-1"], "--optim.lr must be a positive number"),
        (["--optim.lr=0"], "--optim.lr must be a positive number"),
        (["--train.steps=2.5"], "--train.steps: expected an integer"),
        (["--train.compile=maybe"], "expected true or false"),
        (["--train.fp8_head=fast"], "--train.fp8_head: expected true or false, got 'fast'"),
        (["--train.fused_ce=yes please"], "--train.fused_ce: expected true or false, got 'yes please'"),
        (["--train.fused_ce=true", "--train.fp8_head=true"], "--train.fused_ce and --train.fp8_head both replace"),
        (["--data.batching=zigzag"], "is not one of pack, pad, bucket, best-fit"),
        (["--train.nonsense=1"], "unknown config key 'train.nonsense'"),
        (["--bogus.key=1"], "unknown config key 'bogus.key'"),
        (["--model.preset=huge"], "unknown preset 'huge'"),
        (["--optim.name=sgd"], "unknown optimizer 'sgd'"),
        (["--train.batch_size=10", "--train.micro_batch_size=4"], "not divisible by --train.micro_batch_size=4"),
        (["--optim.lr"], "--optim.lr needs a value"),
        (["positional"], "unexpected argument 'positional'"),
        (["--schedule.min_lr=1.0", "--optim.lr=0.1"], "--schedule.min_lr=1.0 must be between 0 and the peak"),
        (["--optim.name=ademamix", "--optim.alpha=inf"], "--optim.alpha must be a finite number, got inf"),
        (["--optim.eps=inf"], "--optim.eps must be a finite number, got inf"),
        (["--optim.wd_horizon=nan"], "--optim.wd_horizon must be a finite number, got nan"),
        (["--optim.embed_weight_decay=-0.1"], "--optim.embed_weight_decay must be >= 0"),
        (["--optim.weight_decay_mode=horizon", "--optim.head_weight_decay=0"], "apply to --optim.weight_decay_mode"),
        (["--guard.spike_warmup=-5"], "--guard.spike_warmup must be >= 0"),
    ],
)
def test_invalid_values_name_the_flag(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(None, args)


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = build_config(None, ["--optim.betas=0.8,0.9", "--train.run_name=x", "--data.seq_milestones=5,10"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    again = build_config(str(path))
    assert again == cfg


def test_unknown_section_and_bad_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[modle]\nn_layer = 2\n")
    with pytest.raises(ConfigError, match=r"unknown section \[modle\]"):
        build_config(str(bad))
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_toml("no-such-recipe")


def test_every_recipe_is_valid() -> None:
    names = recipe_names()
    assert "tiny-cpu" in names
    for name in names:
        build_config(name)


def test_defaults_are_the_tiny_cpu_recipe() -> None:
    assert build_config("tiny-cpu") == RunConfig()


def test_every_field_is_documented() -> None:
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no docstring"
    assert any("--optim.lr" in line for line in help_lines())


def test_help_config_of_a_recipe_shows_and_checks_its_values(capsys: pytest.CaptureFixture) -> None:
    from lmsprint.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "fast", "--help-config"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("(defaults: --config fast)\n")
    preset = "  --model.preset auto|tiny|small|gpt2-124m|gpt2-350m (default 'gpt2-124m')"  # the recipe's
    assert preset in out.splitlines()
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "nosuch", "--help-config"])
    assert e.value.code == 2 and "config 'nosuch' not found" in capsys.readouterr().err
