"""RMT (Fan et al., CVPR 2024): "Retentive Networks Meet Vision Transformers".

Not in timm. Reference: qhfan/RMT, ``classfication_release/RMT.py`` (``RMT_T3``,
``RMT_S``, ``RMT_M2``, ``RMT_L6``: the README's RMT-T/S/B/L, 14M/27M/54M/95M), registered
here as ``rmt_tiny``, ``rmt_small``, ``rmt_base`` and ``rmt_large``.

A four-stage pyramid (strides 4, 8, 16, 32). Its token mixer, *Manhattan self-attention*,
is softmax attention whose logits get an explicit spatial prior: head ``h`` adds
``|dy| + |dx|`` times ``log(gamma_h)`` (``gamma_h = 1 - 2 ** -(a + b * h / heads)``, ``a``
and ``b`` per stage) for a query-key pair ``dy`` rows and ``dx`` columns apart. Stages
marked ``decomposed`` (the early, large maps) attend along each row with the 1D decay
``|dx|``, then along each column with ``|dy|`` (the column pass attends over the row
pass's output), which costs O(HW (H + W)) instead of O((HW)^2); the other stages use the
full 2D decay. Queries and keys are rotated (rotary embedding, interleaved pairs) by
their raster index ``y * W + x``, and a 5x5 depth-wise conv of the values (LePE) is added
to the attention output.

Because the decay enters a softmax, RMT has no recurrent (scan) form: this is the
parallel form, written with ``layers.dot_product_attention`` and a decay bias.

Each block: ``x += dwconv3x3(x)`` (conditional position encoding), pre-norm attention,
pre-norm FFN (fc1, GELU, ``+= dwconv3x3``, fc2), optional layer scale (RMT-B/L, last two
stages). The stem is four 3x3 convs (strides 2, 1, 2, 1) with BatchNorm, stages are
joined by a 3x3 stride-2 conv + BatchNorm, and the head is Linear (to 1024) ->
BatchNorm -> swish -> global average -> Linear. BatchNorm running statistics live in
``batch_stats`` (call with ``mutable=["batch_stats"]`` when training).

Parameter tree::

  patch_embed/{conv_0..3, bn_0..3}
  stages_{i}/downsample/{conv,bn}                                     (i > 0)
  stages_{i}/blocks_{j}/cpe, norm1, retention/{q,k,v,lepe,out}, norm2,
                        ffn/{fc1,dwconv,fc2}, (gamma_1, gamma_2)
  proj, proj_norm, head

Sown: ``stage_{i}``, each stage's output as an NHWC map (before the next stage's
downsampling: the maps the official detection backbone returns, without its extra
norms), and ``features`` (the pooled 1024-wide vector before the head).

Any input size works (every conv pads, strides round up); the official code builds
nothing from the input size either.

Official checkpoints hold BatchNorm statistics besides the parameters: load them with
``rmt.variables_from_official`` (``official.from_official`` returns parameters only).
"""

import os
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import sharding
from vit_jax.models import convert, layers
from vit_jax.models.convert import StateDict, Variables
from vit_jax.models.efficientvit_msra import timm_bn_stats
from vit_jax.models.official import register_official_converter
from vit_jax.models.registry import create, model_info, register_variant

Array = Any

dense_init = nn.initializers.truncated_normal(0.02)
# PyTorch's default conv init (uniform, bound 1/sqrt(fan_in)), which the official code keeps.
conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

# Tensor parallelism (see vit_jax.sharding): ``q``/``k``/``v`` write heads one after the
# other (``[dim, heads * head_dim]``), so splitting their outputs splits heads, and the
# rotary, decay and LePE act per head (LePE's depth-wise conv per channel); ``out``
# reads them back. The FFN splits its hidden units, its depth-wise conv with them.
PARAM_AXES = (
    (r"(^|/)retention/[qkv]/kernel$", ("embed", "heads")),
    (r"(^|/)retention/([qkv]|lepe)/bias$", ("heads",)),
    (r"(^|/)retention/lepe/kernel$", (None, None, None, "heads")),
    (r"(^|/)retention/out/kernel$", ("heads", "embed")),
    (r"(^|/)ffn/fc1/kernel$", ("embed", "mlp")),
    (r"(^|/)ffn/(fc1|dwconv)/bias$", ("mlp",)),
    (r"(^|/)ffn/dwconv/kernel$", (None, None, None, "mlp")),
    (r"(^|/)ffn/fc2/kernel$", ("mlp", "embed")),
)
sharding.register_param_axes(PARAM_AXES)

# Official configurations (classfication_release/RMT.py); every variant projects to 1024
# before the head.
VARIANTS = {
    "rmt_tiny": dict(  # RMT_T3
        embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
        initial_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3),
        decomposed=(True, True, False, False), layer_scales=(False,) * 4),
    "rmt_small": dict(  # RMT_S
        embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16),
        initial_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3),
        decomposed=(True, True, True, False), layer_scales=(False,) * 4),
    "rmt_base": dict(  # RMT_M2
        embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16),
        initial_values=(2, 2, 2, 2), heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3),
        decomposed=(True, True, True, False), layer_scales=(False, False, True, True)),
    "rmt_large": dict(  # RMT_L6
        embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20),
        initial_values=(2, 2, 2, 2), heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3),
        decomposed=(True, True, True, False), layer_scales=(False, False, True, True)),
}


# ---------------------------------------------------------------- spatial prior


def decay_rates(num_heads: int, initial_value: float, heads_range: float) -> np.ndarray:
  """``log(gamma_h)`` per head (negative): the logit penalty per unit of distance."""
  h = np.arange(num_heads, dtype=np.float64)
  return np.log(1.0 - 2.0 ** (-initial_value - heads_range * h / num_heads))


def rotary_angles(head_dim: int) -> np.ndarray:
  """Frequencies ``10000 ** -linspace(0, 1, head_dim / 2)``, each repeated for its pair."""
  return np.repeat(10000.0 ** -np.linspace(0.0, 1.0, head_dim // 2), 2)


def rotary_tables(height: int, width: int, head_dim: int) -> tuple[Array, Array]:
  """``sin``, ``cos`` of raster index times frequency, ``[height, width, 1, head_dim]``.

  Computed in float64 and rounded once, so they do not depend on the compute dtype.
  """
  phase = np.arange(height * width)[:, None] * rotary_angles(head_dim)[None]
  shape = (height, width, 1, head_dim)
  return (np.sin(phase).reshape(shape).astype(np.float32),
          np.cos(phase).reshape(shape).astype(np.float32))


def rotate(x: Array, sin: Array, cos: Array) -> Array:
  """Rotary embedding on interleaved pairs: ``(a, b) -> (a cos - b sin, b cos + a sin)``."""
  pairs = x.reshape(x.shape[:-1] + (-1, 2))
  turned = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return x * cos.astype(x.dtype) + turned * sin.astype(x.dtype)


def axis_decay_bias(decay: np.ndarray, length: int) -> Array:
  """``[heads, length, length]`` logit bias ``|i - j| * log(gamma_h)`` along one axis."""
  index = jnp.arange(length, dtype=jnp.float32)
  return jnp.abs(index[:, None] - index[None, :]) * jnp.asarray(decay, jnp.float32)[
      :, None, None]


def manhattan_decay_bias(decay: np.ndarray, height: int, width: int) -> Array:
  """``[heads, HW, HW]`` logit bias ``(|dy| + |dx|) * log(gamma_h)`` over raster tokens."""
  y, x = jnp.divmod(jnp.arange(height * width), width)
  distance = (jnp.abs(y[:, None] - y[None, :]) + jnp.abs(x[:, None] - x[None, :]))
  return distance.astype(jnp.float32) * jnp.asarray(decay, jnp.float32)[:, None, None]


def manhattan_attention(query: Array, key: Array, value: Array, decay: np.ndarray, *,
                        decomposed: bool) -> Array:
  """Softmax attention with the Manhattan decay prior on ``[B, H, W, heads, d]`` maps.

  ``decomposed``: along rows (1D decay of the column distance), then along columns (of
  the row-attended values, 1D decay of the row distance); otherwise all tokens at once
  with the 2D decay.
  """
  batch, height, width, heads, _ = query.shape
  if not decomposed:
    flat = lambda t: t.reshape(batch, height * width, heads, t.shape[-1])
    out = layers.dot_product_attention(
        flat(query), flat(key), flat(value),
        bias=manhattan_decay_bias(decay, height, width)[None])
    return out.reshape(batch, height, width, heads, -1)
  rows = lambda t: t.reshape(batch * height, width, heads, t.shape[-1])
  out = layers.dot_product_attention(rows(query), rows(key), rows(value),
                                     bias=axis_decay_bias(decay, width)[None])
  out = out.reshape(batch, height, width, heads, -1)
  cols = lambda t: jnp.swapaxes(t, 1, 2).reshape(batch * width, height, heads, t.shape[-1])
  out = layers.dot_product_attention(cols(query), cols(key), cols(out),
                                     bias=axis_decay_bias(decay, height)[None])
  return jnp.swapaxes(out.reshape(batch, width, height, heads, -1), 1, 2)


# ---------------------------------------------------------------- modules


def depthwise_conv(features: int, kernel: int, name: str, dtype: Any,
                   param_dtype: Any) -> nn.Module:
  pad = kernel // 2
  return layers.DepthwiseConv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                              kernel_init=conv_init, dtype=dtype, param_dtype=param_dtype,
                              name=name)


class Retention(nn.Module):
  """Manhattan self-attention on an NHWC map: q/k/v, rotary, decayed softmax, LePE."""
  num_heads: int
  initial_value: float
  heads_range: float
  decomposed: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, height, width, dim = x.shape
    head_dim = dim // self.num_heads
    dense = lambda name: layers.Dense(dim, kernel_init=dense_init, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name=name)
    query, key, value = dense("q")(x), dense("k")(x), dense("v")(x)
    lepe = depthwise_conv(dim, 5, "lepe", self.dtype, self.param_dtype)(value)
    sin, cos = rotary_tables(height, width, head_dim)
    heads = lambda t: t.reshape(batch, height, width, self.num_heads, head_dim)
    out = manhattan_attention(
        rotate(heads(query), sin, cos), rotate(heads(key), sin, cos), heads(value),
        decay_rates(self.num_heads, self.initial_value, self.heads_range),
        decomposed=self.decomposed)
    return dense("out")(out.reshape(batch, height, width, dim) + lepe)


class FeedForward(nn.Module):
  """fc1 -> GELU -> (+ depth-wise 3x3 conv) -> fc2, on an NHWC map."""
  hidden_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = lambda features, name: layers.Dense(
        features, kernel_init=dense_init, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    h = layers.gelu(dense(self.hidden_dim, "fc1")(x))
    h = h + depthwise_conv(self.hidden_dim, 3, "dwconv", self.dtype, self.param_dtype)(h)
    return dense(x.shape[-1], "fc2")(h)


class RMTBlock(nn.Module):
  """x += CPE(x); x += attention(LN(x)); x += FFN(LN(x)) (optionally layer-scaled)."""
  num_heads: int
  mlp_ratio: float
  initial_value: float
  heads_range: float
  decomposed: bool
  layer_scale: Optional[float] = None  # initial value of the scales; None: none
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    dim = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: layers.LayerNorm(epsilon=1e-6, name=name, **kw)

    def scaled(y, name):
      if self.layer_scale is None:
        return y
      gamma = self.param(name, nn.initializers.constant(self.layer_scale), (dim,),
                         self.param_dtype)
      return y * gamma.astype(self.dtype)

    x = x + depthwise_conv(dim, 3, "cpe", **kw)(x)
    y = Retention(self.num_heads, self.initial_value, self.heads_range, self.decomposed,
                  name="retention", **kw)(norm("norm1")(x))
    x = x + layers.DropPath(self.drop_path_rate)(scaled(y, "gamma_1"), train=train)
    y = FeedForward(int(dim * self.mlp_ratio), name="ffn", **kw)(norm("norm2")(x))
    return x + layers.DropPath(self.drop_path_rate)(scaled(y, "gamma_2"), train=train)


class ConvBN(nn.Module):
  """Conv (with bias, as the official code has) + BatchNorm, NHWC."""
  features: int
  stride: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    x = nn.Conv(self.features, (3, 3), strides=(self.stride, self.stride),
                padding=((1, 1), (1, 1)), kernel_init=conv_init, dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv")(x)
    return layers.batch_norm(train, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="bn")(x)


class PatchEmbed(nn.Module):
  """Stem: 3x3 convs of strides 2, 1, 2, 1 (widths C/2, C/2, C, C), BatchNorm, GELU."""
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    widths = (self.dim // 2, self.dim // 2, self.dim, self.dim)
    for i, (width, stride) in enumerate(zip(widths, (2, 1, 2, 1))):
      if i:
        x = layers.gelu(x)
      x = nn.Conv(width, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                  kernel_init=conv_init, dtype=self.dtype, param_dtype=self.param_dtype,
                  name=f"conv_{i}")(x)
      x = layers.batch_norm(train, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=f"bn_{i}")(x)
    return x


class Stage(nn.Module):
  """Downsampling (3x3 stride-2 conv + BatchNorm, all stages but the first), blocks."""
  dim: int
  depth: int
  downsample: bool
  num_heads: int
  mlp_ratio: float
  initial_value: float
  heads_range: float
  decomposed: bool
  layer_scale: Optional[float]
  drop_path_rates: Sequence[float]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.downsample:
      x = ConvBN(self.dim, 2, name="downsample", **kw)(x, train=train)
    for j in range(self.depth):
      x = RMTBlock(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                   initial_value=self.initial_value, heads_range=self.heads_range,
                   decomposed=self.decomposed, layer_scale=self.layer_scale,
                   drop_path_rate=self.drop_path_rates[j], name=f"blocks_{j}", **kw)(
                       x, train=train)
    return x


class RMT(nn.Module):
  """RMT classifier on NHWC images of any size.

  Attributes:
    num_classes: size of the head; 0 returns the pooled features.
    embed_dims, depths, num_heads, mlp_ratios: per stage.
    initial_values, heads_ranges: per stage, the decay ``gamma_h = 1 - 2 ** -(a + b h /
      heads)`` with ``a`` the initial value and ``b`` the heads range.
    decomposed: per stage, row-then-column attention (True) or full 2D attention.
    layer_scales: per stage, whether blocks scale their branches (initialised to
      ``layer_scale_init``).
    projection: width of the Linear + BatchNorm before pooling.
    drop_path_rate: stochastic depth of the last block, rising linearly from 0 (the
      official recipes train T/S/B/L with 0.1/0.15/0.4/0.5).
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """
  num_classes: int = 1000
  embed_dims: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 2, 8, 2)
  num_heads: Sequence[int] = (4, 4, 8, 16)
  mlp_ratios: Sequence[float] = (3, 3, 3, 3)
  initial_values: Sequence[float] = (2, 2, 2, 2)
  heads_ranges: Sequence[float] = (4, 4, 6, 6)
  decomposed: Sequence[bool] = (True, True, False, False)
  layer_scales: Sequence[bool] = (False, False, False, False)
  layer_scale_init: float = 1e-6
  projection: int = 1024
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def check_settings(self) -> None:
    num_stages = len(self.depths)
    layers.check_per_stage(self, ("embed_dims", "num_heads", "mlp_ratios",
                                  "initial_values", "heads_ranges", "decomposed",
                                  "layer_scales"), num_stages)
    for i, (dim, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
      if dim % heads or (dim // heads) % 2:
        raise ValueError(
            f"RMT stage {i}: embed_dims[{i}]={dim} must split into num_heads[{i}]={heads} "
            "heads of an even width (the rotary embedding turns pairs of channels)")

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.check_settings()
    layers.check_images(images)

    x = PatchEmbed(self.embed_dims[0], name="patch_embed", **kw)(images.astype(dtype),
                                                                  train=train)
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))
    start = 0
    for i, depth in enumerate(self.depths):
      x = Stage(
          dim=self.embed_dims[i], depth=depth, downsample=i > 0,
          num_heads=self.num_heads[i], mlp_ratio=self.mlp_ratios[i],
          initial_value=self.initial_values[i], heads_range=self.heads_ranges[i],
          decomposed=bool(self.decomposed[i]),
          layer_scale=self.layer_scale_init if self.layer_scales[i] else None,
          drop_path_rates=rates[start:start + depth], name=f"stages_{i}", **kw)(
              x, train=train)
      start += depth
      self.sow("intermediates", f"stage_{i}", x)

    x = layers.Dense(self.projection, kernel_init=dense_init, name="proj", **kw)(x)
    x = layers.batch_norm(train, name="proj_norm", **kw)(x)
    return layers.classifier_head(self, jnp.mean(nn.swish(x), axis=(1, 2)),
                                  self.num_classes, kernel_init=dense_init, **kw)


# ---------------------------------------------------------------- official weights


def check_buffer(state: StateDict, key: str, expected: np.ndarray, what: str) -> None:
  """Official buffers we recompute must equal ours: a mismatch means another config."""
  found = state.take(key)
  if found.shape != expected.shape or not np.allclose(found, expected, rtol=1e-5,
                                                      atol=1e-7):
    raise convert.ConversionError(
        f"{key} does not match the model's {what}: found {np.round(found, 4).tolist()}, "
        f"expected {np.round(expected, 4).tolist()}")


def official_variables(state: StateDict, model: RMT) -> Variables:
  """qhfan/RMT ``classfication_release/RMT.py`` state dict -> params and batch_stats.

  Official names: ``patch_embed.proj.{0,3,6,9}`` (convs) and ``.{1,4,7,10}``
  (BatchNorms), ``layers.{i}.blocks.{j}`` (``pos``, ``retention_layer_norm``,
  ``retention.{q,k,v,out}_proj``, ``retention.lepe``, ``final_layer_norm``,
  ``ffn.fc1``/``dwconv``/``fc2``, ``gamma_1``/``gamma_2``), ``layers.{i}.downsample``
  (``reduction``, ``norm``: the next stage's downsampling here), ``layers.{i}.Relpos``
  (``angle``, ``decay``: recomputed, checked), ``proj``, ``norm``, ``head``.
  """
  params, stats = {}, {}

  def bn(prefix):
    return state.norm(prefix), timm_bn_stats(state, prefix)

  stem, stem_stats = {}, {}
  for k in range(4):
    stem[f"conv_{k}"] = state.conv(f"patch_embed.proj.{3 * k}")
    stem[f"bn_{k}"], stem_stats[f"bn_{k}"] = bn(f"patch_embed.proj.{3 * k + 1}")
  params["patch_embed"], stats["patch_embed"] = stem, stem_stats
  for i, depth in enumerate(model.depths):
    stage, stage_stats, layer = {}, {}, f"layers.{i}"
    if i:
      down = f"layers.{i - 1}.downsample"
      stage["downsample"] = {"conv": state.conv(f"{down}.reduction")}
      stage["downsample"]["bn"], bn_stats = bn(f"{down}.norm")
      stage_stats["downsample"] = {"bn": bn_stats}
    heads = model.num_heads[i]
    check_buffer(state, f"{layer}.Relpos.angle",
                 rotary_angles(model.embed_dims[i] // heads), "rotary frequencies")
    check_buffer(state, f"{layer}.Relpos.decay",
                 decay_rates(heads, model.initial_values[i], model.heads_ranges[i]),
                 f"decay rates (stage {i}: initial_values={model.initial_values[i]}, "
                 f"heads_ranges={model.heads_ranges[i]})")
    for j in range(depth):
      p = f"{layer}.blocks.{j}"
      retention = {name: state.linear(f"{p}.retention.{name}_proj")
                   for name in ("q", "k", "v", "out")}
      retention["lepe"] = state.conv(f"{p}.retention.lepe.conv")
      block = {"cpe": state.conv(f"{p}.pos.conv"),
               "norm1": state.norm(f"{p}.retention_layer_norm"), "retention": retention,
               "norm2": state.norm(f"{p}.final_layer_norm"),
               "ffn": {"fc1": state.linear(f"{p}.ffn.fc1"),
                       "dwconv": state.conv(f"{p}.ffn.dwconv.conv"),
                       "fc2": state.linear(f"{p}.ffn.fc2")}}
      if model.layer_scales[i]:
        for name in ("gamma_1", "gamma_2"):
          block[name] = state.take(f"{p}.{name}").reshape(-1)
      stage[f"blocks_{j}"] = block
    params[f"stages_{i}"] = stage
    if stage_stats:
      stats[f"stages_{i}"] = stage_stats
  params["proj"] = state.linear("proj")
  params["proj_norm"], stats["proj_norm"] = bn("norm")
  if model.num_classes:
    params["head"] = state.linear("head")
  return Variables(params=params, batch_stats=stats)


def variables_from_official(model_name: str,
                            state_dict: Union[Mapping[str, Any], str, os.PathLike], *,
                            strict: bool = True, model: Optional[RMT] = None,
                            **overrides) -> dict:
  """Official RMT weights (mapping or ``.pth``/``.safetensors`` file) -> variables.

  Returns ``{"params": ..., "batch_stats": ...}``, checked name by name and shape by
  shape like ``official.from_official`` (``strict``: raise ``ConversionError`` naming
  every missing, unexpected or mis-shaped key). ``overrides`` go to ``create`` unless
  ``model`` is given.

    variables = rmt.variables_from_official("rmt_small", "RMT-S.pth")
  """
  info = model_info(model_name)
  if info.family != "rmt":
    raise convert.ConversionError(
        f"variables_from_official reads RMT checkpoints; {model_name!r} is a "
        f"{info.family!r} model (see official.from_official)")
  if not isinstance(state_dict, Mapping):
    state_dict = convert.load_state_dict(state_dict)
  model = model if model is not None else create(model_name, **overrides)
  state = StateDict(state_dict)
  variables = dict(official_variables(state, model))
  expected = convert.abstract_variables(model, (1, info.image_size, info.image_size, 3))
  convert.check_against(variables, expected, state.unused(), strict=strict,
                        what=f"official weights for {model_name}")
  return jax.tree.map(jnp.asarray, variables)


@register_official_converter("rmt")
def convert_official_rmt(state: StateDict, model: RMT) -> dict:
  """``official.from_official`` returns parameters alone: RMT needs its statistics too."""
  del state, model
  raise convert.ConversionError(
      "RMT checkpoints also hold BatchNorm statistics (batch_stats): load them with "
      "vit_jax.models.rmt.variables_from_official(name, state_dict)")


def _register_variants():
  for name, config in VARIANTS.items():
    register_variant(name, RMT, config, family="rmt", image_size=224,
                     doc=f"Official RMT ({name}), 224x224.")


_register_variants()
