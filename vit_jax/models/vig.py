"""ViG (Liao et al., 2024): a plain backbone of bidirectional gated linear attention.

Not in timm. Reference: hustvl/ViG, ``classification/models/vig.py`` (class ``ViG``)
with the configurations ``classification/configs/vig/vig-{t,s,b}.yaml``, registered
here as ``vig_tiny``, ``vig_small`` and ``vig_base``. Its token mixer, GLA (Yang et
al., 2024), runs on ``vit_jax.kernels.gated_scan``; the official code calls the
Triton kernels of flash-linear-attention, whose naive formula
(``fla/ops/gla/naive.py``) is the recurrence that kernel implements.

Layout (what the three configurations use):

- **Stem** (``V2PatchEmbed``): a ``p/2+1`` conv of stride ``p/2`` (padding 1) to half the
  width, LayerNorm, SiLU, a 3x3 stride-2 conv (padding 1), LayerNorm: 14x14 tokens at
  224. A learned position embedding for that grid (resampled bicubically for other
  inputs, as the official forward does), no class token.
- **Blocks**: ``x + GLA(RMSNorm(x))``, then ``x + SwiGLU(RMSNorm(x))`` (RMSNorm eps 1e-6;
  SwiGLU hidden width ``8/3 d`` rounded up to a multiple of 256, no biases).
- **GLA** (``GatedLinearAttention``): a 3x3 depth-wise conv of the map (no bias; SiLU
  after it in ViG-T only) gives ``local``; from it ``q, k`` (width ``d/2``) and ``v``
  (width ``d``), and through a rank-16 bottleneck two log-sigmoid gates divided by 16,
  one for each direction ("direction-wise gating"). The forward and the reverse scans
  (``q`` scaled by ``dk^-1/2``) are averaged and RMS-normed per head; a sigmoid gate
  ``s`` from ``local`` mixes them with the RMS-normed ``local`` ("2D gating locality
  injection"): ``s * o + (1 - s) * local``; SiLU (ViG-T only); output projection.
- **Head**: RMSNorm, average of the tokens, linear.

The official training forward averages the two directions; its evaluation forward (a
fused bidirectional kernel) halves that average once more. The per-head RMSNorm right
after removes the factor only up to its epsilon, which matters when the scan's output
is small (1% of ViG-T's logits with small random weights), so both are kept: ``train``
selects the factor, as the official ``module.training`` does. Parameter tree::

  patch_embed/{conv_0, norm_0, conv_1, norm_1}, pos_embed
  blocks_{i}/{attn_norm, mlp_norm}, blocks_{i}/attn/{in_proj, qkv_proj, gk_proj_0,
    gk_proj_1, g_proj, g_norm, l_norm, o_proj}, blocks_{i}/mlp/{gate_proj, down_proj}
  norm, head

Sown: ``block_{i}`` (each block's output as an NHWC token map) and ``features``.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import kernels, sharding
from vit_jax.models import layers, resample
from vit_jax.models.convert import StateDict
from vit_jax.models.official import register_official_converter
from vit_jax.models.registry import register_variant
from vit_jax.models.vit import REMAT_POLICIES

Array = Any

# Tensor parallelism (see vit_jax.sharding): ``g_proj`` writes the gate head after head
# and ``o_proj`` reads the heads back, so they split by heads; ``qkv_proj`` (fused q|k|v)
# and the MLP's ``gate_proj`` (fused a|b) stay whole, ``down_proj`` splits its inputs.
PARAM_AXES = (
    (r"(^|/)attn/g_proj/kernel$", ("embed", "heads")),
    (r"(^|/)attn/g_proj/bias$", ("heads",)),
    (r"(^|/)attn/o_proj/kernel$", ("heads", "embed")),
    (r"(^|/)mlp/down_proj/kernel$", ("mlp", "embed")),
)
sharding.register_param_axes(PARAM_AXES)

# hustvl/ViG classification/configs/vig/vig-{t,s,b}.yaml on the defaults of config.py
# (12 blocks, patch 16, expand_k 0.5, expand_v 1).
VARIANTS = {
    "vig_tiny": dict(embed_dim=192, num_heads=3, conv_act=True, out_act=True),
    "vig_small": dict(embed_dim=384, num_heads=6, conv_act=False, out_act=False),
    "vig_base": dict(embed_dim=768, num_heads=12, conv_act=False, out_act=False),
}

GATE_RANK = 16  # gk_proj's bottleneck
GATE_LOGIT_NORMALIZER = 16


def swiglu_width(dim: int, ratio: float = 4.0, multiple: int = 256) -> int:
  """fla's GLA MLP width: ``2/3 * ratio * dim`` rounded up to a multiple of 256
  (ViG-H's ``gMlp``: of 32)."""
  width = int(dim * ratio * 2 / 3)
  return multiple * -(-width // multiple)


# GLA's elementwise steps are recomputed in the backward pass (jax.checkpoint) and
# keep only their inputs, where autodiff keeps 2-6 arrays of the same size each (as
# fla's fused norm and gate kernels avoid too); so is the MLP's SwiGLU product (see
# GLABlock). At 1024x1024 ViG-T's training step then compiles to 1,521 MiB of
# scratch (``python -m vit_jax.tools.linear_cost``, docs/kernels.md).
_silu = jax.checkpoint(nn.silu)


@jax.checkpoint
def _log_gate(logits: Array) -> Array:
  """GLA's log decay: ``log_sigmoid(x) / 16``, in float32."""
  return jax.nn.log_sigmoid(logits.astype(jnp.float32)) / GATE_LOGIT_NORMALIZER


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _rms_norm(x: Array, scale: Array, eps: float) -> Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


@functools.partial(jax.checkpoint, static_argnums=(5, 6))
def _inject_locality(out, local, mix_logits, out_scale, local_scale, eps, out_act):
  """``s * RMSNorm(out) + (1 - s) * RMSNorm(local)``, ``s = sigmoid(mix_logits)``."""
  mix = nn.sigmoid(mix_logits.astype(jnp.float32))
  y = (_rms_norm(out, out_scale, eps) * mix
       + _rms_norm(local, local_scale, eps) * (1 - mix))
  return nn.silu(y) if out_act else y


class NormScale(nn.Module):
  """An RMSNorm's learned scale (``<name>/scale``, as ``nn.RMSNorm`` names it)."""
  features: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> Array:
    return self.param("scale", nn.initializers.ones, (self.features,), self.param_dtype)


class RMSNorm(nn.Module):
  """``nn.RMSNorm``'s parameters and result, recomputed in the backward pass."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return _rms_norm(x, scale.astype(jnp.float32), self.epsilon).astype(self.dtype)


class SwiGLU(nn.Module):
  """``down(silu(a) * b)`` with ``[a, b] = gate_proj(x)``; no biases (fla's GLAMLP)."""
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gate, y = jnp.split(layers.Dense(2 * self.hidden, use_bias=False, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name="gate_proj")(x), 2,
                        axis=-1)
    return layers.Dense(x.shape[-1], use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="down_proj")(nn.silu(gate) * y)


def rms_norm(name: str, dtype, param_dtype, eps: float = 1e-6) -> RMSNorm:
  return RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class GatedLinearAttention(nn.Module):
  """ViG's bidirectional GLA with 2D locality injection on ``[B, h, w, C]`` maps."""
  num_heads: int
  expand_k: float = 0.5
  expand_v: float = 1.0
  conv_act: bool = True
  out_act: bool = False
  # ViG's evaluation kernel halves the directions' mean again; ViG-H's forward does
  # not (its ``o /= 2`` is commented out), so its factor is 1/2 in both modes.
  eval_halves_again: bool = True
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    batch, height, width, dim = x.shape
    key_dim, value_dim = int(dim * self.expand_k), int(dim * self.expand_v)
    heads = self.num_heads
    if key_dim % heads or value_dim % heads or value_dim != dim:
      raise ValueError(f"GLA needs widths divisible by num_heads={heads} and expand_v=1 "
                       f"(the locality branch mixes the input with the values); got "
                       f"embed_dim={dim}, expand_k={self.expand_k}, expand_v={self.expand_v}")
    dense = lambda features, name, bias=False: layers.Dense(
        features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    local = layers.DepthwiseConv(dim, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                                 dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="in_proj")(x)
    if self.conv_act:
      local = _silu(local)
    local = local.reshape(batch, height * width, dim)
    q, k, v = jnp.split(dense(2 * key_dim + value_dim, "qkv_proj")(local),
                        [key_dim, 2 * key_dim], axis=-1)
    gates = dense(2 * key_dim, "gk_proj_1", bias=True)(dense(GATE_RANK, "gk_proj_0")(local))
    gates = _log_gate(gates)
    split = lambda t: t.reshape(batch, height * width, heads, -1)
    dk = key_dim // heads
    q, k, v = split(q * dk ** -0.5), split(k), split(v)
    forward_gate, reverse_gate = (split(t) for t in jnp.split(gates, 2, axis=-1))
    scan = lambda g, reverse: kernels.gated_scan(q, k, v, g, reverse=reverse,
                                                 impl=self.attention_impl)
    # Official: mean of the directions in training, half of it in evaluation.
    factor = 0.25 if self.eval_halves_again and not train else 0.5
    out = (scan(forward_gate, False) + scan(reverse_gate, True)) * factor
    scale = lambda name: NormScale(value_dim // heads, self.param_dtype, name=name)()
    out = _inject_locality(out, split(local), split(dense(value_dim, "g_proj", bias=True)(local)),
                           scale("g_norm").astype(jnp.float32),
                           scale("l_norm").astype(jnp.float32), 1e-6, self.out_act)
    out = out.astype(self.dtype).reshape(batch, height * width, value_dim)
    return dense(dim, "o_proj")(out).reshape(batch, height, width, dim)


class GLABlock(nn.Module):
  """``x + GLA(norm(x))``, ``x + SwiGLU(norm(x))``.

  ``norm``: "rms" (ViG: RMSNorm, eps 1e-6) or "layer" (ViG-H: LayerNorm, eps 1e-5).
  """
  num_heads: int
  mlp_hidden: int
  conv_act: bool = True
  out_act: bool = False
  eval_halves_again: bool = True
  norm: str = "rms"
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def make_norm(self, name: str) -> nn.Module:
    if self.norm == "layer":
      return layers.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=name)
    return rms_norm(name, self.dtype, self.param_dtype)

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    y = GatedLinearAttention(num_heads=self.num_heads, conv_act=self.conv_act,
                             out_act=self.out_act, eval_halves_again=self.eval_halves_again,
                             attention_impl=self.attention_impl,
                             dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
                                 self.make_norm("attn_norm")(x), train=train)
    x = x + layers.DropPath(self.drop_path_rate)(y, train=train)
    # Keeps the input and gate_proj's output; the product is recomputed.
    mlp = nn.remat(SwiGLU, policy=jax.checkpoint_policies.dots_saveable)
    y = mlp(self.mlp_hidden, dtype=self.dtype, param_dtype=self.param_dtype,
            name="mlp")(self.make_norm("mlp_norm")(x))
    return x + layers.DropPath(self.drop_path_rate)(y, train=train)


class ConvStem(nn.Module):
  """ViG's ``V2PatchEmbed``: two strided convs with LayerNorms; stride ``patch_size``.

  ``act`` between them: SiLU (ViG) or exact GELU (ViG-H's ``_make_patch_embed_v2``).
  """
  dim: int
  patch_size: int = 16
  act: Callable[[Array], Array] = nn.silu
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    stride = self.patch_size // 2
    conv = lambda features, kernel, s, name: nn.Conv(
        features, (kernel, kernel), strides=(s, s), padding=((1, 1), (1, 1)),
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    norm = lambda name: layers.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    x = self.act(norm("norm_0")(conv(self.dim // 2, stride + 1, stride, "conv_0")(images)))
    return norm("norm_1")(conv(self.dim, 3, 2, "conv_1")(x))


class ViG(nn.Module):
  """ViG classifier on NHWC images of any size (at least ``patch_size``).

  Attributes:
    num_classes: size of the head; 0 returns the pooled features.
    image_size: the size the position embedding is built for (other inputs resample it).
    patch_size: total stride of the stem (16 for the official models).
    embed_dim, depth, num_heads: width, blocks, GLA heads (``dk = d / 2 / heads``,
      ``dv = d / heads``).
    conv_act, out_act: SiLU after the depth-wise conv and before the output
      projection of GLA (both on in ViG-T, off in ViG-S/B).
    dropout_rate: after the position embedding. drop_path_rate: stochastic depth of
      the last block, rising linearly from 0.
    attention_impl: backend of ``vit_jax.kernels.gated_scan``.
    remat_policy: "none", "full" or a ``jax.checkpoint_policies`` name: recompute
      each block's activations in the backward pass (``vit.REMAT_POLICIES``);
      ``"dots_saveable"`` keeps the matmul outputs and recomputes the elementwise
      ops, as the official fused kernels (fla's SwiGLU and norms) do.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  conv_act: bool = True
  out_act: bool = False
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def grid(self, height: int, width: int) -> tuple[int, int]:
    """The token grid of the stem for an input size."""
    stride = self.patch_size // 2
    if self.patch_size < 4 or self.patch_size % 2:
      raise ValueError(f"ViG's stem needs an even patch_size >= 4, got {self.patch_size}")
    h, w = ((s + 2 - stride - 1) // stride + 1 for s in (height, width))
    if min(h, w) < 1:
      raise ValueError(f"ViG with patch size {self.patch_size} needs images of at least "
                       f"{stride - 1}x{stride - 1}, got {height}x{width}")
    return (h + 1) // 2, (w + 1) // 2

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    layers.check_images(images)
    kernels.resolve(self.attention_impl)
    if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be 'none' or one of {sorted(REMAT_POLICIES)}, "
                       f"got {self.remat_policy!r}")
    gh, gw = self.grid(images.shape[1], images.shape[2])
    x = ConvStem(self.embed_dim, self.patch_size, dtype=dtype, param_dtype=param_dtype,
                 name="patch_embed")(images.astype(dtype))
    side = self.image_size // self.patch_size
    pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                     (1, side * side, self.embed_dim), param_dtype)
    if (gh, gw) != (side, side):
      pos = resample.resample_posemb(pos, (gh, gw), num_prefix_tokens=0, antialias=False)
    x = x + pos.reshape(1, gh, gw, self.embed_dim).astype(dtype)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    rates = layers.stochastic_depth_rates(self.drop_path_rate, self.depth)
    hidden = swiglu_width(self.embed_dim)

    def apply_block(module, x):
      return module(x, train=train)

    if self.remat_policy != "none":
      apply_block = nn.remat(apply_block, policy=REMAT_POLICIES[self.remat_policy])
    for i in range(self.depth):
      x = apply_block(GLABlock(num_heads=self.num_heads, mlp_hidden=hidden,
                               conv_act=self.conv_act, out_act=self.out_act,
                               drop_path_rate=rates[i], attention_impl=self.attention_impl,
                               dtype=dtype, param_dtype=param_dtype, name=f"blocks_{i}"), x)
      self.sow("intermediates", f"block_{i}", x)
    x = jnp.mean(rms_norm("norm", dtype, param_dtype)(x), axis=(1, 2))
    return layers.classifier_head(self, x, self.num_classes, dtype=dtype,
                                  param_dtype=param_dtype)


@register_official_converter("vig")
def convert_official_vig(state: StateDict, model: ViG) -> dict:
  """hustvl/ViG ``classification/models/vig.py`` state dict -> parameters.

  Official names: ``patch_embed.proj.{0,1,3,4}`` (conv, LayerNorm, conv, LayerNorm),
  ``pos_embed``, ``blocks.{i}.{attn_norm,mlp_norm}``, ``blocks.{i}.attn.in_proj.0``,
  ``qkv_proj``, ``gk_proj.{0,1}``, ``g_proj``, ``g_norm``, ``l_norm``, ``o_proj``,
  ``blocks.{i}.mlp.{gate_proj,down_proj}``, ``norm``, ``head``.
  """
  rms = lambda key: {"scale": state.take(f"{key}.weight")}
  params = {"patch_embed": {"conv_0": state.conv("patch_embed.proj.0"),
                            "norm_0": state.norm("patch_embed.proj.1"),
                            "conv_1": state.conv("patch_embed.proj.3"),
                            "norm_1": state.norm("patch_embed.proj.4")},
            "pos_embed": state.take("pos_embed"), "norm": rms("norm")}
  for i in range(model.depth):
    p = f"blocks.{i}"
    params[f"blocks_{i}"] = {
        "attn_norm": rms(f"{p}.attn_norm"), "mlp_norm": rms(f"{p}.mlp_norm"),
        "attn": {"in_proj": state.conv(f"{p}.attn.in_proj.0", bias=False),
                 "qkv_proj": state.linear(f"{p}.attn.qkv_proj", bias=False),
                 "gk_proj_0": state.linear(f"{p}.attn.gk_proj.0", bias=False),
                 "gk_proj_1": state.linear(f"{p}.attn.gk_proj.1"),
                 "g_proj": state.linear(f"{p}.attn.g_proj"),
                 "g_norm": rms(f"{p}.attn.g_norm"), "l_norm": rms(f"{p}.attn.l_norm"),
                 "o_proj": state.linear(f"{p}.attn.o_proj", bias=False)},
        "mlp": {"gate_proj": state.linear(f"{p}.mlp.gate_proj", bias=False),
                "down_proj": state.linear(f"{p}.mlp.down_proj", bias=False)}}
  if model.num_classes:
    params["head"] = state.linear("head")
  return params


def _register_variants():
  for name, config in VARIANTS.items():
    register_variant(name, ViG, config, family="vig", doc=f"Official ViG ({name}), 224x224.")


_register_variants()
