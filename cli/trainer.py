"""`trainer`: fine-tune a Hugging Face checkpoint on packed shards with FSDP2."""

from __future__ import annotations

from cli.lazy import lazy_main

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("cli.train:run", "Fine-tune on packed shards as a YAML config says (alone or under torchrun)."),
    "config": ("cli.train:describe_config", "Print every config key with its default and documentation."),
    "plan": ("cli.plan:plan", "Expected memory per rank (parameters, optimizer, activations) for a config and mesh."),
    "merge-adapter": ("cli.merge_lora:merge_lora",
                      "Fold a LoRA / VeRA / LoKr / MoRA adapter into base weights (HF safetensors out)."),
    "merge-lora": ("cli.merge_lora:merge_lora", "Same as merge-adapter (the older name)."),
    "generate": ("cli.generate:generate", "Answer a prompt or chat with a trained model (export, adapter, checkpoint)."),
    "predict": ("cli.generate:predict", "Generate for every record of a data file; JSONL out, optional EM/BLEU/ROUGE-L."),
    "tiny-model": ("cli.tiny_model:tiny_model", "Build a small random Qwen3-shaped model + tokenizer from your data."),
}


main = lazy_main("trainer", COMMANDS, "Train on packed shards (full-parameter or LoRA), resume from faults, export HF weights.")


if __name__ == "__main__":
    main()
