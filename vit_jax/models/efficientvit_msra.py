"""EfficientViT-M (Liu et al., CVPR 2023, Microsoft): cascaded group attention.

"EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention". Each
block is a sandwich: depthwise conv and FFN, one attention token mixer, depthwise conv
and FFN again, all residual. The attention is local (7x7 windows) and cascaded: head
``h`` attends over its own channel split plus the output of head ``h - 1``, with a
depthwise conv on its queries and a learned relative-position bias per head.

Numerically this matches timm's ``timm.models.efficientvit_msra`` in eval mode
(tests/test_efficientvit_msra.py); every conv + BatchNorm pair stays two operations
(nothing is fused). BatchNorm running statistics live in the ``batch_stats`` collection.

Parameter layout::

  patch_embed_conv{1..4}/{conv,bn}                four 3x3 stride-2 ConvBN, ReLU between
  stages_{i}_downsample/{res1_dw, res1_ffn,       (stages 1 and 2) residual dw conv + FFN,
                         patchmerge, res2_dw,     patch merging (1x1, 3x3/2 dw, SE, 1x1),
                         res2_ffn}                residual dw conv + FFN
  stages_{i}_blocks_{j}/{dw0, ffn0, mixer, dw1, ffn1}
      mixer/attn/{qkvs_{h}, dws_{h}, proj, attention_biases}
  head/{bn,linear}                                BatchNorm + Linear (num_classes > 0)

The attention windows and bias tables are sized from ``image_size`` (as timm does), so
the model takes exactly that input size. Stages sow ``stage_{i}`` (NHWC) and the
pooled features ``features``.
"""

from typing import Any, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import sharding
from vit_jax.models import layers
from vit_jax.models.convert import StateDict, Variables, register_timm_converter
from vit_jax.models.registry import register_variant

Array = Any
PATCH_SIZE = 16  # the stem halves the resolution four times

# Tensor parallelism (see vit_jax.sharding): the FFNs (``ConvMlp``: 1x1 ConvBN,
# ReLU, 1x1 ConvBN, here and in SHViT) split their hidden units over ``mlp``, their
# BatchNorm included (per channel), and end in one all-reduce. Cascaded group
# attention is not split: head h reads head h - 1's output, so the heads run in
# sequence (SHViT's attention has a single head).
PARAM_AXES = (
    (r"ffn\d?/pw1/conv/kernel$", (None, None, "embed", "mlp")),
    (r"ffn\d?/pw1/bn/(scale|bias|mean|var)$", ("mlp",)),
    (r"ffn\d?/pw2/conv/kernel$", (None, None, "mlp", "embed")),
)
sharding.register_param_axes(PARAM_AXES)


class ConvMlp(nn.Module):
  """1x1 ConvBN (to ``hidden_dim``) -> ReLU -> 1x1 ConvBN back; the last BN starts at 0."""
  hidden_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = x.shape[-1]
    x = nn.relu(layers.ConvBN(self.hidden_dim, name="pw1", **kw)(x, train=train))
    return layers.ConvBN(dim, bn_scale_init=0.0, name="pw2", **kw)(x, train=train)


class PatchMerging(nn.Module):
  """Downsampling: 1x1 ConvBN (4x) -> ReLU -> 3x3/2 depthwise ConvBN -> ReLU -> SE -> 1x1."""
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = 4 * x.shape[-1]
    x = nn.relu(layers.ConvBN(hidden, name="conv1", **kw)(x, train=train))
    x = nn.relu(layers.ConvBN(hidden, 3, strides=2, groups=hidden, name="conv2", **kw)(
        x, train=train))
    x = layers.SqueezeExcite(rd_ratio=0.25, name="se", **kw)(x)
    return layers.ConvBN(self.out_dim, name="conv3", **kw)(x, train=train)


def relative_position_index(resolution: int) -> np.ndarray:
  """``[N, N]`` bias-table index of every query/key pair of a ``resolution``^2 window.

  The table is indexed by the absolute offset ``(|dy|, |dx|)``, numbered row-major
  (``|dy| * resolution + |dx|``), which is the order timm's first-seen numbering gives.
  """
  ys, xs = np.divmod(np.arange(resolution * resolution), resolution)
  dy = np.abs(ys[:, None] - ys[None, :])
  dx = np.abs(xs[:, None] - xs[None, :])
  return dy * resolution + dx


class CascadedGroupAttention(nn.Module):
  """Attention over one window, ``[B, ws, ws, C]``; heads see a cascade of splits.

  Head ``h`` takes channel split ``h`` plus the output of head ``h - 1``, projects it to
  query/key/value with a 1x1 ConvBN, runs a depthwise ConvBN (``kernels[h]``) over the
  queries, and attends with a learned bias per relative offset. The heads' outputs are
  concatenated, passed through ReLU and projected back by a 1x1 ConvBN.
  """
  key_dim: int
  num_heads: int
  attn_ratio: float
  resolution: int  # the window side the bias table is built for
  kernels: Sequence[int]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    batch, height, width, dim = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if dim % self.num_heads:
      raise ValueError(f"EfficientViT attention: width {dim} is not divisible by "
                       f"num_heads={self.num_heads}")
    val_dim = int(self.attn_ratio * self.key_dim)
    if val_dim != dim // self.num_heads:
      raise ValueError(f"cascaded heads need value width ({val_dim}) = width / heads "
                       f"({dim // self.num_heads})")
    if len(self.kernels) < self.num_heads:
      raise ValueError(f"need a query kernel size per head ({self.num_heads}), "
                       f"got kernels={tuple(self.kernels)}")
    tokens = height * width
    biases = self.param("attention_biases", nn.initializers.zeros,
                        (self.num_heads, self.resolution * self.resolution),
                        self.param_dtype)
    bias = biases[:, relative_position_index(self.resolution)].astype(jnp.float32)
    splits = jnp.split(x, self.num_heads, axis=-1)
    scale = self.key_dim ** -0.5
    outputs = []
    feat = splits[0]
    for h in range(self.num_heads):
      if h:
        feat = feat + splits[h]
      feat = layers.ConvBN(2 * self.key_dim + val_dim, name=f"qkvs_{h}", **kw)(
          feat, train=train)
      q, k, v = jnp.split(feat, [self.key_dim, 2 * self.key_dim], axis=-1)
      q = layers.ConvBN(self.key_dim, self.kernels[h], groups=self.key_dim,
                        name=f"dws_{h}", **kw)(q, train=train)
      q, k, v = (t.reshape(batch, tokens, -1) for t in (q, k, v))
      logits = jnp.einsum("bnd,bmd->bnm", q * scale, k).astype(jnp.float32) + bias[h]
      weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      feat = jnp.einsum("bnm,bmd->bnd", weights, v).reshape(batch, height, width, val_dim)
      outputs.append(feat)
    x = nn.relu(jnp.concatenate(outputs, axis=-1))
    return layers.ConvBN(dim, bn_scale_init=0.0, name="proj", **kw)(x, train=train)


class LocalWindowAttention(nn.Module):
  """Cascaded group attention inside non-overlapping ``window``^2 windows.

  A map that is not a whole number of windows is zero-padded at the bottom and right
  (the padded positions take part in attention, as in the reference) and cropped back.
  """
  key_dim: int
  num_heads: int
  attn_ratio: float
  window: int
  kernels: Sequence[int]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    attn = CascadedGroupAttention(
        key_dim=self.key_dim, num_heads=self.num_heads, attn_ratio=self.attn_ratio,
        resolution=self.window, kernels=self.kernels, dtype=self.dtype,
        param_dtype=self.param_dtype, name="attn")
    batch, height, width, dim = x.shape
    ws = self.window
    if height == ws and width == ws:
      return attn(x, train=train)
    pad_b, pad_r = (-height) % ws, (-width) % ws
    x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    nh, nw = (height + pad_b) // ws, (width + pad_r) // ws
    x = x.reshape(batch, nh, ws, nw, ws, dim).transpose(0, 1, 3, 2, 4, 5)
    x = attn(x.reshape(batch * nh * nw, ws, ws, dim), train=train)
    x = x.reshape(batch, nh, nw, ws, ws, dim).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, nh * ws, nw * ws, dim)[:, :height, :width]


class EfficientVitBlock(nn.Module):
  """Sandwich block: dw conv, FFN, windowed attention, dw conv, FFN (all residual)."""
  key_dim: int
  num_heads: int
  attn_ratio: float
  window: int
  kernels: Sequence[int]
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = x.shape[-1]
    drop = lambda y: layers.DropPath(self.drop_path_rate)(y, train=train)
    dw = lambda name: layers.ConvBN(dim, 3, groups=dim, bn_scale_init=0.0, name=name, **kw)
    x = x + drop(dw("dw0")(x, train=train))
    x = x + drop(ConvMlp(2 * dim, name="ffn0", **kw)(x, train=train))
    x = x + drop(LocalWindowAttention(
        key_dim=self.key_dim, num_heads=self.num_heads, attn_ratio=self.attn_ratio,
        window=self.window, kernels=self.kernels, name="mixer", **kw)(x, train=train))
    x = x + drop(dw("dw1")(x, train=train))
    return x + drop(ConvMlp(2 * dim, name="ffn1", **kw)(x, train=train))


class Subsample(nn.Module):
  """Stage transition: residual dw conv + FFN, patch merging, residual dw conv + FFN."""
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for prefix in ("res1", "res2"):
      if prefix == "res2":
        x = PatchMerging(self.out_dim, name="patchmerge", **kw)(x, train=train)
      dim = x.shape[-1]
      x = x + layers.ConvBN(dim, 3, groups=dim, name=f"{prefix}_dw", **kw)(x, train=train)
      x = x + ConvMlp(2 * dim, name=f"{prefix}_ffn", **kw)(x, train=train)
    return x


class EfficientVitMsra(nn.Module):
  """EfficientViT-M classifier. NHWC images of ``image_size`` -> float32 logits.

  Attributes:
    image_size: the input size; the attention windows of stage ``i`` are
      ``min(window_sizes[i], stage resolution)`` with the resolution derived from the
      shorter side, as in timm, so the bias tables depend on it.
    embed_dims, key_dims, depths, num_heads, window_sizes: per stage (three stages);
      stages 1 and 2 halve the resolution.
    kernels: depthwise query-conv kernel size per attention head.
    num_classes: 0 returns the pooled features (no head BatchNorm).
    head_dropout_rate: dropout before the classifier; drop_path_rate: stochastic depth
      on the blocks' residual branches, rising linearly over blocks (timm: none).
  """
  num_classes: int = 1000
  image_size: Union[int, Sequence[int]] = 224
  embed_dims: Sequence[int] = (64, 128, 192)
  key_dims: Sequence[int] = (16, 16, 16)
  depths: Sequence[int] = (1, 2, 3)
  num_heads: Sequence[int] = (4, 4, 4)
  window_sizes: Sequence[int] = (7, 7, 7)
  kernels: Sequence[int] = (5, 5, 5, 5)
  head_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def stage_windows(self) -> list[int]:
    """The attention window of each stage for this model's ``image_size``."""
    resolution = min(layers.to_2tuple(self.image_size)) // PATCH_SIZE
    if resolution < 1:
      raise ValueError(f"EfficientViT needs image sides of at least {PATCH_SIZE} pixels; "
                       f"image_size={self.image_size}")
    windows = []
    for i, window in enumerate(self.window_sizes):
      if i:
        resolution = (resolution - 1) // 2 + 1
      windows.append(min(window, resolution))
    return windows

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    layers.check_images(images)
    expected = layers.to_2tuple(self.image_size)
    if tuple(images.shape[1:3]) != expected:
      raise ValueError(
          f"this EfficientViT is built for {expected[0]}x{expected[1]} images (its "
          f"attention windows and bias tables are sized from image_size); got "
          f"{images.shape[1]}x{images.shape[2]}. Create it with "
          f"image_size=({images.shape[1]}, {images.shape[2]}).")
    stages = len(self.embed_dims)
    layers.check_per_stage(self, ("key_dims", "depths", "num_heads", "window_sizes"), stages)
    windows = self.stage_windows()

    dim = self.embed_dims[0]
    x = images.astype(dtype)
    for i, width in enumerate((dim // 8, dim // 4, dim // 2, dim)):
      x = layers.ConvBN(width, 3, strides=2, name=f"patch_embed_conv{i + 1}", **kw)(
          x, train=train)
      if i < 3:
        x = nn.relu(x)
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))
    block = 0
    for i in range(stages):
      dim = self.embed_dims[i]
      if i:
        x = Subsample(dim, name=f"stages_{i}_downsample", **kw)(x, train=train)
      for j in range(self.depths[i]):
        x = EfficientVitBlock(
            key_dim=self.key_dims[i], num_heads=self.num_heads[i],
            attn_ratio=dim / (self.key_dims[i] * self.num_heads[i]), window=windows[i],
            kernels=tuple(self.kernels), drop_path_rate=rates[block],
            name=f"stages_{i}_blocks_{j}", **kw)(x, train=train)
        block += 1
      self.sow("intermediates", f"stage_{i}", x)

    x = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "features", x)
    if not self.num_classes:
      return x.astype(jnp.float32)
    x = layers.NormLinear(self.num_classes, dropout_rate=self.head_dropout_rate,
                          name="head", **kw)(x, train=train)
    return x.astype(jnp.float32)


# ---------------------------------------------------------------- variants (timm names)

VARIANTS = {
    "efficientvit_m0": dict(embed_dims=(64, 128, 192), depths=(1, 2, 3),
                            num_heads=(4, 4, 4), kernels=(5, 5, 5, 5)),
    "efficientvit_m1": dict(embed_dims=(128, 144, 192), depths=(1, 2, 3),
                            num_heads=(2, 3, 3), kernels=(7, 5, 3, 3)),
    "efficientvit_m2": dict(embed_dims=(128, 192, 224), depths=(1, 2, 3),
                            num_heads=(4, 3, 2), kernels=(7, 5, 3, 3)),
    "efficientvit_m3": dict(embed_dims=(128, 240, 320), depths=(1, 2, 3),
                            num_heads=(4, 3, 4), kernels=(5, 5, 5, 5)),
    "efficientvit_m4": dict(embed_dims=(128, 256, 384), depths=(1, 2, 3),
                            num_heads=(4, 4, 4), kernels=(7, 5, 3, 3)),
    "efficientvit_m5": dict(embed_dims=(192, 288, 384), depths=(1, 3, 4),
                            num_heads=(3, 3, 4), kernels=(7, 5, 3, 3)),
}


def _register_variants():
  for name, defaults in VARIANTS.items():
    register_variant(name, EfficientVitMsra, defaults, family="efficientvit_msra",
                     image_size=224,
                     doc=f"timm's {name} at 224x224.")


_register_variants()


# ---------------------------------------------------------------- timm conversion

def timm_conv_bn(state: StateDict, prefix: str, conv: str = "conv") -> tuple[dict, dict]:
  """timm conv + BatchNorm pair -> (params, batch_stats) of a ``layers.ConvBN``.

  ``num_batches_tracked`` carries nothing we use (momentum is fixed) and is skipped.
  """
  params = {"conv": state.conv(f"{prefix}.{conv}", bias=False),
            "bn": state.norm(f"{prefix}.bn")}
  stats = {"bn": timm_bn_stats(state, f"{prefix}.bn")}
  return params, stats


def timm_bn_stats(state: StateDict, prefix: str) -> dict:
  state.skip(lambda k: k == f"{prefix}.num_batches_tracked")
  return {"mean": state.take(f"{prefix}.running_mean"),
          "var": state.take(f"{prefix}.running_var")}


class VariablesBuilder:
  """Collects params and batch_stats side by side under the same module paths."""

  def __init__(self, state: StateDict):
    self.state = state
    self.params: dict = {}
    self.batch_stats: dict = {}

  @staticmethod
  def _put(tree: dict, path: Sequence[str], value: dict) -> None:
    for key in path[:-1]:
      tree = tree.setdefault(key, {})
    tree[path[-1]] = value

  def conv_bn(self, path: Sequence[str], prefix: str, conv: str = "conv") -> None:
    params, stats = timm_conv_bn(self.state, prefix, conv)
    self._put(self.params, path, params)
    self._put(self.batch_stats, path, stats)

  def param(self, path: Sequence[str], value: Any) -> None:
    self._put(self.params, path, value)

  def norm_linear(self, path: Sequence[str], prefix: str, linear: str) -> None:
    self._put(self.params, path, {"bn": self.state.norm(f"{prefix}.bn"),
                                  "linear": self.state.linear(f"{prefix}.{linear}")})
    self._put(self.batch_stats, path, {"bn": timm_bn_stats(self.state, f"{prefix}.bn")})

  def squeeze_excite(self, path: Sequence[str], prefix: str) -> None:
    self._put(self.params, path, {
        name: {"kernel": w.reshape(w.shape[0], w.shape[1]).T,
               "bias": self.state.take(f"{prefix}.{name}.bias")}
        for name, w in ((n, self.state.take(f"{prefix}.{n}.weight")) for n in ("fc1", "fc2"))})

  def variables(self) -> Variables:
    return Variables(params=self.params, batch_stats=self.batch_stats)


@register_timm_converter("efficientvit_msra")
def convert_timm_efficientvit_msra(state: StateDict, model: EfficientVitMsra) -> Variables:
  """timm ``EfficientVitMsra`` state dict -> ``{"params", "batch_stats"}``."""
  out = VariablesBuilder(state)
  for i in range(4):
    out.conv_bn([f"patch_embed_conv{i + 1}"], f"patch_embed.conv{i + 1}")
  for i in range(len(model.embed_dims)):
    if i:
      src, dst = f"stages.{i}.downsample", f"stages_{i}_downsample"
      for res in ("res1", "res2"):
        out.conv_bn([dst, f"{res}_dw"], f"{src}.{res}.0.m")
        out.conv_bn([dst, f"{res}_ffn", "pw1"], f"{src}.{res}.1.m.pw1")
        out.conv_bn([dst, f"{res}_ffn", "pw2"], f"{src}.{res}.1.m.pw2")
      for conv in ("conv1", "conv2", "conv3"):
        out.conv_bn([dst, "patchmerge", conv], f"{src}.patchmerge.{conv}")
      out.squeeze_excite([dst, "patchmerge", "se"], f"{src}.patchmerge.se")
    for j in range(model.depths[i]):
      src, dst = f"stages.{i}.blocks.{j}", f"stages_{i}_blocks_{j}"
      for name in ("dw0", "dw1"):
        out.conv_bn([dst, name], f"{src}.{name}.m")
      for name in ("ffn0", "ffn1"):
        out.conv_bn([dst, name, "pw1"], f"{src}.{name}.m.pw1")
        out.conv_bn([dst, name, "pw2"], f"{src}.{name}.m.pw2")
      attn = f"{src}.mixer.m.attn"
      for h in range(model.num_heads[i]):
        out.conv_bn([dst, "mixer", "attn", f"qkvs_{h}"], f"{attn}.qkvs.{h}")
        out.conv_bn([dst, "mixer", "attn", f"dws_{h}"], f"{attn}.dws.{h}")
      out.conv_bn([dst, "mixer", "attn", "proj"], f"{attn}.proj.1")
      out.param([dst, "mixer", "attn", "attention_biases"],
                state.take(f"{attn}.attention_biases"))
  # A recomputed index buffer, present in state dicts saved by older timm versions.
  state.skip(lambda k: k.endswith("attention_bias_idxs"))
  if model.num_classes:
    out.norm_linear(["head"], "head", "linear")
  return out.variables()
