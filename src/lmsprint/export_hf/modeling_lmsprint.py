"""A model trained by lmsprint, as a transformers model (written next to the weights by ``lmsprint export``).

Load it with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``; it needs torch and
transformers only. The forward pass is lmsprint's own (``lmsprint/model/``), op for op: token embeddings (plus
learned position embeddings, or rotary positions), pre-norm blocks ``x + attn(norm(x))``, ``x + mlp(norm(x))``, a
final norm and the output head. Parameter names are lmsprint's, which are GPT-2's (``transformer.wte``,
``transformer.h.N.attn.c_attn``, ``lm_head``), so the weights are the checkpoint's, only sliced to the
tokenizer's vocabulary.

Each architecture option is one field of ``LmsprintConfig``, read by the one module it changes:

==================  =====================================  ===========================
field               values                                 read by
==================  =====================================  ===========================
``pos_emb``         ``rope``, ``learned``                  LmsprintModel
``norm``            ``rmsnorm``, ``layernorm``             Norm
``mlp``             ``gelu``, ``swiglu``, ``relu2``        MLP
``qk_norm``         true / false                           Attention
``logit_softcap``   0 (off) or the cap                     LmsprintForCausalLM
``rope_base``       rotary base (theta)                    LmsprintModel
==================  =====================================  ===========================

A new option is added here as a field of ``LmsprintConfig`` (``GPTConfig``'s name and default) read where it acts,
and in ``lmsprint.export.OPTIONS``, which passes it into ``config.json``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (4, 46):
    raise ImportError(f"this lmsprint model needs transformers>=4.46 (generate() with a cache), found "
                      f"{transformers.__version__}; upgrade it: pip install -U transformers")

# transformers 5 calls the key/value cache `cache`; earlier versions `past_key_values`
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

OPTIONS = {"pos_emb": ("rope", "learned"), "norm": ("rmsnorm", "layernorm"), "mlp": ("gelu", "swiglu", "relu2")}


class LmsprintConfig(PretrainedConfig):
    """The shape and architecture options of an lmsprint model (lmsprint's ``GPTConfig`` field names)."""

    model_type = "lmsprint"
    # the names transformers' generic code (caches, pipelines, size estimates) looks for
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "block_size", "intermediate_size": "mlp_hidden"}

    def __init__(self, vocab_size: int = 50257, block_size: int = 1024, n_layer: int = 12, n_head: int = 12,
                 n_embd: int = 768, mlp_hidden: int = 3072, pos_emb: str = "rope", norm: str = "rmsnorm",
                 mlp: str = "swiglu", qk_norm: bool = False, logit_softcap: float = 0.0, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, initializer_range: float = 0.02, tie_word_embeddings: bool = True,
                 use_cache: bool = True, **kwargs: object) -> None:
        for name, value in (("pos_emb", pos_emb), ("norm", norm), ("mlp", mlp)):
            if value not in OPTIONS[name]:
                raise ValueError(f"{name}={value!r} is not an lmsprint option; choose from {', '.join(OPTIONS[name])}")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.n_layer, self.n_head, self.n_embd, self.mlp_hidden = n_layer, n_head, n_embd, mlp_hidden
        self.pos_emb, self.norm, self.mlp = pos_emb, norm, mlp
        self.qk_norm, self.logit_softcap, self.rope_base = qk_norm, logit_softcap, rope_base
        self.norm_eps, self.initializer_range, self.use_cache = norm_eps, initializer_range, use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class Norm(nn.Module):
    """RMSNorm or LayerNorm (no bias), with a learnable gain."""

    def __init__(self, config: LmsprintConfig) -> None:
        super().__init__()
        self.kind, self.eps = config.norm, config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.n_embd))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.layer_norm(x, (x.size(-1),), self.weight, None, self.eps)


def rotary_tables(pos: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin (B, T, 1, head_dim / 2) of the rotary angles at positions ``pos`` (B, T), in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=pos.device) / head_dim))
    freqs = pos.to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    return freqs.cos()[:, :, None, :], freqs.sin()[:, :, None, :]


def rotate(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotary position embeddings, rotate-half layout (GPT-NeoX / Llama), rotated in float32."""
    # x: (B, T, nh, hd)
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with a fused q/k/v projection; keys and values go through the cache."""

    def __init__(self, config: LmsprintConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.qk_norm = config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: Cache | None
                ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # each (B, T, nh, hd)
        if self.qk_norm:  # per head, no gain, torch's default eps: lmsprint's F.rms_norm call
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hd): the cached past, then these T
        # mask None: no padding, and either no past or one new token, where is_causal (or nothing) is exact
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: LmsprintConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        # swiglu: gate and up projections fused into one matmul, [gate | up]
        width = 2 * config.mlp_hidden if config.mlp == "swiglu" else config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, width, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h)  # exact GELU, not the tanh approximation
        return self.c_proj(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LmsprintConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = Norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: Cache | None
                ) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        return x + self.mlp(self.ln_2(x))


def causal_mask(padding: Tensor | None, T: int, past: int, device: torch.device) -> Tensor | None:
    """The boolean (B or 1, 1, T, past + T) mask of T new queries over all keys: causal, padding keys hidden.

    None where SDPA's ``is_causal`` (or no mask, for one new token) is exact: no padding, and no past or T == 1.
    """
    if padding is None and (past == 0 or T == 1):
        return None
    q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(past + T, device=device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if padding is not None:
        # a padding query attends to itself: no softmax row is empty (its output is never used)
        mask = (mask & padding.bool()[:, None, None, :]) | (k_pos == q_pos)
    return mask


class LmsprintPreTrainedModel(PreTrainedModel):
    config_class = LmsprintConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # transformers 4.x: generate() gives forward() a DynamicCache

    def _init_weights(self, module: nn.Module) -> None:
        # only for models built from a config: from_pretrained loads every weight
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, Norm):
            nn.init.ones_(module.weight)


class LmsprintModel(LmsprintPreTrainedModel):
    """Embeddings, blocks and the final norm: hidden states (B, T, n_embd)."""

    def __init__(self, config: LmsprintConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = Norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Cache | None = None, past_key_values: Cache | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs: object) -> BaseModelOutputWithPast | tuple:
        """``kwargs`` takes what generate() passes on for other models (e.g. ``cache_position``); it is unused."""
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache()
        elif not use_cache:
            cache = None
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        padding = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask must be (batch, past + new tokens) = ({B}, {past + T}) of 0/1, got "
                                 f"{tuple(attention_mask.shape)}")
            padding = None if bool(attention_mask.all()) else attention_mask
        if position_ids is None:
            if padding is not None:  # left padding: each row counts its positions from its first real token
                position_ids = (padding.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if T and int(position_ids.max()) >= self.config.block_size:
            raise ValueError(f"position {int(position_ids.max())} is past the model's {self.config.block_size} "
                             "positions (max_position_embeddings); keep prompt plus new tokens within that")

        x = self.wte(input_ids)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        else:
            rope = rotary_tables(position_ids, self.config.n_embd // self.config.n_head, self.config.rope_base)
        mask = causal_mask(padding, T, past, input_ids.device)
        for block in self.h:
            x = block(x, rope, mask, cache)
        out = BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), **{CACHE: cache})
        return out if return_dict is not False else out.to_tuple()


class LmsprintForCausalLM(LmsprintPreTrainedModel, GenerationMixin):
    """LmsprintModel and the output head: next-token logits (B, T, vocab_size), in float32."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: LmsprintConfig) -> None:
        super().__init__(config)
        self.transformer = LmsprintModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Cache | None = None, past_key_values: Cache | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                **kwargs: object) -> CausalLMOutputWithPast | tuple:
        """Logits, and with ``labels`` (the inputs, as transformers' convention has it) the mean next-token loss."""
        out = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache if cache is not None else past_key_values, use_cache=use_cache)
        logits = self.lm_head(out.last_hidden_state).float()
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:  # position t predicts token t + 1; -100 marks positions to ignore
            labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: out[CACHE] if CACHE in out else None})
        return result if return_dict is not False else result.to_tuple()


__all__ = ["LmsprintConfig", "LmsprintForCausalLM", "LmsprintModel", "LmsprintPreTrainedModel"]
