"""A readable decoder-only transformer for the Llama / Mistral / Qwen2 / Qwen3 families.

The module tree mirrors Hugging Face's `XxxForCausalLM` (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
..., `lm_head`), so `state_dict()` keys are exactly the checkpoint's keys and PEFT-style module names
(`q_proj`, `down_proj`, ...) line up. Projections are plain `nn.Linear` attributes so LoRA can wrap them,
and the blocks sit in one `nn.ModuleList` (`model.layers`) so FSDP2 can `fully_shard` each one.

Packed rows: RoPE is computed from `position_ids` (which restart at each document), and attention is confined
to the segments given by `cu_seqlens` (see `trainer.attention`). Labels are pre-shifted upstream, so the
model returns logits for every position and never shifts anything.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer import attention
from trainer.loss import LossConfig, head_loss
from trainer.model_config import ModelConfig

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as the reference implementation does,
    so bf16 runs round the same way as transformers."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Per-pair rotation frequencies, including Llama 3.1's frequency-dependent `llama3` scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(in_band, blended, scaled)
    elif rope_type == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, config, scaling)
    return inv_freq


def _yarn_inv_freq(inv_freq: torch.Tensor, config: ModelConfig, scaling: dict) -> torch.Tensor:
    """YaRN: dimensions that rotate many times within the original context keep their frequency, those that
    rotate less than once are interpolated by `factor`, with a linear ramp between (Qwen's long-context recipe)."""
    dim, base = config.head_dim, config.rope_theta
    factor = float(scaling["factor"])
    old_len = float(scaling.get("original_max_position_embeddings") or config.max_position_embeddings)
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def dim_for(rotations: float) -> float:  # the pair index that makes `rotations` turns over old_len tokens
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep the frequency), 0 = interpolate (divide by factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def rope_attention_factor(config: ModelConfig) -> float:
    """YaRN scales cos/sin (and so attention logits) to keep their entropy at long context; 1.0 otherwise."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = float(scaling["factor"])
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, float(scaling["mscale"])) / mscale(factor, float(scaling["mscale_all_dim"]))
    return mscale(factor)


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, D] from explicit positions, so each packed document restarts at 0."""
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device)  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, D] (HF's half-split pairing, not interleaved)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d, h, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.n_heads, self.n_kv_heads = d, h, kv
        self.layer_idx = layer_idx  # which slot of a KVCache this layer reads and writes
        self.window = config.sliding_windows[layer_idx]
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's vector before RoPE
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: attention.AttentionContext | None,
        cache: KVCache | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        # Heads from the projections' width, not the config: under tensor parallelism each rank computes
        # n_heads / tp of them (trainer.tensor_parallel).
        q = self.q_proj(x).view(b, t, -1, self.head_dim)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attention.attend(q, k, v, ctx, self.window, prefix)
        else:  # a prefix is already in the cache's first slots (trainer.prefix.fill_cache)
            out = cache.attend(self.layer_idx, q, k, v, self.window)
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {config.hidden_act!r} not supported ({', '.join(_ACTIVATIONS)})")
        self.act = _ACTIVATIONS[config.hidden_act]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm block; the unit FSDP2 shards and activation checkpointing / torch.compile wrap."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.reft: nn.Module | None = None  # a LoReFT intervention on the block's output (trainer.reft)
        self.prefix: nn.Module | None = None  # prefix tuning's learned keys / values (trainer.prefix)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: attention.AttentionContext | None,
        cache: KVCache | None = None,
        intervene: torch.Tensor | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`prefix`: this layer's prefix keys / values when they are computed for all layers at once
        (`peft.prefix_projection`, trainer.prefix); otherwise the layer's own `prefix` child's, if any."""
        if prefix is None and self.prefix is not None:
            prefix = (self.prefix.key, self.prefix.value)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, cache, prefix)
        x = x + self.mlp(self.post_attention_layernorm(x))
        if self.reft is not None and intervene is not None:
            x = self.reft(x, intervene)
        return x


class DecoderModel(nn.Module):
    """The body (HF's `model.` prefix): embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # prefix tuning's reparametrisation MLP, whose output is every layer's prefix (trainer.prefix.PrefixEncoder)
        self.prefix: nn.Module | None = None


class CausalLM(nn.Module):
    """The forward both model backends share (this module's `Transformer`, `trainer.hf_backend.HFCausalLM`), so
    the trainer, the loss and generation drive either the same way. A backend gives `hidden_states`, its output
    `head` and `logits`; packed-row positions and the loss-or-logits choice are decided here once."""

    loss_config: LossConfig

    @property
    def head(self) -> nn.Module:
        raise NotImplementedError

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None,
                      max_seqlen: int | None, intervene: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def intervention_mask(self, labels: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                          shape: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """Where LoReFT interventions act when the caller does not say; None for a model without them."""
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
        intervene: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V]. With `cu_seqlens` (over the flattened B*T tokens) no token attends across
        segments; `position_ids` default to restarting at every segment (or 0..T-1 without segments).

        With pre-shifted `labels` [B, T] it returns the summed cross-entropy instead (see `trainer.loss`), so
        the chunked loss never materialises the logits and, under FSDP2, reads the root's unsharded head.

        With LoReFT interventions, `intervene` [B, T] (bool) says where they act; by default the first / last
        prompt tokens of every segment, the prompt ending where the labels start (`trainer.reft.packed_mask`)."""
        b, t = input_ids.shape
        if position_ids is None:
            cp = getattr(self, "context_parallel", None)  # a row slice: positions of the whole row, then sliced
            full = t * cp.size if cp is not None else t
            position_ids = (
                positions_from_cu_seqlens(cu_seqlens, b, full)
                if cu_seqlens is not None
                else torch.arange(full, device=input_ids.device).expand(b, full)
            )
            if cp is not None:
                position_ids = position_ids[:, cp.indices(t, device=input_ids.device)]
        if intervene is None:
            intervene = self.intervention_mask(labels, cu_seqlens, (b, t), input_ids.device)
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen, intervene)
        if labels is not None:
            return head_loss(hidden, self.head, labels, self.loss_config)
        return self.logits(hidden)


class Transformer(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation_checkpointing = False  # set by the trainer (model.activation_checkpointing config key)
        self.loss_config = LossConfig()  # how forward(labels=...) computes the loss (model.loss* config keys)
        self.reft_positions = None  # LoReFT's trainer.reft.ReftPositions once layers have interventions
        self.prefix_tokens = 0  # prefix tuning's virtual tokens per layer; real positions start after them
        # trainer.context_parallel.ContextParallel when parallel.cp > 1 (set by the trainer): the inputs are this
        # rank's slice of every row, cu_seqlens those of the whole rows.
        self.context_parallel = None
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with lm_head when the checkpoint ties them.

        Call again after anything that replaces parameters (e.g. `to_empty`), which unties them silently.
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def head(self) -> nn.Module:
        return self.lm_head

    def intervention_mask(self, labels: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                          shape: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        if self.reft_positions is None:
            return None
        from trainer.reft_positions import packed_mask

        return packed_mask(self.reft_positions, shape[0], shape[1], labels, cu_seqlens, device)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None,
                      max_seqlen: int | None, intervene: torch.Tensor | None = None) -> torch.Tensor:
        b, t = input_ids.shape
        if self.prefix_tokens:  # as transformers places tokens after a prefix in the cache (trainer.prefix)
            position_ids = position_ids + self.prefix_tokens
        h = self.model.embed_tokens(input_ids)
        if torch.is_autocast_enabled(h.device.type):
            # Embedding lookups are not autocast; run the residual stream in the compute dtype, as FSDP2 mixed
            # precision would, so the attention backend (e.g. varlen, which needs bf16) is chosen for it.
            h = h.to(torch.get_autocast_dtype(h.device.type))
        inv_freq = rope_inv_freq(self.config, device=h.device)
        cos, sin = rope_cos_sin(inv_freq, position_ids, h.dtype, rope_attention_factor(self.config))
        if self.context_parallel is not None:
            from trainer.context_parallel import prepare_attention

            ctx = prepare_attention(self.context_parallel, self.config.attn_backend, b, t, h.device, cu_seqlens,
                                    windows=self.config.sliding_windows, prefix_len=self.prefix_tokens)
        else:
            ctx = attention.prepare(
                self.config.attn_backend,
                b,
                t,
                h.device,
                h.dtype,
                cu_seqlens=cu_seqlens,
                max_seqlen=max_seqlen,
                windows=self.config.sliding_windows,
                prefix_len=self.prefix_tokens,
            )
        # prefix_projection: the MLP runs once per forward, outside the checkpointed blocks; [L, 2, P, kv, hd]
        prefix = self.model.prefix() if self.model.prefix is not None else None
        for i, layer in enumerate(self.model.layers):
            kv = (prefix[i, 0], prefix[i, 1]) if prefix is not None else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its activations in backward (memory for ~1/3 more compute).
                h = checkpoint(layer, h, cos, sin, ctx, None, intervene, kv, use_reentrant=False)
            else:
                h = layer(h, cos, sin, ctx, None, intervene, kv)
        return self.model.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        logit_index: torch.Tensor | None = None,
        intervene: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Incremental decoding: logits [B, T, V] for the next T tokens of every row (see `KVCache`).

        The tokens go to the slots `cache.begin()` reserved and attend to every valid earlier slot of their row.
        `logit_index` [B] keeps one position per row before the head ([B, 1, V]), so a long prompt's prefill
        never materialises B x T x vocab logits. `intervene` [B, T]: where LoReFT interventions act (the
        prompt's positions at prefill; None, no intervention, for generated tokens)."""
        h = self.model.embed_tokens(input_ids)
        if torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        inv_freq = rope_inv_freq(self.config, device=h.device)
        rope_ids = position_ids + self.prefix_tokens if self.prefix_tokens else position_ids
        cos, sin = rope_cos_sin(inv_freq, rope_ids, h.dtype, rope_attention_factor(self.config))
        for layer in self.model.layers:
            h = layer(h, cos, sin, None, cache, intervene)
        if logit_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logit_index].unsqueeze(1)
        return self.lm_head(self.model.norm(h))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init as transformers does (normal(0, initializer_range), zero biases, unit norms), for models
        trained from scratch and for materialising a meta-device model before loading."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """position_ids [B, T] restarting at 0 at every segment start."""
    seg = attention.segment_ids_from_cu_seqlens(cu_seqlens.to(torch.int64), batch, seqlen).flatten()
    idx = torch.arange(batch * seqlen, device=cu_seqlens.device)
    return (idx - cu_seqlens.to(torch.int64)[seg]).view(batch, seqlen)


class KVCache:
    """Static key/value buffers for incremental decoding: one [B, S, Hkv, D] pair per layer, preallocated.

    Why static: the buffers never grow, so a decode step has the same shapes every time (what torch.compile and
    CUDA graphs need) and memory is known up front. Each slot also records whether it holds a real token and its
    RoPE position, so a batch may be padded anywhere (left, right, or both): padded slots are never attended to,
    and a query attends to the valid slots of its own row up to its own position (and within a sliding window).

    Use: `slots = cache.begin(positions, valid)` for the next T tokens of every row (returns the slot indices),
    then `model.forward_cached(ids, positions, cache)`; every layer writes its keys/values to those slots.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.positions = torch.zeros(batch, max_len, device=device, dtype=torch.long)
        self.windows = tuple(dict.fromkeys(config.sliding_windows))
        self.max_len = max_len
        self.length = 0  # slots in use (host int: how far begin() has advanced)
        self._slots = torch.zeros(0, device=device, dtype=torch.long)
        self._masks: dict[int | None, torch.Tensor] = {}

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Reserve the next T slots for tokens at `positions` [B, T] (`valid` [B, T]: False for padding) and
        build the attention masks every layer shares for them."""
        t = positions.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens > {self.max_len} slots")
        slots = torch.arange(self.length, self.length + t, device=self.valid.device)
        self.length += t
        self._set_slots(slots, positions, valid)
        return slots

    def _set_slots(self, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        if valid is None:
            valid = torch.ones_like(positions, dtype=torch.bool)
        self.positions.index_copy_(1, slots, positions.to(torch.long))
        self.valid.index_copy_(1, slots, valid)
        self._slots = slots
        qpos = positions.to(torch.long)[:, :, None]  # [B, T, 1]
        kpos = self.positions[:, None, :]  # [B, 1, S]
        own = slots[None, :, None] == torch.arange(self.max_len, device=slots.device)[None, None, :]
        base = self.valid[:, None, :] & (kpos <= qpos)
        for w in self.windows:
            mask = base if w is None else base & (qpos - kpos < w)
            # A padded query sees at least its own slot: a row of -inf only would give NaN, which the
            # zero attention weights of later queries would still spread (0 * NaN).
            self._masks[w] = (mask | own).unsqueeze(1)  # [B, 1, T, S]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
        """Store this layer's k/v [B, T, Hkv, D] in the reserved slots and attend q [B, T, H, D] over the cache."""
        self.k[layer].index_copy_(1, self._slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(1, self._slots, v.to(self.v.dtype))
        kt, vt = self.k[layer].transpose(1, 2), self.v[layer].transpose(1, 2)  # [B, Hkv, S, D]
        mask = self._masks[window]
        if not torch.compiler.is_compiling():  # eager: skip the slots not filled yet (compiled: fixed shapes)
            kt, vt, mask = kt[:, :, : self.length], vt[:, :, : self.length], mask[..., : self.length]
        qt = q.transpose(1, 2).to(kt.dtype)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=kt.shape[1] != qt.shape[1])
        return out.transpose(1, 2).to(q.dtype)
