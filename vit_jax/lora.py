"""LoRA (Hu et al., 2021): low-rank adapters on a model's dense projections.

  model = lora.LoRA(base=models.create("vit_base_patch16_224", num_classes=10),
                    rank=8, alpha=16, targets=lora.VIT_ATTENTION_MLP)
  variables = model.init(key, images)    # the base's parameters + "lora/..."
  merged = lora.merge(variables["params"], model)  # plain base params, for export

``LoRA`` wraps any model without changing it: the base keeps its own parameter names
(the adapters live beside them as ``lora__<module path, "__"-joined>__{a,b}``), and every
``nn.Dense``/``nn.DenseGeneral`` whose path matches ``targets`` computes
``y = x W + b + (alpha / rank) * (x A) B`` -- the adapter path is a real second
branch, intercepted at call time (``nn.intercept_methods``). ``A`` starts random,
``B`` at zero, so a fresh LoRA model computes exactly what its base does.

Training only the adapters and the head is the trainer's freeze rule
(``config.lora``: everything but the ``lora__`` adapters and the head is frozen).
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import tree

# Attention projections and the MLP of the ViT layout (any family using the shared
# layers has the same names).
VIT_ATTENTION = r"MultiHeadDotProductAttention_\d+/(query|key|value|out)$"
VIT_ATTENTION_MLP = VIT_ATTENTION + r"|MlpBlock_\d+/Dense_\d+$"


def _dense_axes(module: nn.Module, kernel_shape: tuple) -> tuple[int, int]:
  """(input axes, output axes) of a Dense/DenseGeneral kernel."""
  features = module.features
  n_out = len(features) if isinstance(features, (tuple, list)) else 1
  return len(kernel_shape) - n_out, n_out


class LoRA(nn.Module):
  """``base`` with rank-``rank`` adapters on the dense layers matching ``targets``."""
  base: nn.Module
  rank: int = 8
  alpha: float = 16.0
  targets: str = VIT_ATTENTION_MLP

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    # The base's parameters keep their names: it shares this module's scope.
    nn.share_scope(self, self.base)
    if getattr(self.base, "scan_layers", False):
      raise ValueError("LoRA needs unscanned blocks (scan_layers=False)")
    pattern = re.compile(self.targets)
    matched = []

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if (context.method_name != "__call__" or
          not isinstance(module, (nn.Dense, nn.DenseGeneral)) or module.scope is None):
        return next_fun(*args, **kwargs)
      path = "/".join(module.path)
      if not pattern.search(path):
        return next_fun(*args, **kwargs)
      y = next_fun(*args, **kwargs)
      kernel = module.variables["params"]["kernel"]
      n_in, n_out = _dense_axes(module, kernel.shape)
      d_in = int(np.prod(kernel.shape[:n_in]))
      d_out = int(np.prod(kernel.shape[n_in:]))
      a = self.param(f"lora/{path}/a".replace("/", "__"),
                     nn.initializers.normal(1.0 / self.rank), (d_in, self.rank),
                     kernel.dtype)
      b = self.param(f"lora/{path}/b".replace("/", "__"), nn.initializers.zeros,
                     (self.rank, d_out), kernel.dtype)
      x = args[0]
      lead = x.shape[:x.ndim - n_in]
      low = x.reshape(lead + (d_in,)).astype(y.dtype) @ a.astype(y.dtype)
      delta = (low @ b.astype(y.dtype)) * self.scale
      matched.append(path)
      return y + delta.reshape(lead + kernel.shape[n_in:])

    with nn.intercept_methods(interceptor):
      out = self.base(images, train=train)
    if not matched:
      raise ValueError(f"LoRA targets {self.targets!r} match no dense layer of "
                       f"{type(self.base).__name__}")
    return out


def _split_name(name: str) -> tuple[str, str]:
  """``lora__Transformer__...__query__a`` -> (``Transformer/.../query``, ``a``)."""
  parts = name.split("__")
  return "/".join(parts[1:-1]), parts[-1]


def adapters(params: dict) -> dict[str, dict[str, Any]]:
  """``{module path: {"a": A, "b": B}}`` of the LoRA parameters in ``params``."""
  out: dict = {}
  for name, value in params.items():
    if name.startswith("lora__"):
      path, which = _split_name(name)
      out.setdefault(path, {})[which] = value
  return out


def base_params(params: dict) -> dict:
  return {k: v for k, v in params.items() if not k.startswith("lora__")}


def merge(params: dict, model: LoRA) -> dict:
  """Base parameters with ``W += scale * A B`` folded in (no adapters left)."""
  flat = tree.flatten(base_params(params))
  for path, ab in adapters(params).items():
    kernel = flat[f"{path}/kernel"]
    delta = (jnp.asarray(ab["a"], jnp.float32) @ jnp.asarray(ab["b"], jnp.float32)
             ) * model.scale
    flat[f"{path}/kernel"] = (jnp.asarray(kernel, jnp.float32) + delta.reshape(
        kernel.shape)).astype(kernel.dtype)
  return tree.unflatten(flat)


def trainable_fraction(params: Any, trainable_mask: Any) -> tuple[int, int]:
  """(trainable parameter count, total parameter count)."""
  sizes = jax.tree.leaves(jax.tree.map(lambda x: int(np.prod(x.shape)), params))
  flags = jax.tree.leaves(trainable_mask)
  return sum(s for s, f in zip(sizes, flags) if f), sum(sizes)
