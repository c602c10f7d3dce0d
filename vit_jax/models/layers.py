"""Building blocks shared by the model families.

Parameter names follow the vision_transformer layout (``query``/``key``/``value``/``out``,
``Dense_0``/``Dense_1``) so that checkpoints of that layout load without renaming.
Tensors are ``[batch, tokens, channels]`` unless a docstring says otherwise; attention
inputs are ``[batch, tokens, heads, head_dim]`` (the layout of
``jax.nn.dot_product_attention`` and of the kernels in ``vit_jax.kernels``).
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.kernels.attention.reference import attention_reference

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
  """
  num_heads: int
  out_features: Optional[int] = None
  qkv_features: Optional[int] = None
  attention_dropout_rate: float = 0.0
  use_bias: bool = True
  qkv_bias: Optional[bool] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  attention_fn: Callable = dot_product_attention

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
      return nn.DenseGeneral(features=(self.num_heads, head_dim), axis=-1,
                             use_bias=qkv_bias, kernel_init=self.kernel_init,
                             dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    query = projection("query")(inputs_q)
    key = projection("key")(inputs_kv)
    value = projection("value")(inputs_kv)

    dropout_fn = None
    if train and self.attention_dropout_rate > 0.0:
      dropout = nn.Dropout(rate=self.attention_dropout_rate)
      dropout_fn = lambda w: dropout(w, deterministic=False)
    if dropout_fn is None:
      out = self.attention_fn(query, key, value, bias=bias, mask=mask)
    else:  # Fused kernels cannot drop attention weights: use the reference.
      out = dot_product_attention(query, key, value, bias=bias, mask=mask,
                                  dropout_fn=dropout_fn)
    return nn.DenseGeneral(features=features, axis=(-2, -1), use_bias=self.use_bias,
                           kernel_init=self.kernel_init, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="out")(out)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout (names ``Dense_0``, ``Dense_1``)."""
  mlp_dim: int
  out_dim: Optional[int] = None
  dropout_rate: float = 0.0
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, *, train: bool = False) -> Array:
    out_dim = self.out_dim or inputs.shape[-1]
    dense = lambda features: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    x = dense(self.mlp_dim)(inputs)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    x = dense(out_dim)(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)


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
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="LayerNorm_0")(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim or 4 * dim,
                     gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="MlpBlock_0")(y)
    return x[:, 0]


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


def check_per_stage(module: Any, fields: Sequence[str], num_stages: int) -> None:
  """Hierarchical models: each per-stage setting needs one entry per stage."""
  for field in fields:
    value = tuple(getattr(module, field))
    if len(value) != num_stages:
      raise ValueError(f"{type(module).__name__}.{field}={value} has {len(value)} entries; "
                       f"the model has {num_stages} stages")


def canonical_dtype(dtype: Any) -> Any:
  """Accept dtype names from configs (``"bfloat16"``) as well as dtype objects."""
  return jnp.dtype(dtype) if isinstance(dtype, str) else dtype


def batch_norm(train: bool, *, scale_init: float = 1.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: Optional[str] = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5) over the last axis.

  Running statistics live in the ``batch_stats`` collection: updated from the batch
  when ``train`` (pass ``mutable=["batch_stats"]``), used as they are otherwise. Under
  ``jax.jit`` with the batch sharded over devices the batch mean and variance are
  taken over the global batch (XLA inserts the cross-device reduction), so
  data-parallel training needs no ``axis_name``. One difference from PyTorch: the
  running variance is updated with the biased batch variance (PyTorch uses n - 1).
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      scale_init=nn.initializers.constant(scale_init),
                      use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                      name=name)


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
    x = nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                strides=(self.strides, self.strides), padding=((pad, pad), (pad, pad)),
                feature_group_count=self.groups, use_bias=False,
                kernel_init=self.kernel_init, dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv")(x)
    return batch_norm(train, scale_init=self.bn_scale_init, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="bn")(x)


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
  """timm's channel rounding: nearest multiple of ``divisor``, not below ``round_limit``."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < round_limit * value else rounded


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation on NHWC maps: mean -> fc1 -> ReLU -> fc2 -> sigmoid gate.

  ``fc1``/``fc2`` are Dense layers (timm's 1x1 convs); the reduced width is
  ``make_divisible(channels * rd_ratio, 8, round_limit=0)`` unless given.
  """
  rd_ratio: float = 1 / 16
  rd_channels: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    rd = self.rd_channels or make_divisible(channels * self.rd_ratio, 8, round_limit=0.0)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(nn.Dense(rd, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="fc1")(s))
    s = nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(s)
    return x * jax.nn.sigmoid(s)


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
    return nn.Dense(self.features, kernel_init=nn.initializers.truncated_normal(0.02),
                    dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(x)
