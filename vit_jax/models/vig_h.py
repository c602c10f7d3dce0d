"""ViG-H (Liao et al., 2024): the hierarchical ViG, four stages of gated linear attention.

Not in timm. Reference: hustvl/ViG, ``classification/models/vig_h.py`` (class
``HierViG``) with the configurations ``classification/configs/vig-h/vig-h-{t,s,b}.yaml``,
registered here as ``vig_h_tiny``, ``vig_h_small`` and ``vig_h_base`` (the README's 29M /
50M / 89M). The blocks are ``vig.py``'s (its GLA mixer on ``vit_jax.kernels.gated_scan``
and SwiGLU MLP), set by hooks: LayerNorms in place of RMSNorms, no SiLU after the
depth-wise conv or before the output projection, and the directions' mean in
evaluation as in training (the official bidirectional kernel halves the sum and the
hierarchical GLA, unlike the plain one, does not halve it again).

Layout (what the three configurations use: ``PATCHEMBED v2``, ``DOWNSAMPLE v3``,
``NORM_LAYER ln2d``, ``GMLP``, ``EXPAND_K 0.5``, ``EXPAND_V 1``, no RoPE):

- **Stem** (``_make_patch_embed_v2``): 3x3 stride-2 conv to half the width, LayerNorm,
  exact GELU, 3x3 stride-2 conv, LayerNorm: stride 4 (``vig.ConvStem``).
- **Stages** of ``depths`` blocks at widths ``embed_dims``: ``x + GLA(LN(x))``,
  ``x + SwiGLU(LN(x))`` (LayerNorm eps 1e-5; SwiGLU hidden ``8/3 d`` rounded up to a
  multiple of 32, no biases). Between stages (``_make_downsample_v3``): a 3x3 stride-2
  conv (padding 1) to the next width, LayerNorm.
- **Head**: LayerNorm, average of the tokens, linear.

Parameter tree::

  patch_embed/{conv_0, norm_0, conv_1, norm_1}
  stages_{i}/blocks_{j}/{attn_norm, attn, mlp_norm, mlp}   (vig.GLABlock)
  downsamples_{i}_conv, downsamples_{i}_norm               (i < 3)
  norm, head

Sown: ``stage_{i}`` (each stage's blocks' output, NHWC, before the downsampling, as
the official ``Backbone_HierViG`` takes it without its extra norms) and ``features``.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import kernels
from vit_jax.models import layers
from vit_jax.models.convert import StateDict
from vit_jax.models.official import register_official_converter
from vit_jax.models.registry import register_variant
from vit_jax.models.vig import ConvStem, GLABlock, swiglu_width
from vit_jax.models.vit import REMAT_POLICIES

Array = Any

# hustvl/ViG classification/configs/vig-h/vig-h-{t,s,b}.yaml (EMBED_DIM doubled per
# stage). Official DROP_PATH_RATE: 0.2 / 0.3 / 0.6 (a training setting; 0 here as for
# every family).
VARIANTS = {
    "vig_h_tiny": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 5, 2),
                       num_heads=(3, 6, 12, 24)),
    "vig_h_small": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 17, 2),
                        num_heads=(3, 6, 12, 24)),
    "vig_h_base": dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 17, 2),
                       num_heads=(4, 8, 16, 32)),
}

_gelu = layers.gelu  # torch's nn.GELU()


class Stage(nn.Module):
  """One stage's blocks (``vig.GLABlock`` with ViG-H's settings)."""
  depth: int
  num_heads: int
  mlp_hidden: int
  drop_path_rates: Sequence[float]
  attention_impl: str = "xla"
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    def apply_block(module, x):
      return module(x, train=train)

    if self.remat_policy != "none":
      apply_block = nn.remat(apply_block, policy=REMAT_POLICIES[self.remat_policy])
    for j in range(self.depth):
      x = apply_block(GLABlock(
          num_heads=self.num_heads, mlp_hidden=self.mlp_hidden, conv_act=False,
          out_act=False, eval_halves_again=False, norm="layer",
          drop_path_rate=self.drop_path_rates[j], attention_impl=self.attention_impl,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f"blocks_{j}"), x)
    return x


class HierViG(nn.Module):
  """ViG-H classifier on NHWC images of any size (each stage halves the grid, rounding up).

  Attributes:
    num_classes: size of the head; 0 returns the pooled features.
    image_size: the default resolution (any size works: no position embedding).
    embed_dims, depths, num_heads: per stage (GLA heads: ``dk = d / 2 / heads``,
      ``dv = d / heads``).
    mlp_ratio: SwiGLU hidden width ``2/3 * mlp_ratio * d``, rounded up to 32 (the
      official ``gMlp`` fixes the ratio at 4 whatever ``MLP_RATIO`` says).
    drop_path_rate: stochastic depth of the last block, rising linearly from 0 over
      all blocks.
    attention_impl: backend of ``vit_jax.kernels.gated_scan``.
    remat_policy: "none", "full" or a ``jax.checkpoint_policies`` name (per block).
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """
  num_classes: int = 1000
  image_size: int = 224
  embed_dims: Sequence[int] = (96, 192, 384, 768)
  depths: Sequence[int] = (2, 2, 5, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def check_settings(self) -> None:
    layers.check_per_stage(self, ("embed_dims", "num_heads"), len(self.depths))
    if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be 'none' or one of {sorted(REMAT_POLICIES)}, "
                       f"got {self.remat_policy!r}")

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.check_settings()
    layers.check_images(images)
    kernels.resolve(self.attention_impl)
    # Stride 4: the released models' patch size (the official stem's two convs
    # have stride patch_size/2 each, vig.ConvStem's second stride 2).
    x = ConvStem(self.embed_dims[0], 4, act=_gelu, name="patch_embed",
                 **kw)(images.astype(dtype))
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))
    start = 0
    for i, (dim, depth) in enumerate(zip(self.embed_dims, self.depths)):
      if i:  # the official stage i - 1 ends with it
        x = nn.Conv(dim, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                    name=f"downsamples_{i - 1}_conv", **kw)(x)
        x = layers.LayerNorm(epsilon=1e-5, name=f"downsamples_{i - 1}_norm", **kw)(x)
      x = Stage(depth=depth, num_heads=self.num_heads[i], mlp_hidden=swiglu_width(
          dim, self.mlp_ratio, multiple=32), drop_path_rates=rates[start:start + depth],
                attention_impl=self.attention_impl, remat_policy=self.remat_policy,
                name=f"stages_{i}", **kw)(x, train=train)
      start += depth
      self.sow("intermediates", f"stage_{i}", x)
    x = jnp.mean(layers.LayerNorm(epsilon=1e-5, name="norm", **kw)(x), axis=(1, 2))
    return layers.classifier_head(self, x, self.num_classes, **kw)


@register_official_converter("vig_h")
def convert_official_vig_h(state: StateDict, model: HierViG) -> dict:
  """hustvl/ViG ``classification/models/vig_h.py`` (``HierViG``) state dict -> parameters.

  Official names: ``patch_embed.{0,2,5,7}`` (conv, LayerNorm, conv, LayerNorm),
  ``layers.{i}.blocks.{j}.{norm,norm2}``, ``…op.in_proj.0``, ``qkv_proj``,
  ``gk_proj.{0,1}``, ``g_proj``, ``g_norm``, ``l_norm``, ``o_proj``, ``…mlp.{fc1,fc2}``,
  ``layers.{i}.downsample.{1,3}`` (conv, LayerNorm), ``classifier.{norm,head}``. The
  ``Linear2d`` weights (1x1 convs in the forward) may be stored ``[out, in]`` or
  ``[out, in, 1, 1]``.
  """
  def linear(prefix, bias=True):
    out = state.linear(prefix, bias)
    out["kernel"] = out["kernel"].reshape(out["kernel"].shape[-2:])  # [1, 1, in, out].T
    return out

  rms = lambda key: {"scale": state.take(f"{key}.weight")}
  params = {"patch_embed": {"conv_0": state.conv("patch_embed.0"),
                            "norm_0": state.norm("patch_embed.2"),
                            "conv_1": state.conv("patch_embed.5"),
                            "norm_1": state.norm("patch_embed.7")},
            "norm": state.norm("classifier.norm")}
  for i, depth in enumerate(model.depths):
    stage = params[f"stages_{i}"] = {}
    for j in range(depth):
      p = f"layers.{i}.blocks.{j}"
      stage[f"blocks_{j}"] = {
          "attn_norm": state.norm(f"{p}.norm"), "mlp_norm": state.norm(f"{p}.norm2"),
          "attn": {"in_proj": state.conv(f"{p}.op.in_proj.0", bias=False),
                   "qkv_proj": linear(f"{p}.op.qkv_proj", bias=False),
                   "gk_proj_0": linear(f"{p}.op.gk_proj.0", bias=False),
                   "gk_proj_1": linear(f"{p}.op.gk_proj.1"),
                   "g_proj": linear(f"{p}.op.g_proj"),
                   "g_norm": rms(f"{p}.op.g_norm"), "l_norm": rms(f"{p}.op.l_norm"),
                   "o_proj": state.linear(f"{p}.op.o_proj", bias=False)},
          "mlp": {"gate_proj": linear(f"{p}.mlp.fc1", bias=False),
                  "down_proj": linear(f"{p}.mlp.fc2", bias=False)}}
    if i + 1 < len(model.depths):
      params[f"downsamples_{i}_conv"] = state.conv(f"layers.{i}.downsample.1")
      params[f"downsamples_{i}_norm"] = state.norm(f"layers.{i}.downsample.3")
  if model.num_classes:
    params["head"] = state.linear("classifier.head")
  return params


def _register_variants():
  for name, config in VARIANTS.items():
    register_variant(name, HierViG, config, family="vig_h",
                     doc=f"Official hierarchical ViG ({name}), 224x224.")


_register_variants()
