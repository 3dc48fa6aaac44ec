"""The trainer's one YAML config: typed sections, every key documented, unknown keys rejected.

Sections follow what MindFormers and PaddleNLP users already know (model / data / train / parallel /
checkpoint / logging). Every field carries its documentation in `metadata["doc"]`, which
`trainer config-doc` prints, so the docs cannot drift from the code. A typo such as `train.lerning_rate`
fails at load time with a "did you mean" instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from formats.atomic import write_text_atomic
from trainer.reporting import ReportTo


class ConfigError(ValueError):
    """The config file or an override is invalid; the message names the key."""


def doc(text: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelSection:
    path: str = doc("Hugging Face checkpoint directory (config.json + *.safetensors, tokenizer files).", "")
    overrides: dict[str, Any] = doc(
        "Keys replacing config.json values, e.g. {num_hidden_layers: 4} for a small run.", factory=dict
    )
    backend: Literal["auto", "native", "hf"] = doc(
        "Model implementation: native (this repo's decoder: llama, mistral, qwen2, qwen3) | hf (the transformers "
        "model of any AutoModelForCausalLM config, e.g. Gemma 3, Phi-3, Qwen3-MoE, Mixtral; never remote code) | "
        "auto (native where it exists, else hf).",
        "auto",
    )
    dtype: Literal["auto", "fp32", "bf16"] = doc(
        "Parameter dtype for compute: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16.", "auto")
    frozen_dtype: Literal["auto", "fp32", "bf16"] = doc(
        "Storage dtype of frozen parameters (the base under LoRA, freeze_include): auto = the compute dtype (bf16 "
        "on CUDA, fp32 on CPU) | fp32 | bf16 (needs model.dtype bf16). Trainable parameters, LoRA adapters "
        "included, and their optimizer state stay fp32.",
        "auto",
    )
    attn_backend: Literal["auto", "sdpa", "flex", "varlen"] = doc(
        "Attention over packed rows: auto | sdpa | flex | varlen.", "auto")
    activation_checkpointing: bool = doc("Recompute each block's activations in backward to save memory.", False)
    compile: bool = doc("torch.compile each transformer block.", False)
    loss: Literal["chunked", "full"] = doc(
        "chunked: only trained positions (label != -100) go through the LM head, loss_chunk_tokens at a time, "
        "so no [tokens x vocab] logits tensor exists (same loss and gradients) | full: logits for every position.",
        "chunked",
    )
    loss_chunk_tokens: int = doc("Trained positions per LM-head chunk of the chunked loss (memory ~ this x vocab).",
                                 1024)


@dataclass
class DataSection:
    train: list[str] = doc("Packed dataset directories made by `dataprep pack` (one or several).", factory=list)
    weights: list[float] | None = doc("Mixing weights, one per train dataset (default: proportional to rows).", None)
    eval: str | None = doc("Packed dataset directory for evaluation loss (optional).", None)
    micro_batch_size: int = doc("Packed rows per rank per forward/backward.", 1)
    num_workers: int = doc(
        "DataLoader worker processes per rank. 0 reads in the training process (about 16k rows of 4096 tokens/s "
        "on one CPU core, far more than a GPU trains on); workers help when that process has no CPU time to spare.",
        0,
    )
    shuffle: bool = doc("Shuffle rows each epoch (deterministic in seed and epoch).", True)
    verify: Literal["full", "checksums", "off"] = doc(
        "Before training, check the data so a corrupt, edited or crafted dataset stops the run instead of being "
        "trained on: full re-hashes every shard and checks every row (ids in the model's vocabulary, labels "
        "inside their document, lengths, padding); checksums only re-hashes; off trusts the data.", "full")
    remainder: Literal["drop", "pad"] = doc(
        "Rows that do not fill a global batch at epoch end: drop | pad (pad rows are never trained).", "drop")


@dataclass
class TrainSection:
    lr: float = doc("Peak learning rate.", 2e-5)
    optimizer: Literal["adamw", "adamw_8bit"] = doc(
        "adamw (fp32 moments) | adamw_8bit (bitsandbytes AdamW8bit: 8-bit moments, a quarter of the optimizer "
        "memory; one process only; needs bitsandbytes).", "adamw",
    )
    min_lr_ratio: float = doc("Final learning rate as a fraction of lr (cosine/linear).", 0.0)
    schedule: Literal["cosine", "linear", "constant"] = doc(
        "Learning-rate schedule after warmup: cosine | linear | constant.", "cosine")
    warmup_steps: int = doc("Linear warmup steps from 0 to lr.", 0)
    warmup_ratio: float = doc(
        "Warmup as a fraction of the run's optimizer steps (rounded down), for configs that size warmup by the "
        "run length; set warmup_steps or warmup_ratio, not both.", 0.0)
    max_steps: int | None = doc("Optimizer steps to run; if unset, run `epochs` epochs.", None)
    epochs: float = doc("Epochs to run when max_steps is unset.", 1.0)
    grad_accum_steps: int = doc("Micro-batches per optimizer step on each rank.", 1)
    weight_decay: float = doc("AdamW decoupled weight decay; never applied to norms, biases or embeddings' norms.", 0.0)
    betas: list[float] = doc("AdamW betas.", factory=lambda: [0.9, 0.95])
    eps: float = doc("AdamW epsilon.", 1e-8)
    max_grad_norm: float | None = doc("Clip the global gradient norm to this value (null disables).", 1.0)
    seed: int = doc("Seed for data order and any random init.", 1234)
    eval_every: int = doc("Evaluate on data.eval every N steps (0 disables).", 0)
    deterministic: bool = doc("Use deterministic algorithms (bitwise-reproducible runs on CPU).", False)
    nonfinite: Literal["fail", "skip"] = doc(
        "A step whose loss or gradient norm is NaN/Inf: fail (stop with exit 1, naming the step; the parameters "
        "are those before it) | skip (drop the update, count it, go on; fail after max_skipped_steps).", "fail")
    max_skipped_steps: int = doc("With nonfinite: skip, fail once more than this many steps were skipped.", 10)


@dataclass
class ParallelSection:
    backend: Literal["auto", "nccl", "gloo"] = doc(
        "Process group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo.", "auto")
    reshard_after_forward: bool = doc("FSDP2: free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2).", True)
    cpu_offload: bool = doc(
        "FSDP2 CPUOffloadPolicy (several ranks): sharded parameters, gradients and optimizer state live in host "
        "memory and each block's shard is copied to the GPU for its compute; for models whose shards do not fit.",
        False,
    )
    dp_replicate: int = doc(
        "Data-parallel replicas (HSDP): parameters are sharded over dp_shard ranks inside each replica and "
        "gradients all-reduced across replicas; 1 = plain FSDP2 over dp_shard.", 1)
    dp_shard: int = doc(
        "Ranks FSDP2 shards parameters over; -1 = whatever is left of the world size after "
        "dp_replicate x tp x cp. Rows are split over dp_replicate x dp_shard ranks (ranks of one tp group read "
        "the same rows). MindFormers data_parallel, PaddleNLP sharding_parallel_degree.", -1)
    tp: int = doc(
        "Tensor-parallel degree (native models, full fine-tuning): each block's q/k/v/gate/up projections are "
        "split by output column and o/down by input row over tp ranks (DTensor), composed with FSDP2 on the "
        "data-parallel ranks; must divide the attention and key/value head counts and intermediate_size. "
        "MindFormers model_parallel, PaddleNLP tensor_parallel_degree.", 1)
    sequence_parallel: bool = doc(
        "With tp > 1, also shard the norms and the residual stream along the sequence between the "
        "tensor-parallel matmuls (Megatron's sequence parallelism: the same result, activations / tp; needs "
        "seq_length divisible by tp); false keeps them whole on every tp rank. MindFormers use_seq_parallel.",
        True)
    cp: int = doc(
        "Context-parallel degree (native models, sdpa attention): the cp ranks of one data-parallel group read "
        "the same rows, each keeps 1/cp of every row's positions and attention reaches the rest of the row "
        "(cp_attention; documents and causality exact across the split); FSDP2 shards over dp_shard x cp; needs "
        "seq_length divisible by cp (2 cp with cp_load_balance); not with tp, model.backend hf, loreft, prefix "
        "tuning or NEFTune. MindFormers context_parallel, PaddleNLP sep_parallel_degree.", 1)
    cp_attention: Literal["allgather", "ring"] = doc(
        "How attention reaches the other cp ranks' positions: allgather (every layer gathers the row's keys/values: "
        "simple, K/V memory of the whole row) | ring (keys/values pass round the cp ranks block by block and the "
        "blocks are combined exactly: K/V memory of T/cp, blocks the causal/document mask hides are skipped).",
        "allgather")
    cp_load_balance: bool | None = doc(
        "Hold chunks r and 2cp-1-r of the 2 cp chunks of every row on cp rank r instead of one contiguous slice, "
        "so every rank has the same causal attention work (needs seq_length divisible by 2 cp); null: on with "
        "cp_attention ring, off with allgather (whose masked attention costs the same on every rank).", None)
    pp: int = doc(
        "Pipeline-parallel stages: not supported (only 1); use tp and dp_shard. MindFormers pipeline_stage, "
        "PaddleNLP pipeline_parallel_degree.", 1)

    # The seeds' names for these keys, read as this section's own (see `_apply_key_aliases`).
    KEY_ALIASES: ClassVar[dict[str, str]] = {
        "data_parallel": "dp_shard",  # MindFormers
        "model_parallel": "tp",
        "context_parallel": "cp",
        "pipeline_stage": "pp",
        "use_seq_parallel": "sequence_parallel",
        "tensor_parallel_degree": "tp",  # PaddleNLP
        "sharding_parallel_degree": "dp_shard",
        "sep_parallel_degree": "cp",
        "context_parallel_degree": "cp",
        "pipeline_parallel_degree": "pp",
    }


@dataclass
class CheckpointSection:
    every_steps: int = doc("Save a resumable checkpoint every N steps (0 disables).", 0)
    keep: int = doc("Keep the newest K complete checkpoints (K >= 2).", 2)
    resume: str = doc("auto (newest complete checkpoint in output_dir) | none | PATH.", "auto")
    export: bool = doc("Export final weights in Hugging Face format (safetensors) to output_dir/export.", True)
    save_format: Literal["dcp", "dcp+hf"] = doc(
        "dcp: checkpoints only | dcp+hf: also export HF weights (LoRA: the PEFT adapter) at every checkpoint "
        "to output_dir/exports/step-N, keeping the newest `keep`.",
        "dcp",
    )
    max_shard_size: str = doc("Largest safetensors shard in exports, e.g. 2GB or 500MB.", "2GB")
    allow_config_change: bool = doc(
        "On resume, accept changes to the optimizer and schedule (lr, schedule, warmup, weight decay, betas, eps, "
        "clipping) and apply them from the resumed step on. Changes to the model, "
        "the adapters, the data or the seed are always refused: the checkpoint would not be that run.", False)


PetType = Literal["lora", "vera", "lokr", "loreft", "prefix_tuning"]
# Quantized frozen bases (PaddleNLP's weight_quantize_algo values).
QuantAlgo = Literal["nf4", "fp4", "weight_only_int8", "weight_only_int4"]


@dataclass
class PeftSection:
    pet_type: PetType | None = doc(
        "Parameter-efficient method: null (full fine-tuning) | lora | vera (shared random projections, trained "
        "scaling vectors; vera_* keys) | lokr (Kronecker-product update; lokr_* keys). All adapt the Linear "
        "modules target_modules matches and export a PEFT adapter | loreft (LoReFT: learned low-rank edits of the "
        "hidden states at chosen layers and prompt positions; reft_* keys; saved in this project's format, never "
        "merged; native models) | prefix_tuning (learned keys / values every attention layer attends to first; "
        "num_virtual_tokens; peft's PREFIX_TUNING format, never merged; native models, sdpa attention).", None)
    lora_rank: int = doc("LoRA rank r (columns of A / rows of B).", 8)
    lora_alpha: float = doc("LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).", 16.0)
    lora_dropout: float = doc("Dropout on the adapter's input during training (0 disables).", 0.0)
    lora_a_init: Literal["kaiming", "normal", "zeros"] = doc(
        "Init of A: kaiming (uniform, as nn.Linear and PEFT's default) | normal (std 1/r, PEFT's 'gaussian') | zeros.",
        "kaiming",
    )
    lora_b_init: Literal["zeros", "normal", "kaiming"] = doc(
        "Init of B: zeros (the adapted model starts equal to the base) | normal (std 1/r) | kaiming. "
        "Embedding adapters always start as PEFT's: A zeros, B normal(0, 1).",
        "zeros",
    )
    target_modules: str | list[str] = doc(
        "Modules to adapt, in PEFT's conventions: a list of names matched as suffixes ([q_proj, v_proj]), "
        "'all-linear' (every Linear but lm_head), plain names joined by | (q_proj|v_proj, also suffixes), or any "
        "other string as a regex matching the whole name ('.*q_proj|.*v_proj', 'model\\.layers\\.[0-3]\\..*'). "
        "MindFormers and Megatron names are read as HF names (wq wk wv wo, w1 w2 w3, tok_embeddings, "
        "word_embeddings; linear_qkv = q/k/v_proj, linear_proj = o_proj, linear_fc1 = gate+up_proj, linear_fc2 = "
        "down_proj). Linear layers and embed_tokens can be targeted.",
        ".*q_proj|.*k_proj|.*v_proj|.*o_proj",
    )
    freeze_include: list[str] = doc(
        "Globs over parameter names to freeze, on top of the base weights LoRA freezes anyway "
        "(e.g. 'model.embed_tokens.*' in a full fine-tuning run).", factory=list,
    )
    modules_to_save: list[str] = doc(
        "PEFT's modules_to_save: modules trained in full beside the adapters and saved with them, by name suffix "
        "(e.g. [lm_head] or [embed_tokens]); the same as freeze_exclude globs over their parameters.",
        factory=list,
    )
    freeze_exclude: list[str] = doc(
        "Globs over parameter names never frozen; exclude wins over include. With LoRA, base parameters matched "
        "here train in full next to the adapters (e.g. '*norm.weight').", factory=list,
    )
    rank_pattern: dict[str, int] = doc(
        "PEFT's rank_pattern: a rank per module, by regex matched against the end of the module name (the first "
        "key where `(.*\\.)?(KEY)$` matches wins), e.g. {'down_proj': 16, 'layers\\.0\\.self_attn\\.q_proj': 4}; "
        "others keep lora_rank. Exported as is, so PEFT loads the same ranks.", factory=dict)
    alpha_pattern: dict[str, float] = doc(
        "PEFT's alpha_pattern: a lora_alpha per module, matched as rank_pattern is.", factory=dict)
    use_rslora: bool = doc("rsLoRA: scale by alpha / sqrt(r) so large ranks keep learning.", False)
    loraplus_lr_ratio: float | None = doc(
        "LoRA+: B matrices learn at lr x this ratio (e.g. 16); null = same lr as A.", None
    )
    pissa: bool = doc(
        "PiSSA init: A, B from the top-r singular vectors of the base weight, which keeps the residual. "
        "Exports convert it to a plain LoRA (rank 2r) on the original weights.", False,
    )
    use_dora: bool = doc("DoRA: learn a per-output-row magnitude on top of the LoRA direction (Linear targets).", False)
    neftune_noise_alpha: float | None = doc(
        "NEFTune: add uniform noise of scale alpha / sqrt(T * hidden) to input embeddings in training "
        "(T = packed row length); null disables. Also works with pet_type null.", None,
    )
    export_merged: bool = doc(
        "Besides the adapter export, also write merged full weights (base + adapter) to output_dir/export-merged.",
        False,
    )
    lora_use_mixer: bool = doc(
        "MoSLoRA (PaddleNLP's key): a trainable r x r mixer between A and B (update s B M A); exported folded into "
        "A, as a plain PEFT LoRA.", False)
    use_mora: bool = doc(
        "MoRA (PaddleNLP's key): replace each LoRA pair by one trainable square matrix M of side "
        "r^ = sqrt((in + out) lora_rank) between fixed compression / decompression maps (high-rank update, "
        "LoRA's parameter count). Saved in this project's format (peft has no MoRA); merge-adapter folds it.", False)
    mora_type: Literal[1, 6] = doc("MoRA's compression: 6 = RoPE-rotated chunks (for small ranks) | 1 = summed chunks "
                         "(sharing, for large ranks).", 6)
    reft_rank: int = doc("LoReFT: rank r of the edit h + R^T (W h + b - R h) (R [r, hidden], orthonormal rows). "
                         "PaddleNLP's ReFT `rank`.", 4)
    reft_layers: str | list[int] = doc(
        "LoReFT: the decoder layers whose outputs are edited: all | a list of indices | PaddleNLP's '2;5;8'. "
        "PaddleNLP's ReFT `layers`.", "all")
    reft_positions: str = doc(
        "LoReFT: which tokens are edited, f<k>+l<k> = the first k and last k prompt tokens of each document (in a "
        "packed row the prompt ends at the document's first trained label; at generation, the prompt given; "
        "generated tokens are not edited); also f<k> or l<k>. PaddleNLP's ReFT `position`.", "f7+l7")
    # PaddleNLP's ReFT argument names, read as this section's own (see `_apply_key_aliases`).
    num_virtual_tokens: int = doc(
        "Prefix tuning: learned key / value slots per layer (peft's num_virtual_tokens, PaddleNLP's "
        "num_prefix_tokens).", 20)
    prefix_tuning: bool = doc("PaddleNLP's switch: true is pet_type prefix_tuning.", False)
    prefix_projection: bool = doc(
        "Prefix tuning's reparametrisation (peft's / PaddleNLP's key): train an embedding [num_virtual_tokens, "
        "kv heads x head_dim] and a two-layer tanh MLP whose output is every layer's prefix, instead of the "
        "prefixes themselves. Only the MLP's output is exported (as peft does), so the adapter file is the same.",
        False)
    encoder_hidden_size: int | None = doc(
        "Prefix tuning with prefix_projection: the MLP's hidden width (peft's name; PaddleNLP's "
        "prefix_projection_hidden_size); null = kv heads x head_dim, peft's default.", None)
    # PaddleNLP's ReFT and prefix-tuning argument names, read as this section's own (see `_apply_key_aliases`).
    KEY_ALIASES: ClassVar[dict[str, str]] = {"rank": "reft_rank", "layers": "reft_layers", "position": "reft_positions",
                                             "num_prefix_tokens": "num_virtual_tokens",
                                             "prefix_projection_hidden_size": "encoder_hidden_size"}
    vera_rank: int = doc("VeRA: rank r of the shared random projections A [r, in] and B [out, r].", 256)
    vera_d_initial: float = doc("VeRA: initial value of every lambda_d entry (lambda_b starts at 0).", 0.1)
    vera_projection_prng_key: int = doc("VeRA: seed of the shared projections (PEFT's projection_prng_key).", 0)
    lokr_rank: int = doc("LoKr: rank of W2's factors (W2 is kept whole when the rank is at least half its side).", 8)
    lokr_alpha: float = doc("LoKr: the update kron(W1, W2) is scaled by lokr_alpha / lokr_rank.", 8.0)
    lokr_decompose_factor: int = doc(
        "LoKr: split each dimension as factor x (dim / factor); -1 picks the divisor pair nearest the square root.", -1)
    weight_quantize_algo: QuantAlgo | None = doc(
        "QLoRA: store the frozen Linear weights of the decoder layers quantized (PaddleNLP's key and values): "
        "nf4 = 4-bit NormalFloat with double quantization (torchao) | fp4 = QLoRA's 4-bit float with double "
        "quantization (bitsandbytes) | weight_only_int8 = int8, one symmetric scale per output row (torchao) | "
        "weight_only_int4 = int4, one symmetric scale per weight_only_int4_group_size weights of a row (torchao). "
        "Quantized tensor by tensor while loading, dequantized per matmul. Adapters, norms, embeddings, the LM head "
        "and fused MoE experts stay unquantized. null disables.", None,
    )
    qlora_weight_blocksize: int = doc("NF4 / FP4: weights per absmax scale (QLoRA's 64).", 64)
    qlora_weight_double_quant_block_size: int = doc(
        "NF4 double quantization: block scales per int8-quantized group (QLoRA's 256). A tensor is quantized "
        "when its size is a multiple of blocksize x this. FP4 (bitsandbytes) fixes it at 256.", 256,
    )
    weight_only_int4_group_size: int = doc(
        "weight_only_int4: weights of a row per scale (torchao's int4 default 128); -1 = one scale per output row "
        "(PaddleNLP's per-channel weight_only_int4). Rows whose length it does not divide stay unquantized.", 128,
    )


@dataclass
class LoggingSection:
    output_dir: str = doc("Run directory: resolved config, metrics.jsonl, checkpoints, export.", "runs/default")
    log_every: int = doc("Log metrics every N steps.", 1)
    report_to: list[ReportTo] = doc(
        "Where metrics go besides metrics.jsonl: auto (TensorBoard when installed) | none | tensorboard | wandb | "
        "mlflow | swanlab; a list for several. Named clients must be installed; wandb runs offline and MLflow "
        "into output_dir/mlruns unless their usual environment variables say otherwise.", factory=lambda: ["auto"])
    progress_bar: bool = doc(
        "A progress bar on rank 0 when stderr is a terminal; without a terminal (or with false) one plain line "
        "per logged step instead.", True)
    plot: bool = doc("At the end, draw loss, eval loss and lr to output_dir/loss.png (needs matplotlib).", True)


@dataclass
class EvalSection:
    generate_every_n_steps: int = doc(
        "Every N steps, generate answers for eval.generate_data's prompts (greedy) and log exact match, BLEU and "
        "ROUGE-L plus a few sample predictions to metrics.jsonl and TensorBoard (0 disables). Set by "
        "`trainer run`, which renders the prompts with the template of the training data.", 0)
    generate_data: str | None = doc(
        "A small dev set in any format `dataprep convert` reads; each record's last assistant turn is the "
        "reference, the turns before it the prompt.", None)
    generate_max_records: int = doc("Use at most this many records of eval.generate_data.", 64)
    generate_max_new_tokens: int = doc("Generation stops after this many new tokens (or at end of turn).", 128)
    generate_batch_size: int = doc("Prompts generated together (grouped by length).", 8)
    generate_samples: int = doc("Sample predictions logged each time (prompt id, prediction, reference).", 3)
    generate_metrics: list[str] = doc("Which of em, bleu, rougeL to compute.",
                                      factory=lambda: ["em", "bleu", "rougeL"])


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    peft: PeftSection = field(default_factory=PeftSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def global_batch(self, dp_size: int) -> int:
        """Rows per optimizer step over the whole job: what the data position and exact resume depend on.

        `dp_size` counts the ranks that read different rows: the world size divided by parallel.tp (ranks of
        one tensor-parallel group read the same rows), so a tp=2 run and a tp=1 run of half the ranks have the
        same global batch and resume from each other."""
        return self.data.micro_batch_size * self.train.grad_accum_steps * dp_size


# Names users bring from Hugging Face TrainingArguments, MindFormers and PaddleNLP configs.
KNOWN_ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "epoch": "epochs",
    "gradient_accumulation_steps": "grad_accum_steps",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size",
    "max_grad_norm": "max_grad_norm",
    "lr_scheduler_type": "schedule",
    "save_steps": "every_steps",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "output_dir": "output_dir",
    "r": "lora_rank",
    "lora_r": "lora_rank",
    "rank": "lora_rank",
    "rslora": "use_rslora",
    "dora": "use_dora",
    "lora_plus_scale": "loraplus_lr_ratio",
    "neftune_noise": "neftune_noise_alpha",
    "init_lora_weights": "lora_a_init",
    "tensorboard": "report_to",
    "lokr_dim": "lokr_rank",
    "vera": "pet_type",
    "lokr": "pet_type",
    "lora": "pet_type",
}


# Spellings of fixed choices that other tools use (MindFormers writes the zero initialiser 'zero').
VALUE_ALIASES = {"zero": "zeros"}


def _suggest(name: str, choices: list[str]) -> str:
    alias = KNOWN_ALIASES.get(name)
    if alias in choices:
        return f" (did you mean '{alias}'?)"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(choices))})"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML value against the field's annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            value = VALUE_ALIASES.get(value, value) if isinstance(value, str) else value
        if value not in args:
            shown = ", ".join("null" if a is None else str(a) for a in args)
            raise ConfigError(f"{where}: '{value}' is not one of {shown}")
        return value
    if origin is list:
        if not isinstance(value, list):
            element_is_str = bool(args) and (args[0] is str or typing.get_origin(args[0]) is Literal)
            value = [value] if element_is_str and isinstance(value, str) else value
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if len(args) == 2:
            return {_coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if annotation is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads `3e-4` (no dot) as a string; accept it as the number it is.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value, path in _apply_key_aliases(cls, data, where):
        if key not in fields:
            raise ConfigError(f"unknown key '{path}'{_suggest(str(key), list(fields))}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, path)
        else:
            kwargs[key] = _coerce(value, annotation, path)
    return cls(**kwargs)


def _apply_key_aliases(cls: type, data: dict[str, Any], where: str) -> list[tuple[str, Any, str]]:
    """(key, value, path shown in errors) with a section's alias keys renamed to their targets.

    Other tools' names (MindFormers' model_parallel, PaddleNLP's tensor_parallel_degree) are accepted as they
    are written; an alias and its target (or two aliases of one key) given with different values are refused
    rather than letting one silently win."""
    aliases: dict[str, str] = getattr(cls, "KEY_ALIASES", {})
    out: list[tuple[str, Any, str]] = []
    given: dict[str, tuple[Any, str]] = {}  # target key -> (value, path it came from)
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        target = aliases.get(key, key)
        if target != key:
            path = f"{path} (read as {where}.{target})"
        if target in given:
            before, before_path = given[target]
            if before != value or type(before) is not type(value):
                raise ConfigError(f"{path.split(' ')[0]} = {value!r} conflicts with {before_path.split(' ')[0]} = "
                                  f"{before!r}: they name the same setting ({where}.{target}); give one of them")
            continue
        given[target] = (value, path)
        out.append((target, value, path))
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{item}' must name a section and a key, e.g. train.lr=2e-5")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to the raw config mapping."""
    for item in overrides:
        parts, value = _parse_override(item)
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return raw


def validate(config: TrainConfig) -> None:
    """Cross-field checks a type annotation cannot express."""
    positive = [
        ("data", "micro_batch_size"), ("train", "grad_accum_steps"), ("logging", "log_every"),
        ("model", "loss_chunk_tokens"),
    ]
    for section, key in positive:
        if getattr(getattr(config, section), key) < 1:
            raise ConfigError(f"{section}.{key} must be >= 1")
    if config.train.max_steps is not None and config.train.max_steps < 1:
        raise ConfigError("train.max_steps must be >= 1 (or null to run train.epochs)")
    if config.train.max_steps is None and config.train.epochs <= 0:
        raise ConfigError("train.epochs must be > 0 when train.max_steps is null")
    if config.train.warmup_steps < 0 or not 0.0 <= config.train.warmup_ratio < 1.0:
        raise ConfigError("train.warmup_steps must be >= 0 and train.warmup_ratio in [0, 1)")
    if config.train.warmup_steps and config.train.warmup_ratio:
        raise ConfigError("set train.warmup_steps or train.warmup_ratio, not both")
    if config.checkpoint.keep < 2:
        raise ConfigError("checkpoint.keep must be >= 2 so a crash during a save never leaves no checkpoint")
    if config.data.weights is not None and len(config.data.weights) != len(config.data.train):
        raise ConfigError("data.weights needs one weight per data.train dataset")
    if len(config.train.betas) != 2:
        raise ConfigError("train.betas needs exactly two values")
    _validate_peft(config.peft)
    _validate_parallel(config)
    ev = config.eval
    if ev.generate_every_n_steps < 0:
        raise ConfigError("eval.generate_every_n_steps must be >= 0")
    if ev.generate_every_n_steps and not ev.generate_data:
        raise ConfigError("eval.generate_every_n_steps is set but eval.generate_data (a dev set file) is not")
    if min(ev.generate_max_records, ev.generate_max_new_tokens, ev.generate_batch_size) < 1 or ev.generate_samples < 0:
        raise ConfigError("eval.generate_max_records, generate_max_new_tokens and generate_batch_size must be >= 1, "
                          "eval.generate_samples >= 0")
    unknown = [m for m in ev.generate_metrics if m not in ("em", "bleu", "rougeL")]
    if unknown:
        raise ConfigError(f"eval.generate_metrics: unknown {', '.join(unknown)} (choose from em, bleu, rougeL)")


def _validate_parallel(config: TrainConfig) -> None:
    """What the mesh keys allow by themselves; the world size and the model are checked when they are known
    (`trainer.distributed.resolve_mesh_shape`, `trainer.tensor_parallel.check_model`)."""
    p = config.parallel
    if p.pp != 1:
        raise ConfigError(f"parallel.pp = {p.pp}: pipeline parallelism is not supported; use parallel.tp and "
                          "parallel.dp_shard (pp must be 1)")
    for key in ("dp_replicate", "tp", "cp"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key} = {getattr(p, key)} must be >= 1")
    if p.dp_shard < 1 and p.dp_shard != -1:
        raise ConfigError(f"parallel.dp_shard = {p.dp_shard} must be >= 1, or -1 for what is left of the world size")
    if p.cp > 1:
        _validate_context_parallel(config)
    if p.tp == 1:
        return
    # Tensor parallelism splits the native model's Linear layers; what wraps or replaces them is not split yet.
    refused = []
    if config.model.backend == "hf":
        refused.append("model.backend hf (tensor parallelism is implemented for the native models)")
    if config.peft.pet_type is not None:
        refused.append(f"peft.pet_type {config.peft.pet_type} (adapters on split layers are not implemented; "
                       "tensor parallelism is for full fine-tuning)")
    if config.peft.neftune_noise_alpha is not None:
        refused.append("peft.neftune_noise_alpha")
    if config.eval.generate_every_n_steps:
        refused.append("eval.generate_every_n_steps (generation's KV cache holds every head)")
    if refused:
        raise ConfigError(f"parallel.tp = {p.tp} cannot be combined with {'; '.join(refused)}: set parallel.tp: 1 "
                          "or drop those")


def _validate_context_parallel(config: TrainConfig) -> None:
    """Context parallelism slices every row over the cp ranks; refuse what needs a whole row on one rank."""
    p = config.parallel
    refused = []
    if p.tp > 1:
        refused.append(f"parallel.tp = {p.tp} (not implemented together)")
    if config.model.backend == "hf":
        refused.append("model.backend hf (context parallelism is implemented for the native models)")
    if config.model.attn_backend in ("flex", "varlen"):
        refused.append(f"model.attn_backend {config.model.attn_backend} (the gathered keys are masked for sdpa; "
                       "use sdpa or auto)")
    if config.peft.pet_type in ("loreft", "prefix_tuning"):
        refused.append(f"peft.pet_type {config.peft.pet_type} (it acts on positions of the whole row)")
    if config.peft.neftune_noise_alpha is not None:
        refused.append("peft.neftune_noise_alpha (its noise scale depends on the row length)")
    if refused:
        raise ConfigError(f"parallel.cp = {p.cp} cannot be combined with {'; '.join(refused)}: set parallel.cp: 1 "
                          "or drop those")


def _validate_peft(p: PeftSection) -> None:
    if p.neftune_noise_alpha is not None and p.neftune_noise_alpha <= 0:
        raise ConfigError("peft.neftune_noise_alpha must be > 0 (or null to disable NEFTune)")
    _validate_reft(p)
    _validate_prefix(p)
    if p.pet_type is None:
        lora_only = [k for k in ("use_rslora", "pissa", "use_dora", "export_merged", "lora_use_mixer", "use_mora")
                     if getattr(p, k)]
        if p.loraplus_lr_ratio is not None:
            lora_only.append("loraplus_lr_ratio")
        if p.weight_quantize_algo is not None:
            lora_only.append("weight_quantize_algo")
        if lora_only:
            raise ConfigError(f"peft.{lora_only[0]} needs peft.pet_type: lora")
        return
    if p.weight_quantize_algo is not None:
        if p.pissa or p.use_dora:
            raise ConfigError("peft.weight_quantize_algo cannot be combined with pissa or use_dora (both read and "
                              "rewrite the full-precision base weight)")
        if p.qlora_weight_blocksize < 2 or p.qlora_weight_blocksize % 2 or p.qlora_weight_double_quant_block_size < 1:
            raise ConfigError("peft.qlora_weight_blocksize must be an even number >= 2 and "
                              "peft.qlora_weight_double_quant_block_size >= 1")
        if p.weight_quantize_algo == "fp4" and p.qlora_weight_double_quant_block_size != 256:
            raise ConfigError("peft.weight_quantize_algo fp4: bitsandbytes double-quantizes in groups of 256 block "
                              "scales; peft.qlora_weight_double_quant_block_size must stay 256")
        group = p.weight_only_int4_group_size
        if p.weight_quantize_algo == "weight_only_int4" and not (group == -1 or (group >= 2 and group % 2 == 0)):
            raise ConfigError("peft.weight_only_int4_group_size must be an even number >= 2, or -1 (per row)")
    if p.pet_type == "vera" and (p.vera_rank < 1 or p.vera_d_initial == 0):
        raise ConfigError("peft.vera_rank must be >= 1 and peft.vera_d_initial non-zero")
    if p.pet_type == "lokr" and (p.lokr_rank < 1 or p.lokr_alpha <= 0 or p.lora_dropout > 0):
        raise ConfigError("peft.lokr_rank must be >= 1, peft.lokr_alpha > 0, and LoKr takes no lora_dropout")
    if p.pet_type != "lora":
        lora_only = [k for k in ("use_rslora", "pissa", "use_dora", "lora_use_mixer", "use_mora") if getattr(p, k)]
        if p.loraplus_lr_ratio is not None:
            lora_only.append("loraplus_lr_ratio")
        if lora_only:
            raise ConfigError(f"peft.{lora_only[0]} needs peft.pet_type: lora (not {p.pet_type})")
    if p.use_mora and (p.pissa or p.use_dora or p.lora_use_mixer or p.use_rslora or p.loraplus_lr_ratio):
        raise ConfigError("peft.use_mora cannot be combined with pissa, use_dora, lora_use_mixer, use_rslora or "
                          "loraplus_lr_ratio (MoRA has one square matrix, no A/B pair)")
    if p.lora_use_mixer and (p.pissa or p.use_dora):
        raise ConfigError("peft.lora_use_mixer (MoSLoRA) cannot be combined with pissa or use_dora")
    if p.lora_rank < 1:
        raise ConfigError("peft.lora_rank must be >= 1")
    for key, patterns in (("rank_pattern", p.rank_pattern), ("alpha_pattern", p.alpha_pattern)):
        if patterns and (p.pet_type != "lora" or p.use_mora):
            raise ConfigError(f"peft.{key} applies to LoRA adapters (pet_type: lora, without use_mora)")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"peft.{key}: '{pattern}' is not a valid regex ({exc})") from None
            if value <= 0 or (key == "rank_pattern" and value < 1):
                raise ConfigError(f"peft.{key}.{pattern} must be {'>= 1' if key == 'rank_pattern' else '> 0'}")
    if p.lora_alpha <= 0:
        raise ConfigError("peft.lora_alpha must be > 0")
    if not 0.0 <= p.lora_dropout < 1.0:
        raise ConfigError("peft.lora_dropout must be in [0, 1)")
    if p.loraplus_lr_ratio is not None and p.loraplus_lr_ratio <= 0:
        raise ConfigError("peft.loraplus_lr_ratio must be > 0 (or null)")
    if p.pissa and p.use_dora:
        raise ConfigError("peft.pissa and peft.use_dora cannot be combined (a PiSSA export is converted to plain LoRA)")
    if p.lora_a_init == "zeros" and p.lora_b_init == "zeros" and not p.pissa:
        raise ConfigError("peft.lora_a_init and peft.lora_b_init are both zeros: the adapters would get no gradient")
    from trainer.peft_targets import check_target_spec

    try:
        check_target_spec(p.target_modules)
    except ValueError as exc:
        raise ConfigError(f"peft.target_modules: {exc}") from None


def _validate_reft(p: PeftSection) -> None:
    """LoReFT's keys only with pet_type loreft (PaddleNLP's `rank` would otherwise be a LoRA rank silently
    ignored), and only what LoReFT can do: no merged export, nothing trained in full beside it."""
    defaults = PeftSection()
    set_keys = [k for k in ("reft_rank", "reft_layers", "reft_positions") if getattr(p, k) != getattr(defaults, k)]
    if p.pet_type != "loreft":
        if set_keys:
            raise ConfigError(f"peft.{set_keys[0]} needs peft.pet_type: loreft")
        return
    from trainer.reft_positions import ReftError, ReftPositions, parse_layers

    if p.reft_rank < 1:
        raise ConfigError("peft.reft_rank must be >= 1")
    try:
        ReftPositions.parse(p.reft_positions)
    except ReftError as exc:
        raise ConfigError(str(exc)) from None
    try:
        parse_layers(p.reft_layers, None)  # the model's depth is checked when the model is built
    except ReftError as exc:
        raise ConfigError(str(exc)) from None
    _refuse_beside_unmergeable(p, "a LoReFT adapter edits hidden states at chosen positions, not weights",
                               "the LoReFT adapter file holds the interventions only")


def _refuse_beside_unmergeable(p: PeftSection, what: str, file_holds: str) -> None:
    """What a method that is no weight change (LoReFT, prefix tuning) cannot do: be merged, train modules in full
    beside it (its file would not hold them), run on a quantized base (not tried)."""
    if p.export_merged:
        raise ConfigError(f"peft.export_merged: {what}; it cannot be merged into the base model (set export_merged: "
                          "false)")
    if p.modules_to_save or p.freeze_exclude:
        raise ConfigError(f"peft.modules_to_save / peft.freeze_exclude are not supported with pet_type {p.pet_type} "
                          f"({file_holds})")
    if p.weight_quantize_algo is not None:
        raise ConfigError(f"peft.weight_quantize_algo is not supported with pet_type {p.pet_type}")


def _validate_prefix(p: PeftSection) -> None:
    """Prefix tuning's keys only with it; PaddleNLP's `prefix_tuning: true` sets the pet_type."""
    if p.prefix_tuning:
        if p.pet_type not in (None, "prefix_tuning"):
            raise ConfigError(f"peft.prefix_tuning: true conflicts with peft.pet_type {p.pet_type}; give one method")
        p.pet_type = "prefix_tuning"
    if p.pet_type != "prefix_tuning":
        defaults = PeftSection()
        set_keys = [k for k in ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size")
                    if getattr(p, k) != getattr(defaults, k)]
        if set_keys:
            raise ConfigError(f"peft.{set_keys[0]} needs peft.pet_type: prefix_tuning")
        return
    if p.num_virtual_tokens < 1:
        raise ConfigError("peft.num_virtual_tokens must be >= 1")
    if p.encoder_hidden_size is not None:
        if not p.prefix_projection:
            raise ConfigError(f"peft.encoder_hidden_size = {p.encoder_hidden_size} sizes the prefix_projection MLP; "
                              "it needs peft.prefix_projection: true (or leave it unset)")
        if p.encoder_hidden_size < 1:
            raise ConfigError(f"peft.encoder_hidden_size = {p.encoder_hidden_size} must be >= 1 (or null for kv "
                              "heads x head_dim)")
    _refuse_beside_unmergeable(p, "a prefix-tuning adapter adds keys / values to attention, not weights",
                               "the adapter file holds the prefixes only")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read the YAML file (or start from defaults), apply `--set` overrides, type-check and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded or {}
    raw = apply_overrides(raw, overrides or [])
    try:
        config = _build(TrainConfig, raw, "")
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{_source_of(str(exc), path, overrides or [])}: {exc}") from None
    return config


_KEY_IN_MESSAGE = re.compile(r"^(?:unknown key ')?([A-Za-z_]\w*\.[\w.]+)")


def _source_of(message: str, path: Path | None, overrides: list[str]) -> str:
    """Whom an error is about: the `--set` that gave the key it names, else the config file (or the defaults)."""
    found = _KEY_IN_MESSAGE.match(message)
    key = found.group(1) if found else None
    for item in reversed(overrides):  # the last --set of a key is the one that counts
        name = item.split("=", 1)[0].strip()
        if key is not None and (key == name or key.startswith(name + ".")):
            return f"--set {item}"
    return str(path) if path is not None else "config"


# How a resumed run may differ from the checkpoint's config (`resume_changes`). Keys are dotted paths; a key
# matches an entry equal to it or under it. Everything not listed is safe: applied and announced.
RESUME_BREAKING = (
    # What the checkpoint is: other weights, another model or adapter shape, other data or data order.
    "model.path", "model.overrides", "data.train", "data.weights", "data.shuffle", "data.remainder", "train.seed",
    "peft.pet_type", "peft.lora_rank", "peft.lora_alpha", "peft.target_modules", "peft.freeze_include",
    "peft.freeze_exclude", "peft.use_rslora", "peft.use_dora", "peft.pissa", "peft.lora_a_init", "peft.lora_b_init",
    "peft.weight_quantize_algo", "peft.qlora_weight_blocksize", "peft.qlora_weight_double_quant_block_size",
    "peft.weight_only_int4_group_size", "peft.lora_use_mixer", "peft.use_mora", "peft.mora_type", "peft.vera_rank",
    "peft.vera_d_initial", "peft.vera_projection_prng_key", "peft.reft_rank", "peft.reft_layers",
    "peft.reft_positions", "peft.num_virtual_tokens", "peft.lokr_rank", "peft.lokr_alpha", "peft.lokr_decompose_factor",
)
RESUME_OPTIMIZER = (
    # The update rule and its schedule: a resumed run no longer repeats the one it continues. Allowed with
    # checkpoint.allow_config_change (--allow-config-change), then applied from the resumed step on.
    # (train.max_steps / train.epochs are not here: extending or shortening a run is what resuming is for; the
    # schedule is recomputed for the new length and the change is announced.)
    "train.lr", "train.min_lr_ratio", "train.schedule", "train.warmup_steps", "train.warmup_ratio",
    "train.weight_decay", "train.betas", "train.eps", "train.max_grad_norm", "peft.loraplus_lr_ratio",
)
RESUME_IGNORED = ("checkpoint.resume", "checkpoint.allow_config_change", "logging.output_dir")
_PATH_KEYS = ("model.path", "data.train", "data.eval", "eval.generate_data")


@dataclass
class ConfigChanges:
    """What differs between a checkpoint's config and this run's, by what that means for resuming."""

    breaking: list[str] = field(default_factory=list)
    optimizer: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name.count(".") == 0:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _normalised(key: str, value: Any) -> Any:
    import os

    if key in _PATH_KEYS and value:
        paths = value if isinstance(value, list) else [value]
        norm = [os.path.normpath(os.path.abspath(p)) if "://" not in str(p) else p for p in paths]
        return norm if isinstance(value, list) else norm[0]
    return list(value) if isinstance(value, tuple) else value


def resume_changes(saved: dict[str, Any], current: dict[str, Any]) -> ConfigChanges:
    """Compare the config a checkpoint was saved with (`TrainConfig.to_dict()`) with this run's."""

    def under(key: str, entries: tuple[str, ...]) -> bool:
        return any(key == e or key.startswith(e + ".") for e in entries)

    old, new = _flatten(saved), _flatten(current)
    changes = ConfigChanges()
    for key in sorted(set(old) | set(new)):
        if under(key, RESUME_IGNORED):
            continue
        before, after = _normalised(key, old.get(key)), _normalised(key, new.get(key))
        if before == after:
            continue
        line = f"{key}: {before!r} -> {after!r}"
        bucket = (changes.breaking if under(key, RESUME_BREAKING)
                  else changes.optimizer if under(key, RESUME_OPTIMIZER) else changes.other)
        bucket.append(line)
    return changes


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (defaults filled in) so a run records exactly what it ran with."""
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def describe() -> str:
    """Every key with its default and documentation, as a commented YAML file."""
    lines = ["# sftkit trainer config: every key, its default and what it does."]
    for section in dataclasses.fields(TrainConfig):
        cls = typing.get_type_hints(TrainConfig)[section.name]
        lines.append(f"{section.name}:")
        default = cls()
        for f in dataclasses.fields(cls):
            value = yaml.safe_dump(getattr(default, f.name), default_flow_style=True).strip()
            if value.endswith("\n...") or value.endswith("..."):
                value = value.replace("\n...", "").replace("...", "").strip()
            lines.append(f"  # {f.metadata.get('doc', '')}")
            lines.append(f"  {f.name}: {value}")
    return "\n".join(lines) + "\n"
