"""Two-tower image-text models (CLIP, SigLIP): any registered image model + a text tower.

  model = models.create("clip_vit_base_patch32_224")          # open_clip's ViT-B-32
  zimg, ztxt, out = model.apply(variables, images, tokens)     # L2-normalised embeddings
  logits = jnp.exp(out["logit_scale"]) * zimg @ ztxt.T (+ out["logit_bias"])

The image tower is created from the registry by name with ``num_classes=0`` (its
pooled features), the text tower is a ``TextTransformer``; each is followed by a linear
projection to ``embed_dim``. ``logit_scale`` is the learned log-temperature (CLIP:
``log(1/0.07)`` at init, SigLIP: ``log(10)``); ``logit_bias_init`` adds SigLIP's
learned bias (``-10``). Either input may be omitted (``model.apply(v, images=x)``
embeds images only); ``init`` with images only still creates every parameter.

Parameter tree: ``img/...`` (the image model's own layout), ``img_projection``,
``txt/...`` (see ``text.py``), ``txt_projection``, ``logit_scale``, ``logit_bias``.

Named configurations (family ``two_tower``) follow open_clip's ViT-B-32, ViT-B-16 and
ViT-L-14 (GELU, not QuickGELU); ``from_open_clip`` converts their state dicts.
"""

import dataclasses
import difflib
import math
import os
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers
from vit_jax.models import naflex as naflex_lib
from vit_jax.models.convert import ConversionError, StateDict, check_against, load_state_dict
from vit_jax.models.registry import create, model_info, register_model
from vit_jax.models.text import TextTransformer

Array = Any
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0


def l2_normalize(x: Array, axis: int = -1) -> Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-24))


def _text_fields() -> set[str]:
  return {f.name for f in dataclasses.fields(TextTransformer)} - {"parent", "name"}


class TwoTower(nn.Module):
  """Image and text towers with projections into one embedding space.

  Attributes:
    image_model: registered name of the image tower (created with ``num_classes=0``).
    image: overrides for the image tower (``models.create`` settings).
    text: ``TextTransformer`` settings.
    embed_dim: width of the shared embedding space.
    projection_bias: whether the projections have biases (CLIP's have none).
    naflex: the image tower is the NaFlex version of its ViT (``models/naflex.py``,
      SigLIP 2's recipe): images come as the ``naflex`` pp op's dict of patches
      (one image per pack), each near its own aspect ratio.
    logit_scale_init: initial log-temperature.
    logit_bias_init: initial logit bias; None means no bias parameter (CLIP).
    dtype, param_dtype: defaults for both towers unless ``image``/``text`` set them.
  """
  image_model: str = "vit_base_patch32_clip_224"
  image: Optional[Mapping[str, Any]] = None
  text: Optional[Mapping[str, Any]] = None
  embed_dim: int = 512
  projection_bias: bool = False
  naflex: bool = False
  logit_scale_init: float = CLIP_LOGIT_SCALE_INIT
  logit_bias_init: Optional[float] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    dtypes = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    img = create(self.image_model, **{**dtypes, **dict(self.image or {}),
                                      "num_classes": 0})
    self.img = naflex_lib.naflex(img) if self.naflex else img
    text = dict(self.text or {})
    unknown = sorted(set(text) - _text_fields())
    if unknown:
      hints = [f"{k!r}" + (f" (did you mean {', '.join(close)}?)"
                           if (close := difflib.get_close_matches(k, _text_fields(), 3))
                           else "") for k in unknown]
      raise ValueError(f"the text tower has no setting {', '.join(hints)}. Its settings "
                       f"are: {', '.join(sorted(_text_fields()))}.")
    self.txt = TextTransformer(**{**dtypes, **text, "num_classes": 0})
    dense = lambda: layers.Dense(self.embed_dim, use_bias=self.projection_bias,
                                 dtype=layers.canonical_dtype(self.dtype),
                                 param_dtype=layers.canonical_dtype(self.param_dtype))
    self.img_projection = dense()
    self.txt_projection = dense()
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(
        self.logit_scale_init), (), jnp.float32)
    if self.logit_bias_init is not None:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(
          self.logit_bias_init), (), jnp.float32)

  def image_size(self) -> tuple[int, int]:
    size = dict(self.image or {}).get("image_size", model_info(self.image_model).image_size)
    return (size, size) if isinstance(size, int) else tuple(size)

  def __call__(self, images: Optional[Array] = None, texts: Optional[Array] = None, *,
               train: bool = False) -> tuple[Optional[Array], Optional[Array], dict]:
    """Returns ``(zimg, ztxt, out)``: L2-normalised float32 embeddings (or None).

    ``out`` holds ``logit_scale`` (log-temperature), ``logit_bias`` (if any), and the
    unnormalised ``img/embedding``, ``txt/embedding`` and tower ``*/features``.
    """
    if self.is_initializing():  # create both towers whatever init was given
      if images is None and self.naflex:  # one 1x1-patch image: every parameter
        p = self.img.run_patch_size
        images = {"patches": jnp.zeros((1, 1, p * p * 3), jnp.float32),
                  "segment_ids": jnp.ones((1, 1), jnp.int32),
                  "positions": jnp.zeros((1, 1, 2), jnp.int32),
                  "grid_sizes": jnp.ones((1, 1, 2), jnp.int32)}
      elif images is None:
        images = jnp.zeros((1, *self.image_size(), 3), jnp.float32)
      if texts is None:
        texts = jnp.zeros((1, self.txt.context_length), jnp.int32)
    out = {"logit_scale": self.logit_scale}
    if self.logit_bias_init is not None:
      out["logit_bias"] = self.logit_bias
    zimg = ztxt = None
    if images is not None:
      features = self.img(images, train=train)
      if self.naflex:  # [B, K, D] per image slot: one image per pack here
        if features.shape[1] != 1:
          raise ValueError(f"a contrastive NaFlex batch holds one image per pack (the "
                           f"naflex pp op's output); got {features.shape[1]} image "
                           "slots per pack")
        features = features[:, 0]
      embedding = self.img_projection(features).astype(jnp.float32)
      out.update({"img/features": features, "img/embedding": embedding})
      zimg = l2_normalize(embedding)
    if texts is not None:
      features = self.txt(texts, train=train)
      embedding = self.txt_projection(features).astype(jnp.float32)
      out.update({"txt/features": features, "txt/embedding": embedding})
      ztxt = l2_normalize(embedding)
    return zimg, ztxt, out


# ---------------------------------------------------------------- named configurations
# open_clip's model configs (model_configs/ViT-*.json): towers, widths, 77-token context
# and the 49,408-token vocabulary of OpenAI's BPE tokenizer.
_TEXT_BASE = dict(vocab_size=49408, context_length=77, hidden_size=512, num_layers=12,
                  num_heads=8, mlp_dim=2048)
_TEXT_LARGE = dict(_TEXT_BASE, hidden_size=768, num_heads=12, mlp_dim=3072)
NAMED = {
    "clip_vit_base_patch32_224": ("vit_base_patch32_clip_224", _TEXT_BASE, 512),
    "clip_vit_base_patch16_224": ("vit_base_patch16_clip_224", _TEXT_BASE, 512),
    "clip_vit_large_patch14_224": ("vit_large_patch14_clip_224", _TEXT_LARGE, 768),
}


def _register():
  for name, (image_model, text, embed_dim) in NAMED.items():
    def factory(image_model=image_model, text=text, embed_dim=embed_dim, **overrides):
      # Text settings given as overrides extend the named text tower.
      text = {**text, **dict(overrides.pop("text", None) or {})}
      return TwoTower(**{"image_model": image_model, "text": text,
                         "embed_dim": embed_dim, **overrides})

    factory.__doc__ = f"CLIP two-tower model: {image_model} + text transformer."
    register_model(name, family="two_tower", image_size=224)(factory)


_register()


# ---------------------------------------------------------------- open_clip weights

def _attention(state: StateDict, prefix: str, num_heads: int) -> dict:
  """torch ``nn.MultiheadAttention`` (fused ``in_proj``) -> query/key/value/out."""
  weights = np.split(state.take(f"{prefix}.in_proj_weight"), 3, axis=0)
  biases = np.split(state.take(f"{prefix}.in_proj_bias"), 3)
  dim = weights[0].shape[1]
  head_dim = dim // num_heads
  out = {name: {"kernel": w.T.reshape(dim, num_heads, head_dim),
                "bias": b.reshape(num_heads, head_dim)}
         for name, w, b in zip(("query", "key", "value"), weights, biases)}
  proj = state.take(f"{prefix}.out_proj.weight")
  out["out"] = {"kernel": proj.T.reshape(num_heads, head_dim, dim),
                "bias": state.take(f"{prefix}.out_proj.bias")}
  return out


def _transformer(state: StateDict, prefix: str, num_layers: int, num_heads: int) -> dict:
  blocks = {}
  for i in range(num_layers):
    block = f"{prefix}.resblocks.{i}"
    blocks[f"encoderblock_{i}"] = {
        "LayerNorm_0": state.norm(f"{block}.ln_1"),
        "MultiHeadDotProductAttention_1": _attention(state, f"{block}.attn", num_heads),
        "LayerNorm_2": state.norm(f"{block}.ln_2"),
        "MlpBlock_3": {"Dense_0": state.linear(f"{block}.mlp.c_fc"),
                       "Dense_1": state.linear(f"{block}.mlp.c_proj")},
    }
  return blocks


def convert_open_clip(state: StateDict, model: TwoTower) -> dict:
  """open_clip ``CLIP`` state dict (ViT image tower) -> ``TwoTower`` parameters."""
  image = create(model.image_model, **{**dict(model.image or {}), "num_classes": 0})
  if model_info(model.image_model).family != "vit" or not getattr(image, "pre_norm", False):
    raise ConversionError(
        f"open_clip import needs a CLIP ViT image tower (vit_*_clip_*); the model uses "
        f"{model.image_model!r}")
  text = TextTransformer(**{**dict(model.text or {}), "num_classes": 0})
  visual = {
      "embedding": state.conv("visual.conv1", bias=False),
      "cls": state.take("visual.class_embedding").reshape(1, 1, -1),
      "Transformer": {
          "posembed_input": {"pos_embedding": state.take("visual.positional_embedding")[None]},
          "norm_pre": state.norm("visual.ln_pre"),
          **_transformer(state, "visual.transformer", image.num_layers, image.num_heads),
          "encoder_norm": state.norm("visual.ln_post"),
      },
  }
  params = {
      "img": visual,
      # open_clip multiplies by its projections (x @ proj): already [in, out].
      "img_projection": {"kernel": state.take("visual.proj")},
      "txt": {
          "token_embedding": {"embedding": state.take("token_embedding.weight")},
          "Transformer": {
              "posembed_input": {"pos_embedding": state.take("positional_embedding")[None]},
              **_transformer(state, "transformer", text.num_layers, text.num_heads),
              "encoder_norm": state.norm("ln_final"),
          },
      },
      "txt_projection": {"kernel": state.take("text_projection")},
      "logit_scale": state.take("logit_scale").reshape(()),
  }
  if model.logit_bias_init is not None:
    params["logit_bias"] = state.take("logit_bias").reshape(())
  return params


def from_open_clip(state_dict: Union[Mapping[str, Any], str, os.PathLike],
                   model_name: str = "clip_vit_base_patch32_224", *, strict: bool = True,
                   **overrides) -> tuple[TwoTower, dict]:
  """Converts an open_clip state dict (mapping, ``.safetensors`` or ``.pt`` file).

  Returns the model (pooling the text at the largest token id, as open_clip does with
  OpenAI's tokenizer, unless ``text`` overrides say otherwise) and its parameters.
  Keys that are missing, unused or of the wrong shape raise ``ConversionError``
  naming them.
  """
  if not isinstance(state_dict, Mapping):
    state_dict = load_state_dict(state_dict)
  text = {"pool": "argmax", **dict(overrides.pop("text", None) or {})}
  model = create(model_name, text=text, **overrides)
  if not isinstance(model, TwoTower):
    raise ConversionError(f"{model_name!r} is not a two-tower model")
  state = StateDict(state_dict)
  params = convert_open_clip(state, model)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0)))["params"]
  check_against(params, expected, state.unused(), strict=strict,
                what=f"open_clip weights for {model_name}")
  return model, jax.tree.map(jnp.asarray, params)
