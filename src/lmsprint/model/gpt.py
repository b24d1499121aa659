"""The GPT model: token (+ optional learned position) embeddings, pre-norm blocks, final norm, output head."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmsprint.model.fp8 import fp8_linear
from lmsprint.model.fused_ce import linear_softcap_cross_entropy
from lmsprint.model.layers import SMEAR_GATE_DIM, Block, GPTConfig, Norm, bigram_buckets, document_mask, smear

IGNORE_INDEX = -100  # targets with this value (padding) contribute nothing to the loss
SCALAR_INITS = {"ve_lambdas": 0.5, "skip_weights": 1.0, "smear_gate": 0.0, "smear_lambda": 0.0, "bigram_lambda": 1.0}
"""Initial values of the learned scalars, by parameter name (every other 1-D tensor is a norm gain: 1)."""


class GPT(nn.Module):
    """Decoder-only transformer with GPT-2 parameter names (``transformer.wte``, ``transformer.h.N``, ``lm_head``).

    Build, then call :meth:`init_weights` (construction leaves default torch init, as torchtitan does).
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        modules: dict[str, nn.Module] = {"wte": nn.Embedding(cfg.padded_vocab, cfg.n_embd)}
        if cfg.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.value_embeds:
            # one table of K chunks of width C: chunk i feeds layers i and n_layer - K + i (value_embed_index)
            modules["value_embed"] = nn.Embedding(cfg.padded_vocab, cfg.value_embeds * cfg.n_embd)
        if cfg.bigram_embed:
            # hashed (previous, current) token pairs -> rows; the last row is for tokens without a previous one
            modules["bigram_embed"] = nn.Embedding(cfg.bigram_embed, cfg.n_embd)
        modules["h"] = nn.ModuleList(Block(cfg, value_embed=cfg.value_embed_index(i) is not None)
                                     for i in range(cfg.n_layer))
        modules["ln_f"] = Norm(cfg.n_embd, cfg.norm)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # U-net: the outputs of the first n_layer // 2 blocks, weighted, go into the last n_layer // 2
        self.skip_weights = nn.Parameter(torch.empty(cfg.n_layer // 2)) if cfg.unet_skips else None
        if cfg.smear:
            self.smear_gate = nn.Parameter(torch.empty(min(SMEAR_GATE_DIM, cfg.n_embd)))
            self.smear_lambda = nn.Parameter(torch.empty(1))
        if cfg.bigram_embed:
            self.bigram_lambda = nn.Parameter(torch.empty(1))
        self._head_fn: Callable[..., Tensor] = self._head
        self._smear_fn: Callable[..., Tensor] = smear
        # document masks through FlexAttention (the trainer turns this on for compiled CUDA runs); else SDPA
        # with a dense mask
        self.use_flex = False
        self.fp8_head = False  # set by GPT.set_fp8_head (a kernel choice, not part of the model)
        self.fused_ce = False  # set by GPT.set_fused_ce (likewise)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 init: N(0, std) for matrices and embeddings, residual projections scaled by 1/sqrt(2 n_layer);
        norm gains 1, the learned scalars as SCALAR_INITS says; the bigram-embedding table zeros (as modded-nanogpt's,
        so that at the start the model computes what it would without it).

        The value-embedding table is drawn last and the bigram table draws nothing, so that turning either on
        leaves every other weight as it was."""
        cfg = self.config
        gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        proj_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        named = sorted(self.named_parameters(), key=lambda item: item[0] == "transformer.value_embed.weight")
        for name, p in named:  # a stable sort: the registration order, the value-embedding table moved last
            if p.ndim < 2:
                nn.init.constant_(p, SCALAR_INITS.get(name.rsplit(".", 1)[-1], 1.0))
            elif name == "transformer.bigram_embed.weight":
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                if cfg.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=proj_std, generator=gen)
            else:
                nn.init.normal_(p, mean=0.0, std=cfg.init_std, generator=gen)

    def set_sdpa_backend(self, backend: str) -> None:
        """Run every attention layer's SDPA on ``backend`` (``auto``: torch's pick; see layers.SDPA_BACKENDS)."""
        for block in self.transformer.h:
            block.attn.sdpa_backend = backend

    def set_fp8_head(self, enabled: bool) -> None:
        """Run the output head's matmul in FP8 (model/fp8.py) in training forward and backward; evaluation and
        generation keep the regular matmul. The caller checks that it runs here (``fp8.fp8_linear_runs``)."""
        self.fp8_head = enabled

    def set_fused_ce(self, enabled: bool) -> None:
        """Compute the training loss with the fused, chunked head and cross-entropy (model/fused_ce.py): the same
        maths, padded vocabulary columns included, without a (tokens, vocab) logits tensor. It does its own matmuls,
        so it replaces the FP8 head where both are set; evaluation and generation keep the regular head."""
        self.fused_ce = enabled

    def compile_blocks(self, **kwargs: object) -> None:
        """torch.compile each block and the loss head separately: one block graph is reused by every layer,
        so compile time does not grow with depth."""
        for block in self.transformer.h:
            block.compile(**kwargs)
        self._head_fn = torch.compile(self._head, **kwargs)
        if self.config.smear:
            self._smear_fn = torch.compile(smear, **kwargs)

    def num_params(self, *, matmul_only: bool = False) -> int:
        """All parameters (tied ones once), or only those that take part in matmuls (FLOP counting)."""
        if matmul_only:
            return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: float) -> float:
        """Training FLOPs per token, as nanoGPT's estimate_mfu: 6N + 12 * layers * width * seq_len.

        N counts matmul weights (blocks and head; an untied input embedding is a lookup, not a matmul);
        ``seq_len`` is the length a token attends over (a mean, for steps of mixed lengths)."""
        cfg = self.config
        return 6 * self.num_params(matmul_only=True) + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def _head(self, x: Tensor, targets: Tensor, reduction: str) -> Tensor:
        if self.fused_ce and self.training:
            return linear_softcap_cross_entropy(self.transformer.ln_f(x), self.lm_head.weight, targets,
                                                softcap=self.config.logit_softcap, ignore_index=IGNORE_INDEX,
                                                reduction=reduction)
        logits = self._logits(x, fp8=self.fp8_head and self.training)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction=reduction)

    def _logits(self, x: Tensor, *, fp8: bool = False) -> Tensor:
        x = self.transformer.ln_f(x)
        logits = (fp8_linear(x, self.lm_head.weight) if fp8 else self.lm_head(x)).float()
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        pos: Tensor | None = None,
        doc_ids: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """Loss if ``targets`` is given (mean, or sum over non-ignored targets), else logits (B, T, vocab).

        Args:
            idx: (B, T) token ids.
            targets: (B, T) next-token ids; ``IGNORE_INDEX`` marks padding.
            pos: (B, T) positions (restarting at each document); default 0..T-1.
            doc_ids: (B, T) sequence ids; tokens attend only to earlier tokens with the same id.
            reduction: "mean" or "sum" of the per-token losses.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's {self.config.block_size} positions")
        cfg = self.config
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos if pos is not None else torch.arange(T, device=idx.device))
        if cfg.smear:
            x = self._smear_fn(x, self.smear_gate, self.smear_lambda, doc_ids)
        if cfg.bigram_embed:  # after the smear, which (as modded-nanogpt's) shifts token embeddings only
            x = x + self.bigram_lambda * self.transformer.bigram_embed(bigram_buckets(idx, cfg.bigram_embed, doc_ids))
        # The BlockMask is built here, once per forward and outside the compiled blocks: built inside a
        # compiled region, torch 2.11's inductor fused it into the attention kernel and got it wrong on CUDA
        # (tests/test_gpu.py checks both ways against SDPA with a dense mask).
        block_mask = document_mask(doc_ids, use_flex=True) if doc_ids is not None and self.use_flex else None
        ves = self.transformer.value_embed(idx).chunk(cfg.value_embeds, dim=-1) if cfg.value_embeds else ()
        skips: list[Tensor] = []  # U-net: the first half's outputs, added back last-saved-first
        n_skip = len(self.skip_weights) if self.skip_weights is not None else 0
        for i, block in enumerate(self.transformer.h):
            if n_skip and i >= cfg.n_layer - n_skip:  # odd n_layer: the middle block gets none
                x = x + self.skip_weights[i - (cfg.n_layer - n_skip)] * skips.pop()
            k = cfg.value_embed_index(i)
            x = block(x, pos, doc_ids, block_mask, ves[k] if k is not None else None)
            if i < n_skip:
                skips.append(x)
        if targets is None:
            return self._logits(x)[..., : self.config.vocab_size]
        return self._head_fn(x, targets, reduction)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop_token: int | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx`` (B, T), recomputing over the last block_size tokens."""
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.config.block_size :]
            logits = self(ctx)[:, -1, :]  # (B, vocab)
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
            if stop_token is not None and bool((nxt == stop_token).all()):
                break
        return idx
