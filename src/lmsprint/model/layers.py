"""Transformer layers: norms, rotary embeddings, attention with optional document masks, MLPs, the block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmsprint.errors import first_line


@dataclass(frozen=True)
class GPTConfig:
    """The resolved shape of a model: everything needed to rebuild it from a checkpoint."""

    vocab_size: int  # the tokenizer's vocabulary (before padding)
    block_size: int  # maximum sequence length / number of positions
    n_layer: int
    n_head: int
    n_embd: int
    mlp_hidden: int
    pos_emb: Literal["rope", "learned"] = "rope"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    mlp: Literal["gelu", "swiglu", "relu2"] = "swiglu"
    tie_embeddings: bool = True
    qk_norm: bool = False
    logit_softcap: float = 0.0
    rope_base: float = 10000.0
    init_std: float = 0.02
    zero_init_proj: bool = False
    vocab_multiple: int = 64
    value_embeds: int = 0  # K value-embedding tables, shared by the first K and the last K layers (0 = off)
    unet_skips: bool = False  # U-net skips: first half's outputs added back into the second half
    smear: bool = False  # each token's embedding gets a gated share of the previous token's
    bigram_embed: int = 0  # rows of the hashed bigram embedding, the last one reserved (0 = off)

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def value_embed_index(self, layer: int) -> int | None:
        """Which of the ``value_embeds`` tables layer ``layer`` adds to its values (the first K layers use tables
        0..K-1, the last K layers the same again), or None."""
        k, n = self.value_embeds, self.n_layer
        if layer < k:
            return layer
        if layer >= n - k:
            return layer - (n - k)
        return None


class Norm(nn.Module):
    """RMSNorm or LayerNorm (no bias), with a learnable gain."""

    def __init__(self, dim: int, kind: str, eps: float = 1e-5) -> None:
        super().__init__()
        self.kind = kind
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.layer_norm(x, (x.size(-1),), self.weight, None, self.eps)


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al. 2021), rotate-half layout as in GPT-NeoX / Llama."""

    def __init__(self, head_dim: int, max_len: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.max_len, self.base = head_dim, max_len, base
        cos, sin = self._tables(torch.device("cpu"))
        # not persistent: derived from the config, so checkpoints stay free of it
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
                                        / self.head_dim))
        freqs = torch.outer(torch.arange(self.max_len, dtype=torch.float32, device=device), inv_freq)  # (T, hd/2)
        return freqs.cos(), freqs.sin()

    def _apply(self, fn: Any, recurse: bool = True) -> Rotary:
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:  # model.to(bfloat16): rebuild the tables in fp32, not rounded
            self.cos, self.sin = self._tables(self.cos.device)
        return self

    def forward(self, x: Tensor, pos: Tensor | None) -> Tensor:
        # x: (B, T, nh, hd); pos: (B, T) positions, or None for 0..T-1
        T = x.size(1)
        if pos is None:
            cos, sin = self.cos[:T][None, :, None, :], self.sin[:T][None, :, None, :]  # (1, T, 1, hd/2)
        else:
            cos, sin = self.cos[pos][:, :, None, :], self.sin[pos][:, :, None, :]  # (B, T, 1, hd/2)
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.type_as(x)


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


FLEX_BLOCK = 128  # FlexAttention's default tile: masks are described per 128 x 128 block


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(count, indices) of the true entries of a (B, nq, nkv) block table, true indices first."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[:, None].contiguous(), idx[:, None].contiguous()


def flex_document_mask(doc_ids: Tensor) -> object:
    """A FlexAttention BlockMask for causal attention within sequences, built from block statistics.

    ``doc_ids`` must be non-decreasing along each row (as the loader's sequence ids are). A kv block can
    matter to a q block only if their id ranges overlap; it is fully visible when both hold one and the same
    id and it lies strictly before the q block. Everything else is skipped, which is where short sequences
    save time. A handful of small tensor ops instead of evaluating the mask on every (q, kv) pair.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, T = doc_ids.shape
    n = T // FLEX_BLOCK
    d = doc_ids.view(B, n, FLEX_BLOCK)
    lo, hi = d.amin(-1), d.amax(-1)  # (B, n)
    q_lo, q_hi, k_lo, k_hi = lo[:, :, None], hi[:, :, None], lo[:, None, :], hi[:, None, :]
    ones = torch.ones(n, n, dtype=torch.bool, device=doc_ids.device)
    causal, before = ones.tril(), ones.tril(-1)
    any_visible = causal & (k_hi >= q_lo) & (k_lo <= q_hi)
    full = before & (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

    return BlockMask.from_kv_blocks(*_ordered(any_visible & ~full), *_ordered(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=mask_mod)


def document_mask(doc_ids: Tensor, *, use_flex: bool) -> object:
    """The attention mask for rows made of several sequences: causal, and only within the same id.

    ``doc_ids`` is (B, T) with one non-decreasing id per token; tokens of different ids never attend to each
    other. On the flex path this is a FlexAttention ``BlockMask`` (blocks that are fully masked are skipped, so
    short sequences really cost less); otherwise a dense (B, 1, T, T) boolean mask for SDPA.
    """
    B, T = doc_ids.shape
    if use_flex:
        if T % FLEX_BLOCK == 0:
            return flex_document_mask(doc_ids)
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

        return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
"""``--train.sdpa_backend`` names (besides ``auto``: torch's own pick) -> ``torch.nn.attention.SDPBackend``."""


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto", **kwargs: Any) -> Tensor:
    """``F.scaled_dot_product_attention``, on one named backend (``auto``: the one torch picks)."""
    if backend == "auto":
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend])):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def sdpa_backend_runs(backend: str, *, device: torch.device, dtype: torch.dtype, n_head: int, head_dim: int
                      ) -> str | None:
    """None when ``backend`` runs causal attention of this shape and dtype here, forward and backward; else why
    not (the first line of torch's refusal)."""
    if backend == "auto":
        return None
    q = torch.randn(1, n_head, 128, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        sdpa(q, q, q, backend=backend, is_causal=True).sum().backward()
    except RuntimeError as e:
        return first_line(e)
    return None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, *, value_embed: bool = False) -> None:
        super().__init__()
        self.sdpa_backend = "auto"  # set by GPT.set_sdpa_backend (a kernel choice, not part of the model)
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.qk_norm = cfg.qk_norm
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_base) if cfg.pos_emb == "rope" else None
        # value embeddings (modded-nanogpt): v = lam0 * v + lam1 * ve, both learned (GPT.init_weights: 0.5, 0.5)
        self.ve_lambdas = nn.Parameter(torch.empty(2)) if value_embed else None

    def forward(self, x: Tensor, pos: Tensor | None, doc_ids: Tensor | None, block_mask: object | None = None,
                ve: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # each (B, T, nh, hd)
        if self.ve_lambdas is not None:
            if ve is None:
                raise ValueError("this attention layer mixes value embeddings into its values: pass ve (B, T, C)")
            lam = self.ve_lambdas
            # the sum in the wider dtype (fp32 tables under autocast), back to the values' dtype for attention
            v = (lam[0] * v + lam[1] * ve.view(B, T, self.n_head, self.head_dim)).type_as(v)  # (B, T, nh, hd)
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if self.rotary is not None:
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        if block_mask is not None:
            from torch.nn.attention.flex_attention import flex_attention

            # contiguous copies: with the transposed views that rotary/QK-norm leave, torch 2.11's compiled
            # FlexAttention returns wrong results (tests/test_gpu.py and tests/test_model.py check it)
            y = flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=block_mask)
        elif doc_ids is None:
            y = sdpa(q, k, v, backend=self.sdpa_backend, is_causal=True)
        else:
            y = sdpa(q, k, v, backend=self.sdpa_backend, attn_mask=document_mask(doc_ids, use_flex=False))
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


SMEAR_GATE_DIM = 12  # modded-nanogpt's: the gate reads the first 12 channels of the token's embedding


def smear(x: Tensor, gate: Tensor, lam: Tensor, doc_ids: Tensor | None = None) -> Tensor:
    """Token smearing (modded-nanogpt, 2025): ``x[t] + lam * sigmoid(x[t, :g] . gate) * x[t-1]`` for t >= 1.

    Each position gets a learned, input-gated share of the previous position's embedding. With ``doc_ids``
    (B, T) the gate is zero where a new document starts, so nothing crosses a document boundary; without them
    the rows are one stream (plain packed causal attention mixes across documents as well).

    Args:
        x: (B, T, C) embeddings.
        gate: (g,) gate weights, g <= C (the first g channels are read).
        lam: (1,) the smearing strength (0: the identity).
        doc_ids: (B, T) non-decreasing sequence ids, or None.
    """
    g = lam * torch.sigmoid(x[:, 1:, : gate.numel()] @ gate)  # (B, T-1)
    if doc_ids is not None:
        g = g * (doc_ids[:, 1:] == doc_ids[:, :-1])
    return torch.cat((x[:, :1], x[:, 1:] + g[..., None] * x[:, :-1]), dim=1)  # (B, T, C)


# modded-nanogpt's bigram hash (records/track_1_short/2026-01-19_BigramHashEmbedding, get_bigram_hash): the current
# and the previous token times two odd constants, XORed, modulo the number of buckets
BIGRAM_HASH_MULTIPLIERS = (36313, 27191)


def bigram_buckets(idx: Tensor, rows: int, doc_ids: Tensor | None = None) -> Tensor:
    """The bigram-embedding row of each position: ``(36313 * idx[t] ^ 27191 * idx[t-1]) % (rows - 1)`` for t >= 1.

    Position 0 of a row has no previous token and gets the reserved last row, ``rows - 1``; with ``doc_ids``
    (B, T) so does the first token of every document, so that no pair spans a document boundary. In int64 on the
    input's device (no host sync): the products stay below 2**47 for any token id below 2**31, so the buckets are
    the record's int32 ones wherever those did not overflow (ids below 59,138, GPT-2's vocabulary included).

    Args:
        idx: (B, T) token ids (>= 0).
        rows: The table's rows (>= 2): rows - 1 hash buckets and the reserved row.
        doc_ids: (B, T) non-decreasing sequence ids, or None (each row one stream).

    Returns:
        (B, T) int64 row indices in [0, rows).
    """
    a, b = BIGRAM_HASH_MULTIPLIERS
    cur, prev = idx[:, 1:].long(), idx[:, :-1].long()
    h = torch.bitwise_xor(a * cur, b * prev) % (rows - 1)  # (B, T-1); the XOR of two non-negatives is one
    if doc_ids is not None:
        h = h.masked_fill(doc_ids[:, 1:] != doc_ids[:, :-1], rows - 1)  # a new document: no previous token
    first = torch.full((idx.size(0), 1), rows - 1, dtype=torch.long, device=idx.device)  # (B, 1)
    return torch.cat((first, h), dim=1)  # (B, T)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        # swiglu: gate and up projections fused into one matmul
        width = 2 * cfg.mlp_hidden if cfg.mlp == "swiglu" else cfg.mlp_hidden
        self.c_fc = nn.Linear(cfg.n_embd, width, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        return self.c_proj(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    With ``value_embed`` its attention mixes a value embedding (``ve``, (B, T, C), given to ``forward``) into the
    values."""

    def __init__(self, cfg: GPTConfig, *, value_embed: bool = False) -> None:
        super().__init__()
        self.ln_1 = Norm(cfg.n_embd, cfg.norm)
        self.attn = CausalSelfAttention(cfg, value_embed=value_embed)
        self.ln_2 = Norm(cfg.n_embd, cfg.norm)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, pos: Tensor | None = None, doc_ids: Tensor | None = None,
                block_mask: object | None = None, ve: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), pos, doc_ids, block_mask, ve)
        return x + self.mlp(self.ln_2(x))
