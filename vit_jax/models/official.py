"""Weights of the official implementations of families that timm does not have.

The converters live in their family files (``@register_official_converter``) and run
through ``vit_jax.models.convert``, like the timm ones:

  params = official.from_official("pvt_small", "pvt_small.pth")        # whai362/PVT
  params = official.from_official("cswin_tiny_224", "cswin_tiny_224.pth")
"""

from vit_jax.models.convert import from_official, register_official_converter

__all__ = ["from_official", "register_official_converter"]
