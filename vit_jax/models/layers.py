"""Building blocks shared by the model families.

Parameter names follow the vision_transformer layout (``query``/``key``/``value``/``out``,
``Dense_0``/``Dense_1``) so that checkpoints of that layout load without renaming.
Tensors are ``[batch, tokens, channels]`` unless a docstring says otherwise; attention
inputs are ``[batch, tokens, heads, head_dim]`` (the layout of
``jax.nn.dot_product_attention`` and of the kernels in ``vit_jax.kernels``).
"""

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.kernels.attention.reference import attention_reference
from vit_jax.models import linear
from vit_jax.models.depthwise import DepthwiseConv, depthwise_conv  # noqa: F401
from vit_jax.models.linear import Dense, DenseGeneral  # noqa: F401
from vit_jax.models.norms import GroupNorm, LayerNorm, normalize  # noqa: F401

Dtype = Any
Array = jax.Array


# The specification of global attention lives beside its kernels; the layers use it.
dot_product_attention = attention_reference


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with vision_transformer parameter names and shapes.

  ``query``/``key``/``value`` kernels are ``[dim, heads, head_dim]``; ``out`` is
  ``[heads, head_dim, dim]``. The attention core is swappable (``attention_fn``) so
  that fused kernels can replace the reference without touching parameters.
  ``qkv_bias`` (default: ``use_bias``) drops only the query/key/value biases, as in
  the many timm models built with ``qkv_bias=False`` and a biased output projection.
  ``qk_norm`` normalises queries and keys per head (LayerNorm over ``head_dim``,
  scale only: ``query_ln``/``key_ln``, Flax's ``normalize_qk``), as ViT-22B and
  vmoe's Soft MoE models do. ``gate`` multiplies each head's output by a sigmoid gate
  computed from the query token (``gate/{kernel,bias}``, ``[dim, heads]``): gated
  attention of Bondarenko et al. 2023 ("Quantizable Transformers"), which lets a head
  do nothing without pushing its softmax to outliers.
  """
  num_heads: int
  out_features: Optional[int] = None
  qkv_features: Optional[int] = None
  attention_dropout_rate: float = 0.0
  use_bias: bool = True
  qkv_bias: Optional[bool] = None
  qk_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  attention_fn: Callable = dot_product_attention
  gate: bool = False

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array] = None, *,
               bias: Optional[Array] = None, mask: Optional[Array] = None,
               train: bool = False) -> Array:
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    features = self.out_features or inputs_q.shape[-1]
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    if qkv_features % self.num_heads:
      raise ValueError(f"attention width {qkv_features} is not divisible by "
                       f"num_heads={self.num_heads}")
    head_dim = qkv_features // self.num_heads

    qkv_bias = self.use_bias if self.qkv_bias is None else self.qkv_bias

    def projection(name):
      return DenseGeneral(features=(self.num_heads, head_dim), axis=-1,
                          use_bias=qkv_bias, kernel_init=self.kernel_init,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    query = projection("query")(inputs_q)
    key = projection("key")(inputs_kv)
    value = projection("value")(inputs_kv)
    if self.qk_norm:
      norm = lambda name: LayerNorm(use_bias=False, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
      query, key = norm("query_ln")(query), norm("key_ln")(key)

    dropout_fn = None
    if train and self.attention_dropout_rate > 0.0:
      dropout = nn.Dropout(rate=self.attention_dropout_rate)
      dropout_fn = lambda w: dropout(w, deterministic=False)
    if dropout_fn is None:
      out = self.attention_fn(query, key, value, bias=bias, mask=mask)
    else:  # Fused kernels cannot drop attention weights: use the reference.
      out = dot_product_attention(query, key, value, bias=bias, mask=mask,
                                  dropout_fn=dropout_fn)
    if self.gate:  # [batch, q_len, heads]: one gate per token and head
      gate = DenseGeneral(features=self.num_heads, kernel_init=self.kernel_init,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          name="gate")(inputs_q)
      out = out * nn.sigmoid(gate)[..., None].astype(out.dtype)
    return DenseGeneral(features=features, axis=(-2, -1), use_bias=self.use_bias,
                        kernel_init=self.kernel_init, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="out")(out)


class MlpBlock(nn.Module):
  """Dense -> activation -> dropout -> Dense -> dropout (names ``Dense_0``, ``Dense_1``).

  The activation is GELU (``gelu_approximate`` picks the tanh form) unless
  ``activation`` gives another (CvT's QuickGELU).
  """
  mlp_dim: int
  out_dim: Optional[int] = None
  dropout_rate: float = 0.0
  gelu_approximate: bool = False
  activation: Optional[Callable[[Array], Array]] = None
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.normal(stddev=1e-6)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, *, train: bool = False) -> Array:
    out_dim = self.out_dim or inputs.shape[-1]
    dense = lambda features: Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, bias_init=self.bias_init)
    x = dense(self.mlp_dim)(inputs)
    if self.activation is None:
      x = gelu(x, approximate=self.gelu_approximate)
    else:
      x = self.activation(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    x = dense(out_dim)(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)


def gelu(x: Array, approximate: bool = False) -> Array:
  """GELU; the exact form as torch computes it, ``x/2 * (1 + erf(x/sqrt(2)))``.

  ``jax.nn.gelu(approximate=False)`` goes through ``erfc``, which XLA:CPU expands into
  a much longer polynomial than ``erf``: on ``[8,56,56,256]`` (PVT v2's MLP), forward
  3.4 -> 1.4 ms and forward+backward 5.4 -> 3.5 ms on the 2-core machine, values within
  1e-6 (``python -m vit_jax.tools.layers_ab --layers --swap=gelu``). Whole steps gain
  less (``--model=M --swap=gelu``): train 1.01-1.03x (ViT-Ti, PVT v2-b0, GC ViT-XXT),
  PVT v2-b0 inference 0.93x. ``approximate=True`` is the tanh form (``jax.nn.gelu``'s
  default, note: not this function's).
  """
  if approximate:
    return nn.gelu(x, approximate=True)
  return outside_product_fusion(exact_gelu(x))


def _exact_gelu(x: Array) -> Array:
  return x * 0.5 * (1 + jax.lax.erf(x * 0.7071067811865476))


@jax.custom_jvp
def exact_gelu(x: Array) -> Array:
  """``x/2 * (1 + erf(x/sqrt(2)))`` whose derivative is written out: ``cdf + x * pdf``.

  Differentiated automatically, XLA keeps both factors of the product and takes erf's
  derivative ``exp(-u**2)`` at its highest accuracy (a split square and a correction
  polynomial): ViT-Ti's GELU backward was 8% of its train step on the 2-core CPU. Written
  out, the forward computes the derivative beside the value and the backward is one
  product; gradients within 1.2e-7 of ``jax.nn.gelu``'s on [-17, 17]. Train steps, one
  process, interleaved (``python -m vit_jax.tools.layers_ab --model=M --mode=train
  --swap=gelu_derivative``, 2-core Intel Xeon): ViT-Ti 1.01x, PVT v2-b0 1.03x, Swin-T
  1.01x, GC ViT-XXT 1.01x (an earlier scratch run 1.03x / 1.05x / 1.03x / 1.02x);
  inference unchanged.
  """
  return _exact_gelu(x)


@exact_gelu.defjvp
def _exact_gelu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  cdf = 0.5 * (1 + jax.lax.erf(x * 0.7071067811865476))
  pdf = jnp.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)
  return x * cdf, t * (cdf + x * pdf)


def outside_product_fusion(y: Array) -> Array:
  """``y``, kept out of the fusion of the matrix product that consumes it, on CPU.

  XLA:CPU folds an elementwise function into the YNNPACK fusion of the next product
  (GELU after a depthwise convolution, in front of PVT v2's or GC ViT's second MLP
  layer; after ViT's first layer at batch 32) and hands it the function's scalar
  constants as full-size operands, written out every step: in PVT v2-b0's inference
  six broadcasts of ``[8,56,56,256]`` and ``[8,28,28,512]`` took 30% of the op time.
  (MetaFormer's StarReLU: its ``relu``'s 0.) The barrier leaves the function a loop
  fusion of its own. Measured on a 2-core Intel Xeon, one process, interleaved
  (``python -m vit_jax.tools.layers_ab --model=M --swap=fusion_barrier``;
  docs/benchmarks.md): inference PVT v2-b0 1.33x, PVT v2-b1 1.21x, GC ViT-XXT 1.10x,
  PoolFormer v2-S12 1.07x, ConvFormer-S18 1.05x, ViT-Ti 0.98x at batch 8 and 1.10x at
  batch 32; train steps 0.99-1.01x. GPUs and TPUs fuse differently and were not
  measured, so they do not take it.
  """
  if jax.default_backend() != "cpu":
    return y
  return jax.lax.optimization_barrier(y)


def quick_gelu(x: Array) -> Array:
  """``x * sigmoid(1.702 x)``, the GELU approximation of OpenAI's CLIP and CvT."""
  return x * nn.sigmoid(1.702 * x)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example while training.

  ``rate`` may be a traced scalar (blocks scanned with ``nn.scan`` get theirs as a
  per-layer input).
  """
  rate: Any = 0.0

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    if not train or (isinstance(self.rate, (int, float)) and self.rate == 0.0):
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def stochastic_depth_rates(rate: float, depth: int) -> list[float]:
  """Per-block drop-path rates rising linearly from 0 to ``rate`` (timm's schedule)."""
  return [float(r) for r in np.linspace(0.0, rate, depth)] if depth else []


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""
  num_heads: int
  mlp_dim: Optional[int] = None
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    """``mask``: optional ``[batch, tokens]`` booleans, False for tokens to ignore."""
    batch, _, dim = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, dim),
                       self.param_dtype)
    probe = jnp.tile(probe.astype(self.dtype), [batch, 1, 1])
    if mask is not None:
      mask = mask[:, None, None, :]
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        name="MultiHeadDotProductAttention_0")(probe, x, mask=mask)
    y = LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="LayerNorm_0")(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim or 4 * dim,
                     gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="MlpBlock_0")(y)
    return x[:, 0]


def head_init(zero: bool) -> Callable:
  """Kernel init of a classifier: zeros (vision_transformer's fine-tuning default) or
  LeCun normal."""
  return nn.initializers.zeros if zero else nn.initializers.lecun_normal()


def classifier_head(module: nn.Module, features: Array, num_classes: int, *,
                    kernel_init: Callable = nn.initializers.lecun_normal(),
                    use_bias: bool = True, dtype: Dtype = jnp.float32,
                    param_dtype: Dtype = jnp.float32, name: str = "head") -> Array:
  """The linear classifier every family ends with, created in ``module``'s scope.

  Call it from a compact method: it sows ``features`` (the pooled head input) into
  ``intermediates`` and returns float32 logits from a Dense named ``name`` (so the
  parameters read ``head/kernel``), or the float32 features when ``num_classes`` is
  0 (a headless model, as timm's ``num_classes=0``).
  """
  module.sow("intermediates", "features", features)
  if not num_classes:
    return features.astype(jnp.float32)
  logits = Dense(num_classes, use_bias=use_bias, kernel_init=kernel_init, dtype=dtype,
                 param_dtype=param_dtype, name=name)(features)
  return logits.astype(jnp.float32)


def posemb_sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.,
                     dtype: Dtype = jnp.float32) -> Array:
  """Fixed 2D sine-cosine position embedding, ``[1, height*width, dim]``.

  The channels are split in four quarters: sin(x), cos(x), sin(y), cos(y), with
  frequencies ``temperature ** -(i / (dim/4))`` as in MoCo v3 and big_vision.
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
  y, x = np.mgrid[:height, :width]
  omega = 1.0 / (temperature ** (np.arange(dim // 4) / (dim // 4)))
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  emb = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(emb[None], dtype)


def to_2tuple(size: Union[int, Sequence[int]]) -> tuple[int, int]:
  """``224 -> (224, 224)``; a pair stays a pair (image sizes, windows, strides)."""
  return (size, size) if isinstance(size, int) else tuple(size)


def relative_position_index(window: tuple[int, int]) -> np.ndarray:
  """``[P, P]`` indices into a ``[(2h-1)(2w-1), heads]`` table (Swin's layout).

  Entry ``(p, q)`` encodes the offset of query ``p`` from key ``q``:
  ``(dy + h - 1) * (2w - 1) + (dx + w - 1)`` with ``dy, dx = p - q`` in window rows and
  columns.
  """
  h, w = window
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  dy = rows[:, None] - rows[None, :] + h - 1
  dx = cols[:, None] - cols[None, :] + w - 1
  return dy * (2 * w - 1) + dx


class RelativePositionBias(nn.Module):
  """A learned bias per head and relative offset inside a window: ``[heads, P, P]``.

  ``layout="swin"`` (Swin, GC ViT): a ``[(2h-1)(2w-1), heads]`` table indexed by the
  query-minus-key offset (``relative_position_index``), truncated-normal init.
  ``layout="tf"`` (the official MaxViT): a ``[heads, 2h-1, 2w-1]`` table indexed by
  the key-minus-query offset, normal init. Both hold the parameter
  ``relative_position_bias_table``.
  """
  window: tuple[int, int]
  num_heads: int
  param_dtype: Dtype = jnp.float32
  layout: str = "swin"

  @nn.compact
  def __call__(self) -> Array:
    h, w = self.window
    if self.layout == "swin":
      table = self.param("relative_position_bias_table",
                         nn.initializers.truncated_normal(stddev=0.02),
                         ((2 * h - 1) * (2 * w - 1), self.num_heads), self.param_dtype)
      return jnp.transpose(table[relative_position_index(self.window)], (2, 0, 1))
    if self.layout == "tf":
      table = self.param("relative_position_bias_table", nn.initializers.normal(0.02),
                         (self.num_heads, 2 * h - 1, 2 * w - 1), self.param_dtype)
      rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
      rows, cols = rows.reshape(-1), cols.reshape(-1)
      dy = rows[None, :] - rows[:, None] + h - 1  # [query, key]
      dx = cols[None, :] - cols[:, None] + w - 1
      return table[:, dy, dx]
    raise ValueError(f"relative position bias layout must be 'swin' or 'tf', got "
                     f"{self.layout!r}")


def check_per_stage(module: Any, fields: Sequence[str], num_stages: int) -> None:
  """Hierarchical models: each per-stage setting needs one entry per stage."""
  for field in fields:
    per_stage(module, field, num_stages, broadcast=False)


def per_stage(module: Any, field: str, num_stages: int, *, broadcast: bool = True
              ) -> tuple:
  """A per-stage setting as a tuple of ``num_stages`` entries.

  With ``broadcast``, a single value (not a list or tuple) stands for every stage.
  A sequence of another length is a ValueError naming the setting.
  """
  value = getattr(module, field)
  if broadcast and not isinstance(value, (list, tuple)):
    return (value,) * num_stages
  value = tuple(value)
  if len(value) != num_stages:
    raise ValueError(f"{type(module).__name__}.{field}={value} has {len(value)} entries; "
                     f"the model has {num_stages} stages")
  return value


def check_images(images: Array) -> None:
  """Image models take NHWC batches; anything else is an error naming the shape."""
  if images.ndim != 4:
    raise ValueError(f"expected NHWC images, got shape {images.shape}")


def canonical_dtype(dtype: Any) -> Any:
  """Accept dtype names from configs (``"bfloat16"``) as well as dtype objects."""
  return jnp.dtype(dtype) if isinstance(dtype, str) else dtype


def batch_norm(train: bool, *, epsilon: float = 1e-5, scale_init: float = 1.0,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: Optional[str] = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5) over the last axis.

  Running statistics live in the ``batch_stats`` collection: updated from the batch
  when ``train`` (pass ``mutable=["batch_stats"]``), used as they are otherwise. Under
  ``jax.jit`` with the batch sharded over devices the batch mean and variance are
  taken over the global batch (XLA inserts the cross-device reduction), so
  data-parallel training needs no ``axis_name``. One difference from PyTorch: the
  running variance is updated with the biased batch variance (PyTorch uses n - 1).
  Variances are computed in two passes (``use_fast_variance=False``), as PyTorch
  does: the one-pass ``E[x^2] - E[x]^2`` loses precision on maps with a large mean.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon,
                      scale_init=nn.initializers.constant(scale_init),
                      use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                      name=name)


class ConvEmbed(nn.Module):
  """Patch or token embedding on NHWC maps: a strided conv, then LayerNorm.

  ``padding`` pixels on every side (0 with ``kernel_size == stride``: non-overlapping
  patches). Parameters ``{conv_name}/{kernel,bias}`` and ``norm/{scale,bias}``: PVT,
  PVT v2 and CSWin call the conv ``proj`` (timm's), CvT ``conv`` (the official code's).
  """
  features: int
  kernel_size: int
  stride: int
  padding: int = 0
  conv_name: str = "proj"
  kernel_init: Callable = nn.initializers.lecun_normal()  # Flax's Conv default
  norm_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, s, p = self.kernel_size, self.stride, self.padding
    x = nn.Conv(self.features, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                kernel_init=self.kernel_init, dtype=self.dtype,
                param_dtype=self.param_dtype, name=self.conv_name)(x)
    return LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="norm")(x)


class Conv(nn.Conv):
  """``nn.Conv`` (same attributes, parameters and initialisation) whose 1x1 convolutions,
  grouped or not, run as matrix products.

  A 1x1 convolution is a matrix product over channels, but XLA:CPU lowers its weight
  gradient as a convolution with both operands transposed: 2-3x slower than the product
  at the pointwise shapes of EfficientViT/MaxViT, and for grouped 1x1 convolutions
  (EfficientViT's multi-scale aggregation) about 100x (measured on this 2-core machine,
  batch 8: ``[8,14,14,768]``, 48 groups, forward+backward 1,900 ms as a convolution,
  8 ms as a batched product). Every other kernel size goes to ``nn.Conv``.
  """

  def _pointwise(self) -> bool:
    ones = lambda v: v is None or all(i == 1 for i in (  # noqa: E731
        (v,) if isinstance(v, int) else v))
    padding = self.padding
    zero_pad = (padding in ("SAME", "VALID") or padding == 0 or (
        not isinstance(padding, (str, int)) and all(
            p == 0 or p == (0, 0) for p in padding)))
    return (ones(self.kernel_size) and ones(self.strides) and ones(self.input_dilation)
            and zero_pad and self.mask is None and self.shared_weights)

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    if not self._pointwise():
      return super().__call__(inputs)
    ndim = len(self.kernel_size) if not isinstance(self.kernel_size, int) else 1
    groups, in_features = self.feature_group_count, inputs.shape[-1]
    if in_features % groups or self.features % groups:
      raise ValueError(f"{self.name}: {in_features} input and {self.features} output "
                       f"channels are not divisible by feature_group_count={groups}")
    kernel = self.param("kernel", self.kernel_init,
                        (1,) * ndim + (in_features // groups, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    kernel = kernel.reshape(kernel.shape[-2:])
    if groups == 1:
      y = linear.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                             precision=self.precision)
    else:  # output channels are grouped major: [groups, features / groups]
      # One leading axis: the weight gradient then contracts one axis (see linear.py).
      x = inputs.reshape(-1, groups, in_features // groups)
      w = kernel.reshape(kernel.shape[0], groups, -1).transpose(1, 0, 2)
      y = jnp.einsum("ngi,gio->ngo", x, w, precision=self.precision)
      y = y.reshape(inputs.shape[:-1] + (self.features,))
    return y if bias is None else y + bias


def grouped_conv(features: int, kernel_size: int, in_features: int, groups: int,
                 **kwargs) -> nn.Module:
  """``Conv`` with ``feature_group_count=groups``, or ``DepthwiseConv`` (the same
  parameters) when it is depthwise (one group per channel, width kept)."""
  if groups == in_features == features:
    return DepthwiseConv(features, (kernel_size, kernel_size), **kwargs)
  return Conv(features, (kernel_size, kernel_size), feature_group_count=groups, **kwargs)


class ConvBN(nn.Module):
  """Bias-free conv followed by BatchNorm (timm's ``ConvNorm``/``Conv2d_BN``), NHWC.

  Kept as two separate operations in eval as well: folding the BatchNorm into the
  conv would change the numerics (and the parameters) relative to the reference.
  ``bn_scale_init=0`` starts a residual branch at zero, as the references do.
  """
  features: int
  kernel_size: int = 1
  strides: int = 1
  groups: int = 1
  bn_scale_init: float = 1.0
  # PyTorch's default conv init (uniform, bound 1/sqrt(fan_in)), which the references keep.
  kernel_init: Callable = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    pad = self.kernel_size // 2
    x = grouped_conv(self.features, self.kernel_size, x.shape[-1], self.groups,
                     strides=(self.strides, self.strides),
                     padding=((pad, pad), (pad, pad)), use_bias=False,
                     kernel_init=self.kernel_init, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="conv")(x)
    return batch_norm(train, scale_init=self.bn_scale_init, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="bn")(x)


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
  """timm's channel rounding: nearest multiple of ``divisor``, not below ``round_limit``."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < round_limit * value else rounded


def squeeze_excite(x: Array, rd_channels: int, *, act: Callable[[Array], Array] = nn.relu,
                   use_bias: bool = True, conv_kernels: bool = False,
                   names: tuple[str, str] = ("fc1", "fc2"), dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32) -> Array:
  """Squeeze-and-excitation on an NHWC map: mean -> fc1 -> act -> fc2 -> sigmoid gate.

  Creates its two layers in the calling module's scope (call it from a compact
  method), named ``names``: ``SqueezeExcite`` puts them in a child ``se``, GC ViT's
  MBConv keeps them beside its convolutions. ``conv_kernels`` stores them as 1x1
  convolutions (``[1, 1, in, out]`` kernels, the official TF layout) instead of Dense
  ``[in, out]``; both compute the same.
  """
  kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
  layer = ((lambda features, name: Conv(features, (1, 1), name=name, **kw))
           if conv_kernels else (lambda features, name: Dense(features, name=name, **kw)))
  s = jnp.mean(x, axis=(1, 2), keepdims=True)
  s = layer(x.shape[-1], names[1])(act(layer(rd_channels, names[0])(s)))
  return x * jax.nn.sigmoid(s)


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation (``squeeze_excite``) as a module with ``fc1``/``fc2``.

  The reduced width is ``rd_channels``, or ``make_divisible(channels * rd_ratio, 8,
  round_limit=0)`` (timm's rule).
  """
  rd_ratio: float = 1 / 16
  rd_channels: Optional[int] = None
  act: Callable[[Array], Array] = nn.relu
  use_bias: bool = True
  conv_kernels: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    rd = self.rd_channels or make_divisible(x.shape[-1] * self.rd_ratio, 8, round_limit=0.0)
    return squeeze_excite(x, rd, act=self.act, use_bias=self.use_bias,
                          conv_kernels=self.conv_kernels, dtype=self.dtype,
                          param_dtype=self.param_dtype)


class NormLinear(nn.Module):
  """BatchNorm -> dropout -> Dense: the classifier of LeViT-style models."""
  features: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    x = batch_norm(train, dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return Dense(self.features, kernel_init=nn.initializers.truncated_normal(0.02),
                 dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(x)


# ---------------------------------------------------------------- timm layouts

# timm's attention Linears -> our projections, in the order their rows hold them.
FUSED_QKV = {"qkv": ("query", "key", "value")}  # timm Attention
Q_KV = {"q": ("query",), "kv": ("key", "value")}  # attention pooling, PVT's SRA
QK_V = {"qk": ("query", "key"), "v": ("value",)}  # TNT
SEPARATE_QKV = {"wq": ("query",), "wk": ("key",), "wv": ("value",)}  # CrossViT fusion


def timm_attention_params(state: Any, prefix: str, num_heads: int, *,
                          linears: Mapping[str, Sequence[str]] = FUSED_QKV,
                          qkv_bias: bool = True, out: str = "proj",
                          out_bias: bool = True) -> dict:
  """timm attention Linears under ``prefix`` -> ``MultiHeadDotProductAttention`` params.

  ``state`` is a ``convert.StateDict``. ``linears`` names each timm Linear and the
  projections its output rows hold (``FUSED_QKV``, ``Q_KV``, ``QK_V``,
  ``SEPARATE_QKV``, or e.g. ``{"qkv": ("key", "value")}`` for GC ViT's global
  blocks); ``out`` is the output projection. Kernels become ``[dim, heads, head_dim]``
  and ``[heads, head_dim, dim]``.
  """
  params = {}
  for linear, names in linears.items():
    weights = np.split(state.take(f"{prefix}.{linear}.weight"), len(names), axis=0)
    biases = (np.split(state.take(f"{prefix}.{linear}.bias"), len(names)) if qkv_bias
              else [None] * len(names))
    for name, w, b in zip(names, weights, biases):
      params[name] = {"kernel": w.T.reshape(w.shape[1], num_heads, -1)}
      if b is not None:
        params[name]["bias"] = b.reshape(num_heads, -1)
  proj = state.take(f"{prefix}.{out}.weight")
  params["out"] = {"kernel": proj.T.reshape(num_heads, -1, proj.shape[0])}
  if out_bias:
    params["out"]["bias"] = state.take(f"{prefix}.{out}.bias")
  return params


def timm_mlp_params(state: Any, prefix: str, fc1: str = "fc1", fc2: str = "fc2") -> dict:
  """timm ``Mlp`` (``fc1``, ``fc2`` Linears) -> ``MlpBlock`` params."""
  return {"Dense_0": state.linear(f"{prefix}.{fc1}"),
          "Dense_1": state.linear(f"{prefix}.{fc2}")}
