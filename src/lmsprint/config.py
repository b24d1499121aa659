"""Run configuration: typed section dataclasses, TOML recipes, ``--section.key=value`` overrides, validation.

A run is described by one :class:`RunConfig`. Each section is a dataclass whose field docstrings are the
``--help`` text and the generated config reference (``docs/config.md``). Values are resolved in this order:
dataclass defaults, then a TOML recipe (``--config fast`` or ``--config path.toml``), then command-line
overrides. The resolved config is saved in the run directory as ``config.toml``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from lmsprint.errors import ConfigError

RECIPES_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    """The network: size preset and architecture options."""

    preset: str = "tiny"
    """Named size: tiny (~1.4M params with a 4K vocabulary, CPU), small (~30M), gpt2-124m (GPT-2 small shape),
    gpt2-350m (GPT-2 medium shape)."""
    n_layer: int | None = None
    """Number of transformer blocks (overrides the preset)."""
    n_head: int | None = None
    """Number of attention heads (overrides the preset)."""
    n_embd: int | None = None
    """Residual stream width (overrides the preset)."""
    pos_emb: Literal["rope", "learned"] = "rope"
    """Position encoding: rotary (rope) or GPT-2's learned absolute embeddings (learned)."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer used before attention, before the MLP and at the end."""
    mlp: Literal["gelu", "swiglu", "relu2"] = "swiglu"
    """MLP type: GELU (GPT-2), SwiGLU (Llama) or squared ReLU (modded-nanogpt)."""
    mlp_hidden: int | None = None
    """MLP hidden width; default 4 x n_embd for gelu/relu2 and 8/3 x n_embd (rounded to 64) for swiglu."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head before attention (stabilises high learning rates)."""
    logit_softcap: float = 0.0
    """If > 0, squash logits as cap * tanh(logits / cap) before the loss (0 = off)."""
    rope_base: float = 10000.0
    """Rotary embedding base (theta)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of linear and embedding weights."""
    zero_init_proj: bool = False
    """Initialise residual output projections to zero instead of init_std / sqrt(2 n_layer)."""
    vocab_multiple: int = 64
    """Pad the vocabulary (embedding rows) to a multiple of this, for tensor-core friendly matmuls."""


@dataclass
class DataConfig:
    """Corpus, tokenizer and batching."""

    source: str = "stdlib"
    """Training text: a named dataset (stdlib, tinyshakespeare), a prepared data directory, a file, a directory
    or a glob of .txt/.jsonl/.parquet files (optionally .gz/.xz/.bz2/.zst), or a Hugging Face datasets
    directory (save_to_disk)."""
    val_source: str | None = None
    """Separate validation text; if unset, val_fraction of the documents is held out."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation when there is no val_source (whole documents)."""
    text_docs: Literal["auto", "file", "paragraph"] = "auto"
    """How .txt files split into documents: one per file, one per blank-line separated paragraph, or auto
    (a single file splits by paragraph, several files are one document each)."""
    tokenizer: str = "bpe"
    """bpe (train a byte-level BPE on the corpus), byte (raw UTF-8 bytes) or a path to a tokenizer.json."""
    vocab_size: int = 4096
    """Vocabulary size when training a BPE tokenizer."""
    cache_dir: str | None = None
    """Where prepared shards are cached (default $LMSPRINT_CACHE or ~/.cache/lmsprint)."""
    seq_len: int = 256
    """Maximum sequence length (tokens per row); also the model's maximum position."""
    batching: Literal["pack", "pad", "bucket", "best-fit"] = "pack"
    """pack: concatenate documents and cut fixed rows; pad: one document per row, padded; bucket: like pad
    with rows grouped by length; best-fit: whole documents placed into rows by best-fit decreasing."""
    doc_mask: bool = False
    """With pack: tokens attend only within their own document and positions restart at each document."""
    pad_multiple: int = 64
    """pad/bucket: rows are padded to the batch's longest row rounded up to a multiple of this."""
    bucket_window: int = 64
    """bucket: number of batches whose rows are sorted by length together."""
    seq_schedule: Literal["none", "linear", "stages", "tokens"] = "none"
    """Sequence-length curriculum: grow from seq_start to seq_len linearly, in doubling stages, or at
    token milestones. Shapes stay fixed: short sequences are segments of a full row, so nothing recompiles."""
    seq_start: int = 64
    """First sequence length of the curriculum (must divide seq_len)."""
    seq_warmup: float = 0.25
    """linear/stages: fraction of the training steps over which the length grows to seq_len."""
    seq_milestones: list[int] = field(default_factory=list)
    """tokens: training-token counts at which the length doubles (from seq_start up to seq_len)."""
    seq_multiple: int = 64
    """linear: lengths are rounded down to a multiple of this (a power of two dividing seq_len)."""
    short_mix: float = 0.0
    """After the curriculum ends, the fraction of rows still cut into seq_start-long sequences."""
    workers: int = 0
    """Processes used by prepare (0 = all cores)."""


@dataclass
class OptimConfig:
    """Optimizer and its hyperparameters."""

    name: str = "adamw"
    """adamw, lion, soap, ademamix or muon (Muon for hidden matrices, AdamW for the rest)."""
    lr: float = 3e-3
    """Peak learning rate of the main (hidden-matrix) group."""
    embed_lr: float | None = None
    """Peak learning rate of the embeddings (default: lr)."""
    head_lr: float | None = None
    """Peak learning rate of an untied output head (default: lr)."""
    scalar_lr: float | None = None
    """Peak learning rate of norm gains and other 1-D tensors (default: lr)."""
    betas: list[float] | None = None
    """Moment decay rates (two values; three for ademamix: beta1, beta2, beta3). Default: the paper's."""
    eps: float = 1e-8
    """Denominator epsilon of Adam-type updates."""
    weight_decay: float = 0.1
    """Decoupled weight decay of every tensor with 2+ dimensions, embeddings included (nanoGPT's rule); norm
    gains and biases get none."""
    embed_weight_decay: float | None = None
    """Weight decay of the embeddings (default: weight_decay; 0 exempts them). fixed mode only."""
    head_weight_decay: float | None = None
    """Weight decay of an untied output head (default: weight_decay). fixed mode only."""
    weight_decay_mode: Literal["fixed", "horizon"] = "fixed"
    """fixed: use weight_decay as given; horizon: set it so 1/(lr*wd) = wd_horizon x total steps."""
    wd_horizon: float = 0.1
    """horizon mode: the AdamW averaging timescale tau_iter = 1/(lr*wd) as a fraction of total steps."""
    impl: Literal["auto", "for", "foreach", "fused"] = "auto"
    """Kernel path: per-tensor loop, foreach (multi-tensor) or fused; auto picks the fastest available."""
    momentum: float = 0.95
    """muon: momentum coefficient."""
    nesterov: bool = True
    """muon: use Nesterov momentum."""
    ns_steps: int = 5
    """muon: Newton-Schulz iterations."""
    momentum_warmup: int = 0
    """muon: steps over which momentum rises from 0.85 to its value (0 = off)."""
    precondition_frequency: int = 10
    """soap: steps between eigenbasis refreshes."""
    max_precond_dim: int = 10000
    """soap: dimensions larger than this (e.g. the vocabulary) are left unpreconditioned."""
    alpha: float = 5.0
    """ademamix: weight of the slow EMA."""
    alpha_warmup: int | None = None
    """ademamix: steps of the alpha warm-up (default: the whole run)."""
    beta3_warmup: int | None = None
    """ademamix: steps of the beta3 warm-up (default: the whole run)."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up, then a decay shape down to a floor."""

    name: Literal["cosine", "sqrt", "linear", "constant", "wsd"] = "cosine"
    """Decay shape after warm-up; wsd is warmup-stable-decay with a cool-down of decay_fraction."""
    warmup_steps: int | None = None
    """Warm-up length in optimizer steps (overrides warmup_fraction)."""
    warmup_fraction: float = 0.01
    """Warm-up length as a fraction of the run (typical 0.001-0.02)."""
    start_factor: float = 0.1
    """Warm-up starts at start_factor x peak lr."""
    min_lr: float | None = None
    """Absolute lr floor reached at the last step (overrides min_lr_ratio)."""
    min_lr_ratio: float = 0.1
    """lr floor as a fraction of the peak."""
    decay_fraction: float = 0.2
    """wsd: fraction of the run spent cooling down."""
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    """wsd: shape of the cool-down."""


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 500
    """Optimizer steps (ignored when epochs is set)."""
    epochs: float | None = None
    """If set, train for this many passes over the training tokens (sets steps)."""
    stop_at_step: int | None = None
    """End the run at this step (evaluated and checkpointed) while the schedule still spans the whole run, so
    --resume continues it exactly as if it had never stopped (random-restart probes use this)."""
    batch_size: int = 16
    """Global batch in rows of seq_len tokens per optimizer step (same for any number of GPUs)."""
    micro_batch_size: int | None = None
    """Rows per forward pass on each process (default: batch_size / world size); gradient accumulation
    makes up the rest."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto uses CUDA when available."""
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-pure"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU. bf16-pure keeps bf16 weights with fp32 optimizer state."""
    compile: bool = False
    """torch.compile the transformer blocks and the loss head."""
    flex_attention: bool = True
    """Document masks through FlexAttention on compiled CUDA runs (else SDPA with a dense mask)."""
    seed: int = 1337
    """Seed of the initial weights and the data order."""
    eval_every: int = 100
    """Evaluate every this many steps (and at the end); 0 = only at the end."""
    eval_tokens: int = 32768
    """Validation tokens per evaluation (a fixed set, the same every time)."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    ckpt_every: int = 200
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep (with the guard on, also the newest one that passed it)."""
    clip_norm: float = 1.0
    """Clip gradients to this global L2 norm (0 = off)."""
    clip_value: float = 0.0
    """Clip each gradient element to [-clip_value, clip_value] (0 = off)."""
    out_dir: str = "runs"
    """Parent directory of run directories."""
    run_name: str | None = None
    """Run directory name (default: a timestamp)."""
    peak_tflops: float | None = None
    """Dense bf16 peak of the GPU for MFU (default: measured once and cached)."""


@dataclass
class GuardConfig:
    """Non-finite and loss-spike protection."""

    enabled: bool = True
    """Skip steps whose loss or gradient norm is NaN/inf (one host sync per step)."""
    max_bad_steps: int = 3
    """Roll back to the last good checkpoint after this many bad steps in a row."""
    spike_factor: float = 0.0
    """Roll back when the loss exceeds this multiple of its moving average (0 = off)."""
    spike_warmup: int = 50
    """Steps before spike detection starts (the moving average needs history)."""
    ema: float = 0.95
    """Decay of the loss moving average used by spike detection."""
    rollback_lr_factor: float = 1.0
    """Multiply the learning rate by this after each rollback (1 = unchanged)."""
    rollback_reseed: bool = True
    """Reshuffle the data order after a rollback so the same batches are not replayed."""
    max_rollbacks: int = 5
    """Give up (stop the run with an error) after this many rollbacks."""


@dataclass
class LogConfig:
    """Metrics, plots and progress output."""

    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = False
    """Also write TensorBoard event files to the run directory (needs the tensorboard package)."""
    plot: bool = True
    """Draw loss.png (train/val loss and lr) at the end of the run."""


@dataclass
class DistConfig:
    """Multi-GPU training through torch.distributed."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp (replicated weights) or fsdp (FSDP2 fully_shard per block, then the root)."""


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


# ----------------------------------------------------------------------------------------------------------
# docstrings, types and value parsing


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
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
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
            value = float(text)
        except ValueError:
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
    raise ConfigError(f"--{key}: cannot parse {text!r} as {_type_name(tp)}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and convert, for strings from the command line) ``value`` against the annotation ``tp``."""
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
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"--{key}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"--{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"--{key}: expected a list, got {value!r}")
        return [coerce(v, item_tp, key) for v in value]
    if isinstance(value, str) and tp is not str:
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


def set_value(cfg: RunConfig, dotted: str, value: Any) -> None:
    """Set ``section.key`` on ``cfg``, converting and type-checking ``value``."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key:
        raise ConfigError(f"unknown config key {dotted!r}; keys look like section.key with section one of "
                          f"{', '.join(SECTIONS)}")
    cls = SECTIONS[section]
    hints = _hints(cls)
    if key not in hints:
        raise ConfigError(f"unknown config key {dotted!r}; {section} has: {', '.join(hints)}")
    setattr(getattr(cfg, section), key, coerce(value, hints[key], dotted))


def update(cfg: RunConfig, data: dict[str, Any], *, where: str) -> None:
    """Apply a nested ``{section: {key: value}}`` mapping (a parsed TOML file) to ``cfg``."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{section}]; choose from {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{section}] must be a table of key = value lines")
        for key, value in values.items():
            try:
                set_value(cfg, f"{section}.{key}", value)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# TOML files and command-line overrides


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def load_toml(path_or_name: str) -> dict[str, Any]:
    """Read a recipe: a path to a TOML file or the name of a shipped recipe (see ``configs/``)."""
    path = Path(path_or_name)
    if not path.exists() and not path.suffix:
        path = RECIPES_DIR / f"{path_or_name}.toml"
    if not path.exists():
        raise ConfigError(f"config {path_or_name!r} not found; pass a TOML file or one of: {', '.join(recipe_names())}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path}: not valid TOML ({e}); fix the file") from None


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


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Turn ``["--optim.lr=1e-3", "--optim.name", "lion"]`` into ``[("optim.lr", "1e-3"), ...]``."""
    pairs: list[tuple[str, str]] = []
    for arg in join_spaced_overrides(args):
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            section, _, name = key.partition(".")
            is_bool = section in SECTIONS and _hints(SECTIONS[section]).get(name) is bool
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


def to_toml(cfg: RunConfig) -> str:
    """Serialise a config as TOML that :func:`load_toml` reads back to the same values (None is omitted)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
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
# validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Reject values that cannot work, naming the flag and what would."""
    m, d, o, s, t, g = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.train, cfg.guard
    from lmsprint.model.presets import PRESETS

    _check(m.preset in PRESETS, f"--model.preset: unknown preset {m.preset!r}; choose from {', '.join(PRESETS)}")
    for key in ("n_layer", "n_head", "n_embd", "mlp_hidden"):
        v = getattr(m, key)
        _check(v is None or v > 0, f"--model.{key} must be positive, got {v}")
    if m.preset in PRESETS:  # checked here, before any data is prepared
        n_embd, n_head = m.n_embd or PRESETS[m.preset].n_embd, m.n_head or PRESETS[m.preset].n_head
        _check(n_embd % n_head == 0, f"--model.n_embd={n_embd} is not divisible by --model.n_head={n_head}; pick "
               "a width that is a multiple of the number of heads")
    _check(m.logit_softcap >= 0, f"--model.logit_softcap must be >= 0 (0 = off), got {m.logit_softcap}")
    _check(m.init_std > 0, f"--model.init_std must be > 0, got {m.init_std}")
    _check(m.vocab_multiple >= 1, f"--model.vocab_multiple must be >= 1, got {m.vocab_multiple}")
    _check(m.rope_base > 0, f"--model.rope_base must be > 0, got {m.rope_base}")

    _check(0.0 <= d.val_fraction < 1.0, f"--data.val_fraction must be in [0, 1), got {d.val_fraction}")
    _check(d.vocab_size >= 260, f"--data.vocab_size must be at least 260 (bytes + specials), got {d.vocab_size}")
    _check(d.seq_len >= 8, f"--data.seq_len must be at least 8, got {d.seq_len}")
    _check(d.pad_multiple >= 1, f"--data.pad_multiple must be >= 1, got {d.pad_multiple}")
    _check(d.bucket_window >= 1, f"--data.bucket_window must be >= 1, got {d.bucket_window}")
    _check(d.workers >= 0, f"--data.workers must be >= 0 (0 = all cores), got {d.workers}")
    _check(0.0 <= d.short_mix <= 1.0, f"--data.short_mix must be in [0, 1], got {d.short_mix}")
    if d.seq_schedule != "none" or d.short_mix > 0:
        _check(0 < d.seq_start <= d.seq_len and d.seq_len % d.seq_start == 0,
               f"--data.seq_start must divide --data.seq_len={d.seq_len}, got {d.seq_start}")
        _check(d.batching in ("pack", "best-fit"),
               f"--data.seq_schedule needs --data.batching=pack or best-fit, got {d.batching}")
    if d.seq_schedule in ("linear", "stages"):
        _check(0.0 < d.seq_warmup <= 1.0, f"--data.seq_warmup must be in (0, 1], got {d.seq_warmup}")
    if d.seq_schedule == "linear":
        _check(d.seq_multiple > 0 and d.seq_len % d.seq_multiple == 0 and d.seq_start % d.seq_multiple == 0,
               f"--data.seq_multiple={d.seq_multiple} must divide seq_start={d.seq_start} and seq_len={d.seq_len}")
    if d.seq_schedule == "tokens":
        _check(len(d.seq_milestones) > 0, "--data.seq_schedule=tokens needs --data.seq_milestones=T1,T2,...")
        _check(all(b > a for a, b in zip(d.seq_milestones, d.seq_milestones[1:])) and d.seq_milestones[0] > 0,
               f"--data.seq_milestones must be positive and increasing, got {d.seq_milestones}")
        doublings = math.ceil(math.log2(d.seq_len / d.seq_start)) if 0 < d.seq_start < d.seq_len else 0
        _check(len(d.seq_milestones) >= doublings,
               f"--data.seq_milestones has {len(d.seq_milestones)} milestones but {d.seq_start} -> {d.seq_len} "
               f"needs {doublings} doublings; give {doublings} token counts")
    if d.doc_mask:
        _check(d.batching in ("pack", "best-fit"), "--data.doc_mask applies to pack/best-fit rows; pad and "
               "bucket rows hold one document already")

    from lmsprint.optim import OPTIMIZERS, check_weight_decay_config

    _check(o.name in OPTIMIZERS, f"--optim.name: unknown optimizer {o.name!r}; choose from {', '.join(OPTIMIZERS)}")
    for key in ("lr", "embed_lr", "head_lr", "scalar_lr"):
        v = getattr(o, key)
        _check(v is None or (v > 0 and math.isfinite(v)), f"--optim.{key} must be a positive number, got {v}")
    check_weight_decay_config(o)
    _check(math.isfinite(o.eps) and o.eps > 0, f"--optim.eps must be a positive number, got {o.eps}")
    _check(math.isfinite(o.wd_horizon) and o.wd_horizon > 0, f"--optim.wd_horizon must be a positive number, got "
           f"{o.wd_horizon}")
    _check(math.isfinite(o.alpha) and o.alpha >= 0, f"--optim.alpha must be a number >= 0, got {o.alpha}")
    if o.betas is not None:
        _check(all(0.0 <= b < 1.0 for b in o.betas), f"--optim.betas must each be in [0, 1), got {o.betas}")

    _check(s.warmup_steps is None or s.warmup_steps >= 0, f"--schedule.warmup_steps must be >= 0, got "
           f"{s.warmup_steps}")
    _check(0.0 <= s.warmup_fraction < 1.0, f"--schedule.warmup_fraction must be in [0, 1), got {s.warmup_fraction}")
    _check(0.0 < s.start_factor <= 1.0, f"--schedule.start_factor must be in (0, 1], got {s.start_factor}")
    _check(0.0 <= s.min_lr_ratio <= 1.0, f"--schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    _check(s.min_lr is None or 0 <= s.min_lr <= o.lr,
           f"--schedule.min_lr={s.min_lr} must be between 0 and the peak --optim.lr={o.lr}")
    _check(0.0 < s.decay_fraction <= 1.0, f"--schedule.decay_fraction must be in (0, 1], got {s.decay_fraction}")

    _check(t.steps > 0, f"--train.steps must be positive, got {t.steps}")
    _check(t.epochs is None or t.epochs > 0, f"--train.epochs must be positive, got {t.epochs}")
    _check(t.batch_size > 0, f"--train.batch_size must be positive, got {t.batch_size}")
    if t.micro_batch_size is not None:
        _check(t.micro_batch_size > 0, f"--train.micro_batch_size must be positive, got {t.micro_batch_size}")
        _check(t.batch_size % t.micro_batch_size == 0,
               f"--train.batch_size={t.batch_size} is not divisible by --train.micro_batch_size="
               f"{t.micro_batch_size}; pick a micro-batch that divides it")
    _check(t.eval_every >= 0 and t.log_every > 0 and t.ckpt_every >= 0,
           "--train.eval_every and --train.ckpt_every must be >= 0 and --train.log_every > 0")
    _check(t.eval_tokens > 0, f"--train.eval_tokens must be positive, got {t.eval_tokens}")
    _check(t.keep_checkpoints >= 1, f"--train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    _check(t.clip_norm >= 0 and t.clip_value >= 0, "--train.clip_norm and --train.clip_value must be >= 0 (0 = off)")
    _check(t.peak_tflops is None or t.peak_tflops > 0, f"--train.peak_tflops must be positive, got {t.peak_tflops}")
    _check(t.stop_at_step is None or t.stop_at_step > 0,
           f"--train.stop_at_step must be a positive step (or none), got {t.stop_at_step}")
    if t.run_name is not None:
        _check(t.run_name.strip() != "" and "/" not in t.run_name and t.run_name not in (".", ".."),
               f"--train.run_name must be a plain directory name, got {t.run_name!r}")

    _check(g.max_bad_steps >= 1, f"--guard.max_bad_steps must be >= 1, got {g.max_bad_steps}")
    _check(g.spike_warmup >= 0, f"--guard.spike_warmup must be >= 0, got {g.spike_warmup}")
    _check(g.spike_factor == 0 or g.spike_factor > 1, f"--guard.spike_factor must be 0 (off) or > 1, got "
           f"{g.spike_factor}")
    _check(0.0 < g.ema < 1.0, f"--guard.ema must be in (0, 1), got {g.ema}")
    _check(0.0 < g.rollback_lr_factor <= 1.0, f"--guard.rollback_lr_factor must be in (0, 1], got "
           f"{g.rollback_lr_factor}")
    _check(g.max_rollbacks >= 0, f"--guard.max_rollbacks must be >= 0, got {g.max_rollbacks}")


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
            out.append(f"  --{section}.{f.name} {_type_name(_hints(cls)[f.name])} (default {default!r})")
            out.append(f"      {docs.get(f.name, '')}")
    return out
