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

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vit_jax.models import layers, vit
from vit_jax.models.convert import StateDict, register_timm_converter
from vit_jax.models.registry import register_model

Array = Any


# The VisionTransformer settings DistilledVisionTransformer.__call__ implements.
SUPPORTED_VIT_FIELDS = frozenset((
    "num_classes", "image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
    "mlp_dim", "classifier", "posemb", "representation_size", "dropout_rate",
    "attention_dropout_rate", "drop_path_rate", "head_zeroinit", "gelu_approximate",
    "attention", "attention_impl", "linear_feature_map", "remat_policy", "scan_layers",
    "pre_norm", "patch_bias", "norm_epsilon", "dtype", "param_dtype", "parent", "name"))


class DistilledVisionTransformer(vit.VisionTransformer):
  """ViT with class and distillation tokens and two heads (DeiT's distilled models).

  Takes every ``VisionTransformer`` setting, but only the class-token layout with a
  learned position embedding and no pre-logits layer (what DeiT defines).
  """
  distilled_training: bool = True

  def _check_config(self):
    super()._check_config()
    if (self.classifier, self.posemb, self.representation_size) != ("token", "learn", None):
      raise ValueError("a distilled DeiT reads its class and distillation tokens: it needs "
                       "classifier='token', posemb='learn' and no representation_size; got "
                       f"classifier={self.classifier!r}, posemb={self.posemb!r}, "
                       f"representation_size={self.representation_size!r}")
    # Settings the ViT has that this forward pass does not implement (e.g. ones the ViT
    # gains later) must keep their defaults: an error, never silently ignored.
    for field in dataclasses.fields(vit.VisionTransformer):
      if (field.name not in SUPPORTED_VIT_FIELDS and field.default is not dataclasses.MISSING
          and getattr(self, field.name) != field.default):
        raise ValueError(f"the distilled DeiT does not implement the ViT setting "
                         f"{field.name}={getattr(self, field.name)!r}; leave it at "
                         f"{field.default!r}")

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Any:
    self._check_config()
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    gh, gw = self.patch_grid(images.shape[1], images.shape[2])

    x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                use_bias=self.patch_bias, dtype=dtype, param_dtype=param_dtype,
                name="embedding")(
                    images.astype(dtype))
    batch = x.shape[0]
    x = x.reshape(batch, gh * gw, self.hidden_size)
    tokens = [self.param(name, nn.initializers.normal(stddev=0.02),
                         (1, 1, self.hidden_size), param_dtype) for name in ("cls", "dist")]
    tokens = [jnp.tile(t.astype(dtype), [batch, 1, 1]) for t in tokens]
    x = jnp.concatenate(tokens + [x], axis=1)

    x = vit.Encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim,
                    num_heads=self.num_heads, pre_norm=self.pre_norm,
                    dropout_rate=self.dropout_rate,
                    attention_dropout_rate=self.attention_dropout_rate,
                    drop_path_rate=self.drop_path_rate,
                    gelu_approximate=self.gelu_approximate,
                    attention_fn=self._attention_fn(), remat_policy=self.remat_policy,
                    scan_layers=self.scan_layers, norm_epsilon=self.norm_epsilon,
                    dtype=dtype, param_dtype=param_dtype, name="Transformer")(x, train=train)

    x_cls, x_dist = x[:, 0], x[:, 1]
    self.sow("intermediates", "features", (x_cls + x_dist) / 2)
    if not self.num_classes:
      return ((x_cls + x_dist) / 2).astype(jnp.float32)
    head_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    head = lambda name: nn.Dense(self.num_classes, kernel_init=head_init, dtype=dtype,
                                 param_dtype=param_dtype, name=name)
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

      def factory(cls=cls, defaults=defaults, **overrides):
        return cls(**{**defaults, **overrides})

      factory.__doc__ = (f"DeiT-{size[0].upper()}/16 at {resolution}x{resolution}"
                         f"{' with a distillation token' if distilled else ''}.")
      register_model(name, family="deit", image_size=resolution)(factory)


_register_variants()
