"""The trainer: config, model, weights I/O, PEFT, data loading, attention, FSDP2, checkpointing, the loop."""
