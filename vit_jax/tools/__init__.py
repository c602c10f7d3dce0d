"""Command-line tools: offline image-text pool generation, DataComp-style filtering."""
