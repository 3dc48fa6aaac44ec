"""Data preparation: readers of instruction formats, conversations, chat templates, tokenization, packing.

Never imports torch: a data-prep job must run on a CPU box without a deep-learning stack.
"""
