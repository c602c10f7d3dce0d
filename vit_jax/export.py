"""Exporting our weights for other tools: ``.npz`` and timm-named ``.safetensors``.

  export.to_npz(params, "vit.npz")                       # vision_transformer layout
  export.to_safetensors("vit_base_patch16_224", params, "vit.safetensors")  # timm names

The ``.npz`` holds every parameter under its ``/``-joined name, which for a ViT is the
vision_transformer layout that its colabs, big_vision tools and timm's ``.npz``
loader (``timm.models.vision_transformer._load_weights``) read. Scanned block
parameters are unstacked first, so the file is the same whatever ``scan_layers`` was.

``.safetensors`` uses timm's state-dict names through a per-family exporter
(``@register_timm_exporter(family)``, the inverse of the family's timm converter);
the ViT family has one here. A merged LoRA model (``vit_jax.lora.merge``) exports
like any other.
"""

import io
from typing import Any, Callable, Mapping

import numpy as np
from etils import epath

from vit_jax import tree
from vit_jax.models import registry, vit


def _numpy_tree(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  flat = tree.flatten(vit.unstack_block_params(params))
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def to_npz(params: Mapping[str, Any], path: str) -> None:
  """Writes params as a flat ``.npz`` (``Transformer/encoderblock_0/...`` for a ViT)
  to any path etils.epath writes (gs:// too)."""
  buffer = io.BytesIO()  # np.savez seeks, which remote file objects may not
  np.savez(buffer, **_numpy_tree(params))
  epath.Path(path).write_bytes(buffer.getvalue())


_TIMM_EXPORTERS: dict[str, Callable[[dict, Any], dict]] = {}


def register_timm_exporter(family: str):
  def decorator(fn):
    _TIMM_EXPORTERS[family] = fn
    return fn
  return decorator


def to_timm_state_dict(model_name: str, params: Mapping[str, Any], **overrides
                       ) -> dict[str, np.ndarray]:
  """timm state-dict arrays (torch layouts) for a registered model's params."""
  family = registry.model_info(model_name).family
  if family not in _TIMM_EXPORTERS:
    raise ValueError(f"no timm exporter for the {family!r} family (have: "
                     f"{sorted(_TIMM_EXPORTERS)}); .npz export works for every model")
  model = registry.create(model_name, **overrides)
  flat = _numpy_tree(params)
  out = _TIMM_EXPORTERS[family](flat, model)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def to_safetensors(model_name: str, params: Mapping[str, Any], path: str,
                   **overrides) -> None:
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  epath.Path(path).write_bytes(save(to_timm_state_dict(model_name, params, **overrides)))


class _Reader:
  """Takes flat params by name; complains about any left unread (nothing is lost)."""

  def __init__(self, flat: dict[str, np.ndarray]):
    self.flat, self.used = flat, set()

  def __call__(self, name: str) -> np.ndarray:
    if name not in self.flat:
      raise ValueError(f"params have no entry {name!r}")
    self.used.add(name)
    return self.flat[name]

  def linear(self, prefix: str) -> dict:
    return {"weight": self(f"{prefix}/kernel").T, "bias": self(f"{prefix}/bias")}

  def check_all_used(self, model_name: str) -> None:
    left = sorted(set(self.flat) - self.used)
    if left:
      raise ValueError(f"the timm exporter for {model_name} has no place for: "
                       f"{', '.join(left)}")


def _attention(r: _Reader, prefix: str) -> dict:
  """query/key/value/out ([D, heads, hd], [heads, hd, D]) -> timm qkv + proj."""
  q, k, v = (r(f"{prefix}/{n}/kernel") for n in ("query", "key", "value"))
  dim = q.shape[0]
  weight = np.concatenate([w.reshape(dim, -1).T for w in (q, k, v)], axis=0)
  bias = np.concatenate([r(f"{prefix}/{n}/bias").reshape(-1)
                         for n in ("query", "key", "value")])
  out = r(f"{prefix}/out/kernel")
  return {"qkv.weight": weight, "qkv.bias": bias,
          "proj.weight": out.reshape(-1, out.shape[-1]).T, "proj.bias": r(f"{prefix}/out/bias")}


@register_timm_exporter("vit")
def export_timm_vit(flat: dict[str, np.ndarray], model: Any) -> dict[str, np.ndarray]:
  """The inverse of ``vit.convert_timm_vit`` (class-token ViTs, timm's default)."""
  if model.classifier != "token" or model.representation_size is not None:
    raise ValueError("timm export covers class-token ViTs without pre_logits; use .npz "
                     "(timm's .npz loader also reads MAP heads)")
  r = _Reader(flat)
  sd = {"cls_token": r("cls"),
        "patch_embed.proj.weight": r("embedding/kernel").transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": r("embedding/bias"),
        "norm.weight": r("Transformer/encoder_norm/scale"),
        "norm.bias": r("Transformer/encoder_norm/bias")}
  if model.posemb == "learn":
    sd["pos_embed"] = r("Transformer/posembed_input/pos_embedding")
  for i in range(model.num_layers):
    p = f"Transformer/encoderblock_{i}"
    sd[f"blocks.{i}.norm1.weight"] = r(f"{p}/LayerNorm_0/scale")
    sd[f"blocks.{i}.norm1.bias"] = r(f"{p}/LayerNorm_0/bias")
    sd[f"blocks.{i}.norm2.weight"] = r(f"{p}/LayerNorm_2/scale")
    sd[f"blocks.{i}.norm2.bias"] = r(f"{p}/LayerNorm_2/bias")
    for k, v in _attention(r, f"{p}/MultiHeadDotProductAttention_1").items():
      sd[f"blocks.{i}.attn.{k}"] = v
    for j, fc in ((0, "fc1"), (1, "fc2")):
      for k, v in r.linear(f"{p}/MlpBlock_3/Dense_{j}").items():
        sd[f"blocks.{i}.mlp.{fc}.{k}"] = v
  if "head/kernel" in flat:
    for k, v in r.linear("head").items():
      sd[f"head.{k}"] = v
  r.check_all_used(model.__class__.__name__)
  return sd
