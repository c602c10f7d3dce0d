"""DeiT (Touvron et al., 2021): data-efficient ViTs, with and without a distillation token.

A plain DeiT is a ViT (``vit.VisionTransformer``, class token, learned position
embedding) under DeiT's names. The distilled variants add a second learned token that
attends like the class token and feeds a second head, ``head_dist``, trained to match a
teacher (see ``vit_jax.trainers.distillation``). Matches timm's ``deit`` models
(``VisionTransformer`` and ``VisionTransformerDistilled``) parameter for parameter.

Return convention of ``DistilledVisionTransformer`` (as timm with
``set_distilled_training(True)``, and as the DeiT paper):

  train=True  -> a tuple ``(logits, logits_dist)``: the class-token head and the
                 distillation-token head, each ``[batch, num_classes]`` float32;
  train=False -> ``(logits + logits_dist) / 2``, one array.

``distilled_training=False`` makes training return the average too (fine-tuning without a
teacher, as timm's default). With ``num_classes=0`` both modes return the average of the
two tokens' features. Parameter tree: the ViT layout plus ``dist`` (the distillation
token, beside ``cls``) and ``head_dist``; the position embedding covers both tokens.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vit_jax.models import layers, vit
from vit_jax.models.convert import StateDict, register_timm_converter
from vit_jax.models.registry import register_variant

Array = Any


class DistilledVisionTransformer(vit.VisionTransformer):
  """ViT with class and distillation tokens and two heads (DeiT's distilled models).

  Overrides two ViT hooks: ``add_prefix_tokens`` (both tokens) and ``forward_head``
  (one head per token); every other ViT setting works as in the ViT. DeiT defines
  the class-token layout with a learned position embedding and no pre-logits layer.
  """
  distilled_training: bool = True

  @property
  def num_prefix_tokens(self) -> int:
    return 2

  def _check_config(self):
    super()._check_config()
    if (self.classifier, self.posemb, self.representation_size) != ("token", "learn", None):
      raise ValueError("a distilled DeiT reads its class and distillation tokens: it needs "
                       "classifier='token', posemb='learn' and no representation_size; got "
                       f"classifier={self.classifier!r}, posemb={self.posemb!r}, "
                       f"representation_size={self.representation_size!r}")

  def add_prefix_tokens(self, x: Array) -> Array:
    tokens = [self.param(name, nn.initializers.normal(stddev=0.02),
                         (1, 1, self.hidden_size), self.storage_dtype)
              for name in ("cls", "dist")]
    tokens = [jnp.tile(t.astype(self.compute_dtype), [x.shape[0], 1, 1]) for t in tokens]
    return jnp.concatenate(tokens + [x], axis=1)

  def forward_head(self, x: Array, *, train: bool = False) -> Any:
    x_cls, x_dist = x[:, 0], x[:, 1]
    if not self.num_classes:
      return layers.classifier_head(self, (x_cls + x_dist) / 2, 0)
    self.sow("intermediates", "features", (x_cls + x_dist) / 2)
    head = lambda name: layers.Dense(self.num_classes,
                                     kernel_init=layers.head_init(self.head_zeroinit),
                                     dtype=self.compute_dtype, param_dtype=self.storage_dtype,
                                     name=name)
    logits = head("head")(x_cls).astype(jnp.float32)
    logits_dist = head("head_dist")(x_dist).astype(jnp.float32)
    if train and self.distilled_training:
      return logits, logits_dist
    return (logits + logits_dist) / 2


@register_timm_converter("deit")
def convert_timm_deit(state: StateDict, model: vit.VisionTransformer) -> dict:
  """timm ``deit_*`` state dict -> params (the ViT converter, plus the distilled parts)."""
  params = vit.convert_timm_vit(state, model)
  if isinstance(model, DistilledVisionTransformer):
    params["dist"] = state.take("dist_token")
    if model.num_classes:
      params["head_dist"] = state.linear("head_dist")
  return params


def _register_variants():
  sizes = {"tiny": vit.VARIANTS["tiny"], "small": vit.VARIANTS["small"],
           "base": vit.VARIANTS["base"]}
  for size, resolution in (("tiny", 224), ("small", 224), ("base", 224), ("base", 384)):
    for distilled in (False, True):
      name = f"deit_{size}{'_distilled' if distilled else ''}_patch16_{resolution}"
      cls = DistilledVisionTransformer if distilled else vit.VisionTransformer
      defaults = dict(sizes[size], patch_size=16, image_size=resolution)
      register_variant(name, cls, defaults, family="deit", image_size=resolution,
                       doc=(f"DeiT-{size[0].upper()}/16 at {resolution}x{resolution}"
                            f"{' with a distillation token' if distilled else ''}."))


_register_variants()
