"""Vision Mamba (Vim; Zhu et al., 2024): bidirectional selective state-space blocks.

Not in timm. Reference: hustvl/Vim, ``vim/models_mamba.py`` (``VisionMamba``) and its
Mamba fork ``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py`` (``bimamba_type="v2"``),
registered here as ``vim_{tiny,small,base}_patch16_224`` (the official
``..._bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2`` functions).

Layout: a 16x16 patch conv; a class token inserted in the middle of the 196 patch
tokens (position 98); a learned position embedding over all 197; 24 residual blocks
of the "add, then norm" form (the residual stream is kept in float32); RMSNorm; the
class token's features; a linear head.

Each block's mixer (``Mamba``) projects to ``2 * d`` channels ``x, z``; for each
direction it runs ``x`` through a causal depth-wise conv (kernel 4) and SiLU, projects
to ``Δ`` (rank ``d/16``, then ``softplus(W Δ + b)``), ``B`` and ``C`` (``d_state`` = 16),
and runs the selective scan::

  h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,     y_t = C_t h_t + D x_t

per channel, ``A = -exp(A_log)`` of shape ``[2d, d_state]``; the output is
``y * silu(z)``. The backward direction has its own conv, projections, ``A`` and
``D``, and runs on the token-reversed sequence; the two outputs are averaged and
projected back to ``d``.

The selective scan runs on ``vit_jax.kernels.gated_scan``: every channel is a head with
``dk = d_state`` and ``dv = 1``: ``q_t = C_t``, ``k_t = B_t`` (shared by the channels),
``v_t = Δ_t x_t`` and the per-key-dimension log decay ``g_t = Δ_t A``. (The decay
depends on both the channel and the state index, so channels cannot share a head's
state as GLA's value dims do; ``dv = 1`` is the exact fit.) The official code calls
mamba-ssm's CUDA kernel, whose reference ``selective_scan_ref`` is this recurrence.

Parameter tree::

  patch_embed, cls_token, pos_embed
  layers_{i}/norm, layers_{i}/mixer/{in_proj, conv1d, x_proj, dt_proj, A_log, D,
    conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b, out_proj}
  norm_f, head

Sown: ``block_{i}``, the residual stream after block ``i`` as an NHWC map of the patch
tokens (the class token left out; in the compute dtype), and ``features``.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import kernels, sharding
from vit_jax.models import layers
from vit_jax.models.convert import StateDict
from vit_jax.models.official import register_official_converter
from vit_jax.models.registry import register_variant

Array = Any

# Tensor parallelism (see vit_jax.sharding): Mamba's inner channels are independent
# scans (each channel a head), so everything indexed by them splits as ``heads``; the
# fused x|z ``in_proj`` stays whole and ``x_proj`` reduces over the channels.
PARAM_AXES = (
    (r"(^|/)mixer/out_proj/kernel$", ("heads", "embed")),
    (r"(^|/)mixer/x_proj(_b)?/kernel$", ("heads", None)),
    (r"(^|/)mixer/dt_proj(_b)?/kernel$", (None, "heads")),
    (r"(^|/)mixer/(dt_proj|conv1d)(_b)?/bias$", ("heads",)),
    (r"(^|/)mixer/conv1d(_b)?/kernel$", (None, None, "heads")),
    (r"(^|/)mixer/A(_b)?_log$", ("heads", None)),
    (r"(^|/)mixer/D(_b)?$", ("heads",)),
)
sharding.register_param_axes(PARAM_AXES)

VARIANTS = {
    "vim_tiny_patch16_224": dict(embed_dim=192),
    "vim_small_patch16_224": dict(embed_dim=384),
    "vim_base_patch16_224": dict(embed_dim=768),
}


def _a_log_init(key, shape, dtype=jnp.float32):
  """S4D-real: ``A = -(1, 2, ..., d_state)`` for every channel."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)),
                          shape).astype(dtype)


def _dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, floor=1e-4):
  """A bias whose softplus is log-uniform in ``[dt_min, dt_max]`` (Mamba's init)."""
  dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(dt_max) - math.log(dt_min))
               + math.log(dt_min))
  dt = jnp.maximum(dt, floor)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class Mamba(nn.Module):
  """Vim's bidirectional ("v2") Mamba mixer over ``[B, L, d]`` tokens."""
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _direction(self, x: Array, z: Array, suffix: str, rank: int) -> Array:
    """One direction's conv, projections and selective scan: ``y * silu(z)``."""
    inner = x.shape[-1]
    dense = lambda features, name, bias=False, **kw: layers.Dense(
        features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name + suffix, **kw)
    x = nn.silu(layers.DepthwiseConv(inner, (self.d_conv,), padding=((self.d_conv - 1, 0),),
                                     dtype=self.dtype, param_dtype=self.param_dtype,
                                     name="conv1d" + suffix)(x))
    dt, b, c = jnp.split(dense(rank + 2 * self.d_state, "x_proj")(x),
                         [rank, rank + self.d_state], axis=-1)
    dt_proj = dense(inner, "dt_proj", bias=True,
                    kernel_init=nn.initializers.uniform(2 * rank ** -0.5),
                    bias_init=_dt_bias_init)
    delta = jax.nn.softplus(dt_proj(dt).astype(jnp.float32))
    a_log = self.param("A_log" if not suffix else "A_b_log", _a_log_init,
                       (inner, self.d_state), self.param_dtype)
    skip = self.param("D" + suffix, nn.initializers.ones, (inner,), self.param_dtype)
    a = -jnp.exp(a_log.astype(jnp.float32))
    batch, length = x.shape[:2]
    heads = (batch, length, inner, self.d_state)
    y = kernels.gated_scan(
        jnp.broadcast_to(c[:, :, None, :], heads),
        jnp.broadcast_to(b[:, :, None, :], heads),
        (delta * x.astype(jnp.float32))[..., None],
        delta[..., None] * a,
        impl=self.attention_impl)[..., 0]
    y = y + x.astype(jnp.float32) * skip.astype(jnp.float32)
    return (y * nn.silu(z.astype(jnp.float32))).astype(self.dtype)

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    dim = tokens.shape[-1]
    rank = -(-dim // 16)  # Mamba's dt_rank="auto"
    xz = layers.Dense(2 * self.expand * dim, use_bias=False, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="in_proj")(tokens)
    x, z = jnp.split(xz, 2, axis=-1)
    flip = lambda t: jnp.flip(t, axis=1)
    out = (self._direction(x, z, "", rank)
           + flip(self._direction(flip(x), flip(z), "_b", rank))) / 2
    return layers.Dense(dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="out_proj")(out)


class Block(nn.Module):
  """``mixer(RMSNorm(residual))``: Vim adds the output to the stream in the next block."""
  d_state: int = 16
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, residual: Array) -> Array:
    normed = nn.RMSNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="norm")(residual)
    return Mamba(d_state=self.d_state, attention_impl=self.attention_impl,
                 dtype=self.dtype, param_dtype=self.param_dtype, name="mixer")(normed)


class VisionMamba(nn.Module):
  """Vim classifier on NHWC images of ``image_size``.

  Attributes:
    num_classes: size of the head; 0 returns the class token's features.
    image_size, patch_size: the learned position embedding fixes the token grid.
    embed_dim, depth, d_state: width, number of blocks, state size per channel.
    dropout_rate: after the position embedding. drop_path_rate: stochastic depth,
      the official schedule (block ``i`` adds its predecessor's output with rate
      ``linspace(0, rate, depth)[i - 1]``; the last output with ``rate``).
    attention_impl: backend of ``vit_jax.kernels.gated_scan`` for the selective scans.
    dtype: compute dtype (the residual stream stays float32, as the official
      ``residual_in_fp32``); param_dtype: storage dtype of the parameters.
  """
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  embed_dim: int = 192
  depth: int = 24
  d_state: int = 16
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def patch_grid(self, height: int, width: int) -> tuple[int, int]:
    p, size = self.patch_size, self.image_size
    if (height, width) != (size, size):
      raise ValueError(
          f"this Vim's learned position embedding is built for {size}x{size} images "
          f"({size // p}x{size // p} patches and a class token); got {height}x{width}. "
          f"Create the model with image_size={height} if the sides are equal and "
          f"divisible by {p}.")
    if size % p:
      raise ValueError(f"Vim with patch size {p} needs image sides divisible by {p}, "
                       f"got image_size={size}")
    return size // p, size // p

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    layers.check_images(images)
    kernels.resolve(self.attention_impl)
    gh, gw = self.patch_grid(images.shape[1], images.shape[2])
    p, dim = self.patch_size, self.embed_dim
    x = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                param_dtype=param_dtype, name="patch_embed")(images.astype(dtype))
    batch = x.shape[0]
    x = x.reshape(batch, gh * gw, dim)
    middle = gh * gw // 2
    cls = self.param("cls_token", nn.initializers.truncated_normal(0.02), (1, 1, dim),
                     param_dtype)
    x = jnp.concatenate([x[:, :middle], jnp.tile(cls.astype(dtype), (batch, 1, 1)),
                         x[:, middle:]], axis=1)
    x = x + self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                       (1, gh * gw + 1, dim), param_dtype).astype(dtype)
    hidden = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)

    def patch_map(tokens):  # the float32 stream, sown in the compute dtype
      tokens = jnp.concatenate([tokens[:, :middle], tokens[:, middle + 1:]], axis=1)
      return tokens.reshape(batch, gh, gw, dim).astype(dtype)

    rates = [0.0] + layers.stochastic_depth_rates(self.drop_path_rate, self.depth)
    residual = None
    for i in range(self.depth):
      if residual is None:
        residual = hidden.astype(jnp.float32)
      else:
        residual = residual + layers.DropPath(rates[i])(hidden, train=train)
        self.sow("intermediates", f"block_{i - 1}", patch_map(residual))
      hidden = Block(d_state=self.d_state, attention_impl=self.attention_impl, dtype=dtype,
                     param_dtype=param_dtype, name=f"layers_{i}")(residual)
    residual = residual + layers.DropPath(self.drop_path_rate)(hidden, train=train)
    self.sow("intermediates", f"block_{self.depth - 1}", patch_map(residual))
    x = nn.RMSNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                   name="norm_f")(residual)[:, middle]
    return layers.classifier_head(self, x, self.num_classes, dtype=dtype,
                                  param_dtype=param_dtype)


@register_official_converter("vim")
def convert_official_vim(state: StateDict, model: VisionMamba) -> dict:
  """hustvl/Vim ``vim/models_mamba.py`` state dict -> parameters.

  Official names: ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
  ``layers.{i}.norm``, ``layers.{i}.mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D,
  conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b, out_proj}``, ``norm_f``, ``head``.
  """
  conv1d = lambda key: {"kernel": state.take(f"{key}.weight").transpose(2, 1, 0),
                        "bias": state.take(f"{key}.bias")}
  params = {"patch_embed": state.conv("patch_embed.proj"),
            "cls_token": state.take("cls_token"), "pos_embed": state.take("pos_embed"),
            "norm_f": {"scale": state.take("norm_f.weight")}}
  for i in range(model.depth):
    p = f"layers.{i}.mixer"
    mixer = {"in_proj": state.linear(f"{p}.in_proj", bias=False),
             "out_proj": state.linear(f"{p}.out_proj", bias=False)}
    for suffix in ("", "_b"):
      mixer.update({f"conv1d{suffix}": conv1d(f"{p}.conv1d{suffix}"),
                    f"x_proj{suffix}": state.linear(f"{p}.x_proj{suffix}", bias=False),
                    f"dt_proj{suffix}": state.linear(f"{p}.dt_proj{suffix}"),
                    f"D{suffix}": state.take(f"{p}.D{suffix}")})
    mixer["A_log"] = state.take(f"{p}.A_log")
    mixer["A_b_log"] = state.take(f"{p}.A_b_log")
    params[f"layers_{i}"] = {"mixer": mixer,
                             "norm": {"scale": state.take(f"layers.{i}.norm.weight")}}
  if model.num_classes:
    params["head"] = state.linear("head")
  return params


def _register_variants():
  for name, config in VARIANTS.items():
    register_variant(name, VisionMamba, config, family="vim", doc=f"Official Vim ({name}).")


_register_variants()
