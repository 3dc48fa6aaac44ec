"""VeRA and LoKr: LoRA's siblings, as module wrappers with PEFT's parameter names and PEFT's adapter format.

Both wrap a frozen `nn.Linear` (kept as `base_layer`, like `LoraLinear`), so surgery, freezing, FSDP2 sharding,
checkpoints, exports and merging follow the LoRA path; only the update differs:

- VeRA (Kopiczko et al. 2024): y = base(x) + lambda_b * (B (lambda_d * (A x))). A [r, in_max] and B [out_max, r]
  are random, frozen and shared by every adapted layer (each layer uses its top-left corner); only the vectors
  lambda_d [r] and lambda_b [out] train. A and B are regenerated from `vera_projection_prng_key` exactly as PEFT
  draws them (kaiming-uniform, A then B, from a CPU generator), so they are never checkpointed; the export
  still writes them (PEFT's `save_projection`), so `PeftModel.from_pretrained` needs nothing else.
- LoKr (LyCORIS): delta W = (alpha / r) kron(W1, W2) with W1 [out_l, in_m] and W2 [out_k, in_n] (or W2 = W2a W2b
  of rank r when r is below half W2's larger side), where out = out_l out_k and in = in_m in_n are PEFT's
  `factorization` of the dimensions. Init as PEFT's: W1 = 0, W2 (factors) kaiming-uniform.

Initial values come from the trainer's seed and the module name (world-size independent), as LoRA's.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

VERA_SHARED = ("vera_A", "vera_B")
MORA = "MORA"


def adapter_generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator an adapter's init draws from: a function of the run's seed and the module name only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _kaiming(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """PEFT VeRA's projection init: uniform(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def vera_projections(rank: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen (A, B) of VeRA, drawn as PEFT draws them from `projection_prng_key`."""
    gen = torch.Generator(device="cpu").manual_seed(key)
    a = _kaiming((rank, max_in), gen)
    b = _kaiming((max_out, rank), gen)
    return a, b


class VeraLinear(nn.Module):
    """y = base(x) + lambda_b * F.linear(lambda_d * F.linear(dropout(x), A[:, :in]), B[:out])."""

    def __init__(self, base: nn.Linear, rank: int, dropout: float) -> None:
        super().__init__()
        self.base_layer = base
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.vera_lambda_b = nn.Parameter(torch.empty(base.out_features, **kw))
        self.vera_lambda_d = nn.Parameter(torch.empty(rank, **kw))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank = rank
        self.in_features, self.out_features = base.in_features, base.out_features
        # The shared projections: plain attributes (not parameters or buffers), set by `init_adapters`, so FSDP2
        # neither shards nor checkpoints them and one copy serves every layer.
        self.shared: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def projections(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared is None:
            raise RuntimeError("VeRA projections are not initialised: call init_adapters first")
        a, b = self.shared
        return a[:, : self.in_features].to(dtype), b[: self.out_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        ld, lb = self.vera_lambda_d, self.vera_lambda_b
        xd = self.lora_dropout(x).to(ld.dtype)
        a, b = self.projections(ld.dtype)
        return result + (lb * F.linear(ld * F.linear(xd, a), b)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.projections(torch.float32)
        return (self.vera_lambda_b.float()[:, None] * b) @ (self.vera_lambda_d.float()[:, None] * a)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension: the divisor pair PEFT's LoKr picks (closest to the square root, or to
    `factor` when it divides the dimension)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LokrLinear(nn.Module):
    """y = base(x) + F.linear(x, (alpha / r) kron(W1, W2)); W2 = W2a W2b when decomposed (no input dropout,
    as in PEFT's LoKr)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, decompose_factor: int) -> None:
        super().__init__()
        self.base_layer = base
        out_l, out_k = factorization(base.out_features, decompose_factor)
        in_m, in_n = factorization(base.in_features, decompose_factor)
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m, **kw))
        self.decomposed = rank < max(out_k, in_n) / 2  # PEFT's rule for factoring W2
        if self.decomposed:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, rank, **kw))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, in_n, **kw))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(out_k, in_n, **kw))
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.decomposed else self.lokr_w2
        return torch.kron(self.lokr_w1, w2) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        delta = self.delta_weight()
        return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)

    def trainable_names(self) -> tuple[str, ...]:
        return ("lokr_w1", "lokr_w2_a", "lokr_w2_b") if self.decomposed else ("lokr_w1", "lokr_w2")


def adapter_param_names(module: nn.Module) -> tuple[str, ...]:
    if isinstance(module, VeraLinear):
        return ("vera_lambda_b", "vera_lambda_d")
    return module.trainable_names()


@torch.no_grad()
def init_vera_lokr(modules: list[tuple[str, nn.Module]], cfg, seed: int) -> None:
    """Initial values as PEFT's: VeRA lambda_d = d_initial, lambda_b = 0, shared A/B from the PRNG key; LoKr
    W1 = 0 and W2 (or its factors) kaiming-uniform from a generator of (seed, module name)."""
    from trainer.distributed import assign_full as _assign

    _generator = adapter_generator

    vera = [m for _, m in modules if isinstance(m, VeraLinear)]
    if vera:
        max_in = max(m.in_features for m in vera)
        max_out = max(m.out_features for m in vera)
        a, b = vera_projections(cfg.vera_rank, max_in, max_out, cfg.vera_projection_prng_key)
        device = vera[0].vera_lambda_d.device
        shared = (a.to(device), b.to(device))
        for m in vera:
            m.shared = shared
            _assign(m.vera_lambda_d, torch.full(tuple(m.vera_lambda_d.shape), cfg.vera_d_initial))
            _assign(m.vera_lambda_b, torch.zeros(tuple(m.vera_lambda_b.shape)))
    for name, m in modules:
        if not isinstance(m, LokrLinear):
            continue
        gen = _generator(seed, name)
        _assign(m.lokr_w1, torch.zeros(tuple(m.lokr_w1.shape)))
        for pname in m.trainable_names()[1:]:
            t = torch.empty(tuple(getattr(m, pname).shape))
            nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
            _assign(getattr(m, pname), t)


def peft_config(cfg, target_modules: list[str], modules_to_save: list[str], base_model: str | None) -> dict:
    """adapter_config.json for a VeRA or LoKr adapter, with the fields PEFT reads back."""
    common = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": target_modules,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "init_weights": True,
    }
    if cfg.use_mora:  # peft has no MoRA: our own peft_type, read back by merge-adapter
        return {**common, "peft_type": MORA, "r": cfg.lora_rank, "mora_type": cfg.mora_type,
                "lora_dropout": cfg.lora_dropout, "format": "sftkit MoRA: <module>.lora_A.weight is M [r^, r^]"}
    if cfg.pet_type == "vera":
        return {**common, "peft_type": "VERA", "r": cfg.vera_rank, "projection_prng_key": cfg.vera_projection_prng_key,
                "save_projection": True, "vera_dropout": cfg.lora_dropout, "d_initial": cfg.vera_d_initial,
                "fan_in_fan_out": False, "bias": "none"}
    return {**common, "peft_type": "LOKR", "r": cfg.lokr_rank, "alpha": cfg.lokr_alpha, "rank_dropout": 0.0,
            "module_dropout": 0.0, "rank_dropout_scale": False, "decompose_both": False,
            "decompose_factor": cfg.lokr_decompose_factor, "use_effective_conv2d": False,
            "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None}


# ------------------------------------------------------------------------------------------------- MoRA


def mora_rank(in_features: int, out_features: int, lora_rank: int, mora_type: int) -> int:
    """MoRA's r^: the side of the square matrix with LoRA rank r's parameter count, r^2 ~ (in + out) r
    (even for the RoPE variant, whose rotation pairs the halves of each chunk)."""
    r = int(math.sqrt((in_features + out_features) * lora_rank) + 0.5)
    return max(2, r // 2 * 2) if mora_type == 6 else r


def mora_apply(x: torch.Tensor, m: torch.Tensor, in_features: int, out_features: int, mora_type: int) -> torch.Tensor:
    """MoRA's update f_decomp(M f_comp(x)) (Jiang et al. 2024) for x [..., in] -> [..., out].

    The input is padded to a multiple of r^ by repeating its first features, then cut into chunks of r^.
    Type 1 (sharing, the paper's eq. 6): the chunks are summed, M applied once, and the result repeated to
    fill `out`. Type 6 (RoPE, eq. 9): each chunk k is rotated as RoPE rotates position k, M is applied to every
    chunk, and the concatenation is cut (or repeated) to `out`. The update is linear in x, so merging is exact.
    """
    r = m.shape[0]
    pad = -in_features % r
    if pad:
        x = torch.cat([x, x[..., :pad]], dim=-1)
    chunks = x.reshape(*x.shape[:-1], x.shape[-1] // r, r)
    if mora_type == 1:
        out = F.linear(chunks.sum(dim=-2), m)
    else:
        n = chunks.shape[-2]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2, device=x.device, dtype=torch.float32) / r))
        angles = torch.outer(torch.arange(n, device=x.device, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rotated = torch.cat([-chunks[..., r // 2:], chunks[..., : r // 2]], dim=-1)
        out = F.linear(chunks * cos + rotated * sin, m).reshape(*x.shape[:-1], n * r)
    if out.shape[-1] < out_features:
        out = torch.cat([out] * -(-out_features // out.shape[-1]), dim=-1)
    return out[..., :out_features]


class MoraLinear(nn.Module):
    """y = base(x) + f_decomp(M f_comp(dropout(x))): one trainable square matrix M [r^, r^], zeros at init."""

    def __init__(self, base: nn.Linear, lora_rank: int, dropout: float, mora_type: int) -> None:
        super().__init__()
        self.base_layer = base
        self.mora_type = mora_type
        self.rank = mora_rank(base.in_features, base.out_features, lora_rank, mora_type)
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.rank, device=base.weight.device, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        m = self.lora_A
        update = mora_apply(self.lora_dropout(x).to(m.dtype), m, self.in_features, self.out_features, self.mora_type)
        return result + update.to(result.dtype)


def mora_delta(m: torch.Tensor, in_features: int, out_features: int, mora_type: int) -> torch.Tensor:
    """The [out, in] weight update of a MoRA matrix: the (linear) update applied to the identity."""
    eye = torch.eye(in_features, dtype=m.dtype, device=m.device)
    return mora_apply(eye, m, in_features, out_features, mora_type).t()


ADAPTER_MODULES = (VeraLinear, LokrLinear, MoraLinear)
