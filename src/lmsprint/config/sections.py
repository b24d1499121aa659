"""The sections of a run config: one dataclass each, whose field docstrings are the ``--help`` text and the
generated reference (``docs/config.md``), and whose ``check`` method holds every rule on its own values."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from lmsprint.config.values import check_fields, parse_duration, require


@dataclass
class ModelConfig:
    """The network: size preset and architecture options."""

    preset: Literal["auto", "tiny", "small", "gpt2-124m", "gpt2-350m"] = "auto"
    """Named size: auto (with --train.budget the planner picks the size; without one, tiny), tiny (~1.4M params
    with a 4K vocabulary, CPU), small (~30M), gpt2-124m (GPT-2 small shape), gpt2-350m (GPT-2 medium shape)."""
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
    value_embeds: int = 0
    """Value embeddings (modded-nanogpt): K token-embedding tables whose rows are mixed into the attention values
    of the first K and the last K layers (table i in layers i and n_layer-K+i), v = l0 v + l1 ve with two learned
    scalars per layer; needs 2K <= n_layer (0 = off)."""
    unet_skips: bool = False
    """U-net skip connections (modded-nanogpt): the output of each of the first n_layer/2 blocks is added, times a
    learned weight, to the input of its mirror among the last n_layer/2 blocks (last saved first)."""
    smear: bool = False
    """Token smearing (modded-nanogpt): each token's embedding gets a learned, gated share of the previous token's
    (never across a document boundary with --data.doc_mask)."""
    bigram_embed: int = 0
    """Hashed bigram embedding (modded-nanogpt): a table of this many rows, indexed by a hash of each token and the
    one before it, added times a learned weight to the token embedding (the first token of a row, or of a document
    with --data.doc_mask, gets a reserved row); 0 = off, else >= 2 (modded-nanogpt used 5 x the vocabulary)."""

    def check(self) -> None:
        """Sizes and options in range (the shape a preset makes is checked by :func:`lmsprint.model.model_shape`)."""
        check_fields("model", self)
        for key in ("n_layer", "n_head", "n_embd", "mlp_hidden"):
            v = getattr(self, key)
            require(v is None or v > 0, f"--model.{key} must be positive, got {v}")
        require(self.logit_softcap >= 0, f"--model.logit_softcap must be >= 0 (0 = off), got {self.logit_softcap}")
        require(self.init_std > 0, f"--model.init_std must be > 0, got {self.init_std}")
        require(self.vocab_multiple >= 1, f"--model.vocab_multiple must be >= 1, got {self.vocab_multiple}")
        require(self.rope_base > 0, f"--model.rope_base must be > 0, got {self.rope_base}")
        require(self.value_embeds >= 0, f"--model.value_embeds must be >= 0 (0 = off), got {self.value_embeds}")
        require(self.bigram_embed == 0 or self.bigram_embed >= 2, "--model.bigram_embed must be 0 (off) or >= 2 (hash "
                f"buckets plus the reserved row), got {self.bigram_embed}")


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
    batching: Literal["pack", "pad", "bucket", "best-fit", "random"] = "pack"
    """pack: concatenate documents and cut fixed rows; pad: one document per row, padded; bucket: like pad
    with rows grouped by length; best-fit: whole documents placed into rows by best-fit decreasing; random:
    rows are windows of the concatenated stream at random offsets, drawn with replacement (nanoGPT)."""
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

    def check(self) -> None:
        check_fields("data", self)
        require(0.0 <= self.val_fraction < 1.0, f"--data.val_fraction must be in [0, 1), got {self.val_fraction}")
        require(self.vocab_size >= 260, f"--data.vocab_size must be at least 260 (bytes + specials), got "
               f"{self.vocab_size}")
        require(self.seq_len >= 8, f"--data.seq_len must be at least 8, got {self.seq_len}")
        require(self.pad_multiple >= 1, f"--data.pad_multiple must be >= 1, got {self.pad_multiple}")
        require(self.bucket_window >= 1, f"--data.bucket_window must be >= 1, got {self.bucket_window}")
        require(self.workers >= 0, f"--data.workers must be >= 0 (0 = all cores), got {self.workers}")
        require(0.0 <= self.short_mix <= 1.0, f"--data.short_mix must be in [0, 1], got {self.short_mix}")
        seq_len, start, milestones = self.seq_len, self.seq_start, self.seq_milestones
        if self.seq_schedule != "none" or self.short_mix > 0:
            require(0 < start <= seq_len and seq_len % start == 0,
                   f"--data.seq_start must divide --data.seq_len={seq_len}, got {start}")
            require(self.batching in ("pack", "best-fit", "random"),
                    f"--data.seq_schedule needs --data.batching=pack, best-fit or random, got {self.batching}")
        if self.seq_schedule in ("linear", "stages"):
            require(0.0 < self.seq_warmup <= 1.0, f"--data.seq_warmup must be in (0, 1], got {self.seq_warmup}")
        if self.seq_schedule == "linear":
            m = self.seq_multiple
            require(m > 0 and seq_len % m == 0 and start % m == 0,
                   f"--data.seq_multiple={m} must divide seq_start={start} and seq_len={seq_len}")
        if self.seq_schedule == "tokens":
            require(len(milestones) > 0, "--data.seq_schedule=tokens needs --data.seq_milestones=T1,T2,...")
            require(all(b > a for a, b in zip(milestones, milestones[1:])) and milestones[0] > 0,
                   f"--data.seq_milestones must be positive and increasing, got {milestones}")
            doublings = math.ceil(math.log2(seq_len / start)) if 0 < start < seq_len else 0
            require(len(milestones) >= doublings,
                   f"--data.seq_milestones has {len(milestones)} milestones but {start} -> {seq_len} "
                   f"needs {doublings} doublings; give {doublings} token counts")
        if self.doc_mask:
            require(self.batching in ("pack", "best-fit", "random"), "--data.doc_mask applies to "
                    "pack/best-fit/random rows; pad and bucket rows hold one document already")


@dataclass
class OptimConfig:
    """Optimizer and its hyperparameters."""

    name: Literal["adamw", "lion", "soap", "ademamix", "muon"] = "adamw"
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
    impl: Literal["auto", "for", "foreach", "fused", "compiled"] = "auto"
    """Kernel path: per-tensor loop, foreach (multi-tensor) or fused; auto picks the fastest available. compiled
    (muon only): matrices of one shape batched, the Newton-Schulz iteration torch.compiled on CUDA (else as auto)."""
    momentum: float = 0.95
    """muon: momentum coefficient."""
    nesterov: bool = True
    """muon: use Nesterov momentum."""
    ns_steps: int = 5
    """muon: Newton-Schulz iterations."""
    momentum_warmup: int = 0
    """muon: steps over which momentum rises from 0.85 to its value (0 = off)."""
    ns_coefficients: Literal["jordan", "polar_express"] = "jordan"
    """muon: Newton-Schulz coefficients: jordan (the fixed quintic of the Muon reference) or polar_express (one per
    iteration, Amsel et al. 2025, as modded-nanogpt)."""
    cautious_wd: bool = False
    """muon: cautious weight decay on the Muon matrices (Chen et al. 2025): decay only the coordinates where the update
    and the weight have the same sign. The AdamW groups keep plain decay."""
    normuon: bool = False
    """muon: NorMuon (Li et al. 2025): normalise each row of the orthogonalised update by an EMA of its mean square,
    keeping the update's norm."""
    normuon_beta2: float = 0.95
    """muon: decay rate of NorMuon's per-row second-moment EMA."""
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

    def check(self) -> None:
        """Every hyperparameter in range, those of the chosen optimizer included (the kernel paths an optimizer
        has, and what depends on the run's length, are checked by :func:`lmsprint.optim.build_optimizer`)."""
        check_fields("optim", self)
        for key in ("lr", "embed_lr", "head_lr", "scalar_lr"):
            v = getattr(self, key)
            require(v is None or (v > 0 and math.isfinite(v)), f"--optim.{key} must be a positive number, got {v}")
        for key in ("weight_decay", "embed_weight_decay", "head_weight_decay"):
            v = getattr(self, key)
            require(v is None or (math.isfinite(v) and v >= 0), f"--optim.{key} must be >= 0, got {v}")
        per_group = self.embed_weight_decay is not None or self.head_weight_decay is not None
        require(self.weight_decay_mode == "fixed" or not per_group, "--optim.embed_weight_decay/head_weight_decay "
               "apply to --optim.weight_decay_mode=fixed; horizon mode derives every group's decay from its lr")
        require(math.isfinite(self.eps) and self.eps > 0, f"--optim.eps must be a positive number, got {self.eps}")
        require(math.isfinite(self.wd_horizon) and self.wd_horizon > 0, f"--optim.wd_horizon must be a positive "
               f"number, got {self.wd_horizon}")
        require(math.isfinite(self.alpha) and self.alpha >= 0, f"--optim.alpha must be a number >= 0, got {self.alpha}")
        if self.betas is not None:
            n = 3 if self.name == "ademamix" else 2
            require(len(self.betas) == n, f"--optim.betas needs {n} values for {self.name}"
                   f"{' (beta1, beta2, beta3)' if n == 3 else ''}, got {self.betas}")
            require(all(0.0 <= b < 1.0 for b in self.betas), f"--optim.betas must each be in [0, 1), got {self.betas}")
        if self.name == "muon":
            require(0.0 <= self.momentum < 1.0, f"--optim.momentum must be in [0, 1), got {self.momentum}")
            require(self.ns_steps >= 1, f"--optim.ns_steps must be >= 1, got {self.ns_steps}")
            require(self.momentum_warmup >= 0, f"--optim.momentum_warmup must be >= 0 (0 = off), got "
                   f"{self.momentum_warmup}")
            require(0.0 <= self.normuon_beta2 < 1.0, f"--optim.normuon_beta2 must be in [0, 1), got "
                   f"{self.normuon_beta2}")
        if self.name == "soap":
            require(self.precondition_frequency >= 1, f"--optim.precondition_frequency must be >= 1, got "
                   f"{self.precondition_frequency}")
            require(self.max_precond_dim >= 1, f"--optim.max_precond_dim must be >= 1, got {self.max_precond_dim}")
        if self.name == "ademamix":
            for key in ("alpha_warmup", "beta3_warmup"):
                v = getattr(self, key)
                require(v is None or v >= 0, f"--optim.{key} must be >= 0 (0 = off; unset = the whole run), got {v}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up, then a decay shape down to a floor."""

    name: Literal["cosine", "sqrt", "linear", "constant", "wsd"] = "cosine"
    """Decay shape after warm-up; wsd is warmup-stable-decay with a cool-down of decay_fraction."""
    warmup_steps: int | None = None
    """Warm-up length in optimizer steps (overrides warmup_fraction)."""
    warmup_fraction: float | None = None
    """Warm-up length as a fraction of the run. Default (neither set): 20% of the run, but at most the larger of 2%
    and 200 steps, the rule measured for AdamW (docs/schedules.md)."""
    start_factor: float | None = None
    """Warm-up starts at start_factor x peak lr. Default: 1/(warm-up steps + 1), nanoGPT's lr (it+1)/(W+1)."""
    min_lr: float | None = None
    """Absolute lr floor reached at the last step (overrides min_lr_ratio)."""
    min_lr_ratio: float = 0.1
    """lr floor as a fraction of the peak."""
    decay_fraction: float = 0.2
    """wsd: fraction of the run spent cooling down."""
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    """wsd: shape of the cool-down."""

    def check(self, *, peak_lr: float | None = None) -> None:
        """Settings in range, and with ``peak_lr`` (--optim.lr) an absolute floor below it (what depends on the
        run's length is checked by :func:`lmsprint.schedules.resolve_schedule`)."""
        check_fields("schedule", self)
        require(self.warmup_steps is None or self.warmup_steps >= 0, f"--schedule.warmup_steps must be >= 0, got "
               f"{self.warmup_steps}")
        require(self.warmup_fraction is None or 0.0 <= self.warmup_fraction < 1.0,
                f"--schedule.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        require(self.start_factor is None or 0.0 < self.start_factor <= 1.0,
                f"--schedule.start_factor must be in (0, 1], got {self.start_factor}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"--schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if peak_lr is not None:
            require(self.min_lr is None or 0 <= self.min_lr <= peak_lr,
                   f"--schedule.min_lr={self.min_lr} must be between 0 and the peak --optim.lr={peak_lr}")
        require(0.0 < self.decay_fraction <= 1.0, f"--schedule.decay_fraction must be in (0, 1], got "
               f"{self.decay_fraction}")


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
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """The kernel SDPA attention runs on: auto (torch's pick), flash (FlashAttention-2), cudnn (cuDNN attention,
    reported faster on Hopper), efficient (memory-efficient) or math. One that cannot run here falls back to auto,
    with a warning."""
    fp8_head: bool = False
    """Run the output head's matmul in FP8 while training (e4m3 forward, e5m2 gradients, dynamic per-tensor
    scales; evaluation and generation stay in bf16). Needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper);
    elsewhere the head keeps its regular matmul, with a warning."""
    fused_ce: bool = False
    """Compute the training loss with a fused, chunked output head and soft-capped cross-entropy: the same maths
    without a (tokens, vocab) fp32 logits tensor (gradients computed in the forward, a chunk of rows at a time).
    Runs anywhere; evaluation and generation keep the regular head. Not with --train.fp8_head."""
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
    budget: str | None = None
    """Wall-clock budget of the whole run, start-up and evaluations included: e.g. 90s, 10m, 2h, or auto (4m on a
    CPU, 2m on a GPU). The planner sets steps, batch_size and, with --model.preset=auto, the model size from this
    machine's measured throughput; the wsd cool-down starts on time, so the run ends evaluated and checkpointed
    within the budget (docs/budget.md)."""
    tokens_per_param: float | None = None
    """Budget planner: the compute-optimal training tokens per parameter the model size is picked for (default:
    the ratio measured for lmsprint's recipes on a CPU, or Chinchilla's 20 on a GPU; docs/budget.md)."""
    max_epochs: float = 4.0
    """The most passes over the training tokens a budget plans (more repetition is worth little: Muennighoff et
    al. 2023); a run of more is warned."""

    def check(self) -> None:
        check_fields("train", self)
        require(self.steps > 0, f"--train.steps must be positive, got {self.steps}")
        require(self.epochs is None or self.epochs > 0, f"--train.epochs must be positive, got {self.epochs}")
        require(self.batch_size > 0, f"--train.batch_size must be positive, got {self.batch_size}")
        if self.micro_batch_size is not None:
            micro = self.micro_batch_size
            require(micro > 0, f"--train.micro_batch_size must be positive, got {micro}")
            require(self.batch_size % micro == 0, f"--train.batch_size={self.batch_size} is not divisible by "
                   f"--train.micro_batch_size={micro}; pick a micro-batch that divides it")
        require(self.eval_every >= 0 and self.log_every > 0 and self.ckpt_every >= 0,
               "--train.eval_every and --train.ckpt_every must be >= 0 and --train.log_every > 0")
        require(self.eval_tokens >= 2, f"--train.eval_tokens must be at least 2 (a token and the next one, its "
                f"target), got {self.eval_tokens}")
        require(self.keep_checkpoints >= 1, f"--train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        require(self.clip_norm >= 0 and self.clip_value >= 0,
               "--train.clip_norm and --train.clip_value must be >= 0 (0 = off)")
        require(self.peak_tflops is None or self.peak_tflops > 0, f"--train.peak_tflops must be positive, got "
               f"{self.peak_tflops}")
        require(self.stop_at_step is None or self.stop_at_step > 0,
               f"--train.stop_at_step must be a positive step (or none), got {self.stop_at_step}")
        require(math.isfinite(self.max_epochs) and self.max_epochs > 0, f"--train.max_epochs must be a positive "
               f"number, got {self.max_epochs}")
        require(self.tokens_per_param is None or (math.isfinite(self.tokens_per_param) and self.tokens_per_param > 0),
                f"--train.tokens_per_param must be a positive number, got {self.tokens_per_param}")
        if self.budget is not None:
            require(self.budget == "auto" or parse_duration(self.budget) is not None, f"--train.budget must be a "
                   f"duration like 90s, 10m, 2h or 1h30m (or auto), got {self.budget!r}")
            require(self.epochs is None, "--train.budget and --train.epochs both set the run's length; drop one")
            require(self.stop_at_step is None, "--train.stop_at_step ends a fixed-length schedule early, a "
                   "--train.budget run ends on time; drop one")
        if self.run_name is not None:
            name = self.run_name
            require(name.strip() != "" and "/" not in name and name not in (".", "..") and name.isprintable(),
                    f"--train.run_name must be a plain directory name (no '/', no control characters), got {name!r}")
            require(len(os.fsencode(name)) <= 255, f"--train.run_name is {len(os.fsencode(name))} bytes long; a "
                    "directory name can have at most 255")
        require(self.out_dir.strip() != "", "--train.out_dir must name a directory, got ''")
        require(not (self.fused_ce and self.fp8_head), "--train.fused_ce and --train.fp8_head both replace the output "
                "head's matmul; turn one off")


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

    def check(self) -> None:
        check_fields("guard", self)
        require(self.max_bad_steps >= 1, f"--guard.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        require(self.spike_warmup >= 0, f"--guard.spike_warmup must be >= 0, got {self.spike_warmup}")
        require(self.spike_factor == 0 or self.spike_factor > 1, f"--guard.spike_factor must be 0 (off) or > 1, got "
               f"{self.spike_factor}")
        require(0.0 < self.ema < 1.0, f"--guard.ema must be in (0, 1), got {self.ema}")
        require(0.0 < self.rollback_lr_factor <= 1.0, f"--guard.rollback_lr_factor must be in (0, 1], got "
               f"{self.rollback_lr_factor}")
        require(self.max_rollbacks >= 0, f"--guard.max_rollbacks must be >= 0, got {self.max_rollbacks}")


@dataclass
class LogConfig:
    """Metrics, plots and progress output."""

    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = False
    """Also write TensorBoard event files to the run directory (needs the tensorboard package)."""
    plot: bool = True
    """Draw loss.png (train/val loss and lr) at the end of the run."""

    def check(self) -> None:
        check_fields("log", self)


@dataclass
class DistConfig:
    """Multi-GPU training through torch.distributed."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp (replicated weights) or fsdp (FSDP2 fully_shard per block, then the root)."""

    def check(self) -> None:
        check_fields("dist", self)
