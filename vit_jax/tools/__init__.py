"""Command-line tools, each run as ``python -m vit_jax.tools.NAME`` (``--help`` lists
its flags): the offline image-text pool, DataComp-style filtering, tokenizer
training, zero-shot and retrieval evaluation of a workdir, benchmarks, memory and the
linear-cost comparison (``linear_cost``), and the table of pretrained
tags (``pretrained_table``, from the installed timm and open_clip).
Training itself is ``python -m vit_jax.main``."""
