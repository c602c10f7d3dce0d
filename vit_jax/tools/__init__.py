"""Command-line tools, each run as ``python -m vit_jax.tools.NAME`` (``--help`` lists
its flags): the offline image-text pool, DataComp-style filtering, tokenizer
training, zero-shot and retrieval evaluation of a workdir, benchmarks, memory and the
linear-cost comparison (``linear_cost``).
Training itself is ``python -m vit_jax.main``."""
