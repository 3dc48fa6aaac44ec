"""LoRA adapters on disk in the PEFT format, so `peft.PeftModel.from_pretrained(hf_model, dir)` loads them.

A directory holds `adapter_config.json` (a `LoraConfig`) and `adapter_model.safetensors` whose keys are PEFT's:
`base_model.model.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector` (DoRA),
`.lora_embedding_A` / `.lora_embedding_B` (embeddings), and `base_model.model.<module>.<param>` for base
parameters trained in full (listed in `modules_to_save`).

MoSLoRA's mixer M (B M A) is folded into A on export (A' = M A), so the file is a plain PEFT LoRA.

PiSSA trains A, B on the residual W - s B0 A0, which the base checkpoint does not contain. Like PEFT's
`path_initial_model_for_weight_conversion`, the export folds the init into a plain LoRA on the original
weights: A' = [A; A0], B' = [B, -B0], rank 2r, alpha doubled (x sqrt(2) with rsLoRA) so the scaling is unchanged.

Tied embeddings trained in full (`freeze_exclude: ["model.embed_tokens.weight"]` on a model with
`tie_word_embeddings`): the trainer updates one matrix that is both the input embedding and the LM head. PEFT
keeps a `modules_to_save` copy of the embedding only, leaving the head on the old weights, unless the adapter
says `ensure_weight_tying: true`; then it ties the head to the same copy and reads it under both keys. So such an
adapter is written as PEFT writes one: the flag set and the trained matrix under `model.embed_tokens.weight` and
`lm_head.weight`. An embedding LoRA (target_modules) stays untied, as trained: it changes the input lookup only.

An adapter trained on a quantized base (`peft.weight_quantize_algo`) is an ordinary PEFT adapter for the
full-precision base, plus `quantized_base.json` (trainer.quantize.BASE_RECORD) saying which base it actually saw,
so `trainer merge-adapter` can merge into that one.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import PeftSection
from trainer.lora import LoraEmbedding, base_name, is_adapter_param, lora_modules
from trainer.peft_methods import MoraLinear, VeraLinear, adapter_param_names
from trainer.quantize import BASE_RECORD, base_record
from trainer.weights import copy_tokenizer_files, replace_dir, write_safetensors

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
EMBED, HEAD = "model.embed_tokens", "lm_head"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather(param: torch.Tensor) -> torch.Tensor:
    full = param.full_tensor() if hasattr(param, "full_tensor") else param  # collective on every rank
    return full.detach().to("cpu", torch.float32).contiguous().clone()


def _target_list(model: nn.Module, targets: list[str]) -> list[str]:
    """Leaf names (`q_proj`) when they select exactly the adapted modules, else the full module names."""
    from trainer.lora import LORA_MODULES
    from trainer.weights import hf_name

    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    adaptable = {
        hf_name(n) for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding, *LORA_MODULES))
        and not any(hf_name(n).startswith(t + ".") for t in targets)  # skip the wrappers' base_layer children
    }
    same = {a for a in adaptable if a.rsplit(".", 1)[-1] in leaves}
    return leaves if same == set(targets) else sorted(targets)


def adapter_state(model: nn.Module, cfg: PeftSection) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Gather the adapters (and fully trained base parameters) under PEFT's key names.

    Every rank must call this under FSDP2 (parameters are gathered collectively); rank 0 gets the tensors.
    Returns (tensors, adapted module names, modules_to_save). A trained tied embedding is also written as the
    head's weight (see the module docstring); `ties_trained_embedding` says when.
    """
    from trainer.weights import _reshard_fsdp, hf_name

    _reshard_fsdp(model)
    out: dict[str, torch.Tensor] = {}
    targets = []
    for name, module in lora_modules(model):
        targets.append(name)
        key = PREFIX + name
        if cfg.pet_type in ("vera", "lokr"):  # PEFT names them as our parameters: <module>.vera_lambda_b, ...
            for pname in adapter_param_names(module):
                out[f"{key}.{pname}"] = _gather(getattr(module, pname))
            if isinstance(module, VeraLinear) and "base_model.vera_A" not in out:
                a, b = module.shared  # identical on every rank (drawn from the PRNG key)
                out["base_model.vera_A"], out["base_model.vera_B"] = a.detach().cpu().clone(), b.detach().cpu().clone()
            continue
        if isinstance(module, MoraLinear):
            out[f"{key}.lora_A.weight"] = _gather(module.lora_A)
            continue
        if isinstance(module, LoraEmbedding):
            out[f"{key}.lora_embedding_A"] = _gather(module.lora_embedding_A)
            out[f"{key}.lora_embedding_B"] = _gather(module.lora_embedding_B)
            continue
        a, b = _gather(module.lora_A), _gather(module.lora_B)
        if module.lora_AB is not None:  # MoSLoRA: B M A is the rank-r LoRA (B, M A)
            a = _gather(module.lora_AB) @ a
        init = getattr(module, "pissa_init", None)
        if init is not None:
            a, b = torch.cat([a, init[0]], dim=0), torch.cat([b, -init[1]], dim=1)
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a, b
        if module.lora_magnitude_vector is not None:
            out[f"{key}.lora_magnitude_vector"] = _gather(module.lora_magnitude_vector)
    # Base parameters trained in full (freeze_exclude): PEFT saves their whole module as modules_to_save.
    params = dict(model.named_parameters())
    trained_modules = sorted({
        base_name(hf_name(n)).rsplit(".", 1)[0] for n, p in params.items() if p.requires_grad and not is_adapter_param(n)
    })
    for n, p in params.items():
        key = base_name(hf_name(n))
        if not is_adapter_param(n) and key.rsplit(".", 1)[0] in trained_modules:
            out[PREFIX + key] = _gather(p)
    if ties_trained_embedding(model, trained_modules):
        out[f"{PREFIX}{HEAD}.weight"] = out[f"{PREFIX}{EMBED}.weight"].clone()  # safetensors refuses shared storage
    return out, targets, trained_modules


def ties_trained_embedding(model: nn.Module, modules_to_save: list[str]) -> bool:
    """True when the embedding trained in full is also the model's (tied) LM head."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    return tied and EMBED in modules_to_save


def adapter_config(cfg: PeftSection, target_modules: list[str], modules_to_save: list[str],
                   base_model: str | None, pissa_converted: bool, ensure_weight_tying: bool = False) -> dict[str, Any]:
    from trainer.peft_targets import translated_patterns

    rank, alpha = cfg.lora_rank, cfg.lora_alpha
    rank_pattern, alpha_pattern = translated_patterns(cfg.rank_pattern), translated_patterns(cfg.alpha_pattern)
    if pissa_converted:  # the converted adapter is [A; -A0] / [B, B0]: twice the rank, the same scale
        grow = 2**0.5 if cfg.use_rslora else 2
        rank, alpha = 2 * rank, alpha * grow
        rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
        alpha_pattern = {k: v * grow for k, v in alpha_pattern.items()}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": target_modules,
        "modules_to_save": modules_to_save or None,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "init_lora_weights": "gaussian" if cfg.lora_a_init == "normal" and not cfg.pissa else True,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # PEFT then ties lm_head to the trained embedding copy (it reads both keys from the weights file).
        "ensure_weight_tying": ensure_weight_tying,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: PeftSection, *, base_model: str | None = None,
                 tokenizer_dir: str | Path | None = None, extra_files: dict[str, str] | None = None,
                 overwrite: bool = True) -> Path:
    """Write a PEFT adapter directory atomically (temp sibling renamed into place). Collective under FSDP2.

    `base_model` is written as `base_model_name_or_path` as given (callers pass a hub id or an absolute path,
    see `formats.hub.portable_ref`); the tokenizer files of `tokenizer_dir` and `extra_files` (name -> text,
    e.g. the model card) go in too, so the directory is usable on its own."""
    out_dir = Path(out_dir)
    if cfg.pet_type == "loreft":  # this project's format (peft has no LoReFT), see trainer.reft
        from trainer.reft import interventions, reft_config, reft_state

        tensors, to_save = reft_state(model), []
        targets = [f"model.layers.{i}" for i, _ in interventions(model)]
    elif cfg.pet_type == "prefix_tuning":  # peft's PREFIX_TUNING format, see trainer.prefix
        from trainer.prefix import prefix_config, prefix_state

        tensors, to_save = prefix_state(model), []
        targets = [f"model.layers.{i}" for i in range(len(model.model.layers))]  # every layer, whichever holds them
    else:
        tensors, targets, to_save = adapter_state(model, cfg)
    record = base_record(model, cfg)  # trained on a quantized base: which one, for merge-adapter
    if _rank() == 0:
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"{out_dir} already exists")
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            write_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            if cfg.pet_type == "loreft":
                config = reft_config(model, cfg, base_model)
            elif cfg.pet_type == "prefix_tuning":
                config = prefix_config(model, cfg, base_model)
            elif cfg.pet_type in ("vera", "lokr") or cfg.use_mora:
                from trainer.peft_methods import peft_config

                config = peft_config(cfg, _target_list(model, targets), to_save, base_model)
            else:
                config = adapter_config(cfg, _target_list(model, targets), to_save, base_model, cfg.pissa,
                                        ties_trained_embedding(model, to_save))
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            if record is not None:  # peft knows no quantized base: our file beside its config
                (tmp / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            if tokenizer_dir is not None:
                copy_tokenizer_files(tokenizer_dir, tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
            replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved %s adapter (%d tensors, %d modules) to %s", cfg.pet_type, len(tensors), len(targets), out_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out_dir
