"""Fine-tuning controls for the classification trainer; each is off by default.

Starting from pretrained weights (``config.init``) is ``vit_jax.weights.load``.

* ``wrap_optimizer``: freezing by regular expression (``config.freeze``: matching
  parameters get no update and no optimizer state, LiT-style locked towers; or
  ``config.train_only``: everything else is frozen, e.g. LoRA's adapters and the
  head) and layer-wise learning-rate decay (``config.optimizer.layer_decay``: block
  ``i`` of ``L`` trains at ``decay ** (L + 1 - (i + 1))`` times the rate, the stem at
  ``decay ** (L + 1)``, the head and final norm at 1; timm/BEiT's rule).
* ``ema``: an exponential moving average of the parameters, kept in the optimizer
  state (so it is checkpointed, sharded and resumed with it); ``ema_params`` finds
  it for evaluation.
* ``mix``: mixup / cutmix on a batch, with soft targets.
* ``mask_mix`` and ``attention_labels``: MixPro (Zhao et al., ICLR 2023), i.e. MaskMix
  (a grid mask whose cells are a multiple of the patch size) with progressive
  attention labels (TransMix's class-attention label blended with the area label).
"""

import math
import re
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from vit_jax import lora, tree

_BLOCK = re.compile(r"(^|/|__)encoderblock_(\d+)(/|__|$)")  # "__": LoRA names
_STEM = re.compile(r"^(embedding|cls|Transformer/posembed_input)(/|$)")


# ------------------------------------------------------------------ optimizer

def layer_ids(params: Any) -> tuple[Any, int]:
  """Per-parameter layer index (stem 0, block i -> i + 1, rest L + 1) and L."""
  names = [tree.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  blocks = {int(m.group(2)) for n in names if (m := _BLOCK.search(n))}
  if not blocks:
    raise ValueError("layer_decay needs blocks named encoderblock_{i} (ViT layout, "
                     "scan_layers=False)")
  depth = max(blocks) + 1

  def layer(path, _):
    name = tree.path_name(path)
    if m := _BLOCK.search(name):
      return int(m.group(2)) + 1
    if _STEM.search(name):
      return 0
    return depth + 1

  return jax.tree_util.tree_map_with_path(layer, params), depth


def layer_decay_scales(params: Any, decay: float) -> Any:
  ids, depth = layer_ids(params)
  return jax.tree.map(lambda i: float(decay) ** (depth + 1 - i), ids)


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def trainable_mask(params: Any, *, freeze: Optional[str] = None,
                   train_only: Optional[str] = None) -> Any:
  """True for trained parameters: not matching ``freeze``, and matching ``train_only``."""
  freeze_re = re.compile(freeze) if freeze else None
  only_re = re.compile(train_only) if train_only else None

  def trained(path, _):
    name = tree.path_name(path)
    if freeze_re and freeze_re.search(name):
      return False
    return not only_re or bool(only_re.search(name))

  mask = jax.tree_util.tree_map_with_path(trained, params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"freeze={freeze!r} / train_only={train_only!r} leave no parameter "
                     "to train")
  return mask


def wrap_optimizer(tx: optax.GradientTransformation, params: Any, *,
                   layer_decay: Optional[float] = None, freeze: Optional[str] = None,
                   train_only: Optional[str] = None, ema_decay: Optional[float] = None
                   ) -> optax.GradientTransformation:
  """``tx`` with layer-wise decay, frozen parameters and EMA (each if set)."""
  if freeze or train_only:
    mask = trainable_mask(params, freeze=freeze, train_only=train_only)
    labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  if layer_decay:  # scales the final updates: the rate and decoupled weight decay
    tx = optax.chain(tx, _scale_by_tree(layer_decay_scales(params, layer_decay)))
  if ema_decay:
    tx = optax.chain(tx, ema(ema_decay))
  return tx


# ------------------------------------------------------------------ EMA

class EmaState(NamedTuple):
  count: jax.Array
  params: Any


def ema(decay: float, warmup: bool = True) -> optax.GradientTransformation:
  """Tracks ``decay * ema + (1 - decay) * new_params``; passes updates through.

  Must come last in a chain: it sees the final updates, so ``params + updates`` is
  the new parameters. With ``warmup`` the decay is ``min(decay, (1+n)/(10+n))``, so
  early averages do not stay near the initial weights.
  """
  def init(params):
    return EmaState(count=jnp.zeros((), jnp.int32),
                    params=jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))

  def update(updates, state, params):
    if params is None:
      raise ValueError("ema needs params in update()")
    n = state.count.astype(jnp.float32)
    d = jnp.minimum(decay, (1 + n) / (10 + n)) if warmup else jnp.asarray(decay)
    new = jax.tree.map(lambda e, p, u: d * e + (1 - d) * (p + u).astype(jnp.float32),
                       state.params, params, updates)
    return updates, EmaState(count=state.count + 1, params=new)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any, like: Any) -> Optional[Any]:
  """The EMA parameters inside an optimizer state (cast like ``like``), or None."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
           if isinstance(s, EmaState)]
  if not found:
    return None
  return jax.tree.map(lambda e, p: e.astype(p.dtype), found[0].params, like)


# ------------------------------------------------------------------ mixup / cutmix

def mix(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *,
        mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, switch_prob: float = 0.5,
        label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Mixes each image with the batch reversed (timm's 'batch' mode); soft targets.

  With both alphas set, each batch uses cutmix with probability ``switch_prob``.
  Cutmix pastes a box whose area fraction is ``1 - lam`` and corrects ``lam`` to
  the box actually pasted (clipped at the border).
  """
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  if not (mixup_alpha or cutmix_alpha):
    return images, targets
  k_lam, k_cut, k_switch, k_y, k_x = jax.random.split(rng, 5)
  h, w = images.shape[1], images.shape[2]

  def do_mixup(_):
    lam = jax.random.beta(k_lam, mixup_alpha, mixup_alpha)
    return lam * images + (1 - lam) * images[::-1], lam

  def do_cutmix(_):
    lam = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
    cut = jnp.sqrt(1 - lam)
    ch, cw = (cut * h).astype(jnp.int32), (cut * w).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[None, :, :, None]
    mixed = jnp.where(box, images[::-1], images)
    lam = 1 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
    return mixed, lam

  if mixup_alpha and cutmix_alpha:
    use_cut = jax.random.uniform(k_switch) < switch_prob
    mixed, lam = jax.lax.cond(use_cut, do_cutmix, do_mixup, None)
  elif cutmix_alpha:
    mixed, lam = do_cutmix(None)
  else:
    mixed, lam = do_mixup(None)
  return mixed.astype(images.dtype), lam * targets + (1 - lam) * targets[::-1]


# ------------------------------------------------------------------ MixPro

def mask_mix(rng: jax.Array, images: jax.Array, *, alpha: float, cell: int,
             patch_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """MaskMix: each image keeps ``ceil(cells * lam)`` random grid cells (``lam`` from
  Beta(alpha, alpha), one per batch) and takes the others from the batch reversed.

  ``cell`` (pixels) must be a multiple of ``patch_size``, so every patch comes whole
  from one image. Returns ``(mixed images, patch mask [B, gh * gw] (1: own image),
  area label lam [B])`` with lam the kept fraction of cells, as MixPro's MaskMix.
  """
  if cell <= 0 or cell % patch_size:
    raise ValueError(f"mixup.mixpro_cell={cell} must be a positive multiple of the "
                     f"model's patch size {patch_size}")
  b, h, w = images.shape[:3]
  rows, cols = math.ceil(h / cell), math.ceil(w / cell)
  cells = rows * cols
  k_lam, k_perm = jax.random.split(rng)
  lam = jax.random.beta(k_lam, alpha, alpha)
  count = jnp.ceil(cells * lam)
  # A random permutation per image: its first `count` cells are kept.
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_perm, (b, cells)), axis=1), axis=1)
  grid = (rank < count).astype(images.dtype).reshape(b, rows, cols)
  pixels = jnp.repeat(jnp.repeat(grid, cell, axis=1), cell, axis=2)[:, :h, :w, None]
  per = cell // patch_size
  patches = jnp.repeat(jnp.repeat(grid, per, axis=1), per, axis=2)
  patches = patches[:, :h // patch_size, :w // patch_size].reshape(b, -1)
  mixed = pixels * images + (1 - pixels) * images[::-1]
  return mixed, patches, jnp.full((b,), count / cells, jnp.float32)


def attention_labels(attention: jax.Array, patch_mask: jax.Array, area_lam: jax.Array,
                     probs: jax.Array, labels: jax.Array, num_classes: int,
                     label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """MixPro's progressive attention labels: ``(soft targets [B, C], factor)``.

  ``attention [B, N]``: the class token's last-block attention to each patch (mean
  over heads, TransMix). ``lam_attn = sum(mask * a) / sum(a)``; the label weight of
  the own image is ``f * lam_attn + (1 - f) * lam_area`` with the progressive factor
  ``f`` the batch mean cosine similarity between the model's predictions ``probs``
  on the mixed images and the area-mixed targets (low early in training, when
  attention is uninformative). Every input is treated as a constant.
  """
  attention, probs = jax.lax.stop_gradient(attention), jax.lax.stop_gradient(probs)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  own = jnp.sum(patch_mask * attention, axis=1)
  lam_attn = own / (own + jnp.sum((1 - patch_mask) * attention, axis=1))
  area = area_lam[:, None] * targets + (1 - area_lam[:, None]) * targets[::-1]
  cosine = jnp.sum(probs * area, -1) / (jnp.linalg.norm(probs, axis=-1)
                                        * jnp.linalg.norm(area, axis=-1) + 1e-12)
  factor = jnp.mean(cosine)
  lam = (factor * lam_attn + (1 - factor) * area_lam)[:, None]
  return lam * targets + (1 - lam) * targets[::-1], factor


def check_mixpro_model(model: Any) -> None:
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  if not isinstance(model, vit.VisionTransformer) or model.classifier != "token":
    raise ValueError("mixup.mixpro_alpha needs a ViT with a class token (its attention "
                     f"labels the mix); got {type(model).__name__}")
  if model.scan_layers:
    raise ValueError("mixup.mixpro_alpha reads the last block's attention: set "
                     "model.scan_layers=False")


def _last_attention(model: Any) -> tuple[str, ...]:
  return ("Transformer", f"encoderblock_{model.num_layers - 1}",
          "MultiHeadDotProductAttention_1")


def last_block_qk_filter(model: Any):
  """A ``capture_intermediates`` filter: the last block's query and key projections."""
  last = _last_attention(model)
  return lambda mdl, method: (method == "__call__" and len(mdl.scope.path) == 4 and
                              tuple(mdl.scope.path[:3]) == last and
                              mdl.scope.path[3] in ("query", "key"))


def last_block_class_attention(intermediates: Any, model: Any) -> jax.Array:
  """The class token's attention to each patch in the last block, mean over heads."""
  from vit_jax.models import token_reduction  # pylint: disable=g-import-not-at-top
  node = intermediates
  for name in _last_attention(model):
    node = node[name]
  return token_reduction.class_attention(node["query"]["__call__"][0],
                                         node["key"]["__call__"][0], 1)


def describe_trainable(params: Any, mask: Any) -> str:
  trained, total = lora.trainable_fraction(params, mask)
  return f"training {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)"
