"""Vision Transformer (Dosovitskiy et al., 2021), in the vision_transformer layout.

Parameter tree (what ``.npz`` checkpoints of google-research/vision_transformer and
big_vision hold)::

  embedding/{kernel,bias}                        patch embedding, HWIO conv kernel
  cls                                            class token (classifier="token")
  Transformer/posembed_input/pos_embedding       learned position embedding
  Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_1,
                              LayerNorm_2, MlpBlock_3/Dense_{0,1}
  Transformer/encoder_norm
  MAPHead_0/...                                  (classifier="map")
  pre_logits/{kernel,bias}                       (representation_size set)
  head/{kernel,bias}                             (num_classes > 0)

``num_classes=0`` drops the head: the model then returns the pooled features, as in
timm. CLIP image towers (``vit_*_clip_224``, timm's names) add a LayerNorm before the
blocks (``Transformer/norm_pre``), have no patch-embedding bias and use LayerNorm
epsilon 1e-5, as OpenAI's CLIP and open_clip do. Per-block token features are sown
into the ``intermediates`` collection as ``Transformer/block_{i}``
(``vit_jax.models.forward_intermediates`` collects them).

Memory options (``config.model.*`` in the trainer):

* ``remat_policy``: recompute block activations in the backward pass instead of
  storing them. ``"none"`` (default), ``"full"`` (keep only each block's input), or a
  ``jax.checkpoint_policies`` name such as ``"dots_saveable"`` (keep matmul outputs,
  recompute the cheap elementwise ops) or ``"dots_with_no_batch_dims_saveable"``.
* ``scan_layers``: run the blocks as one ``nn.scan`` loop (compiles one block instead
  of ``num_layers``). The block parameters are then stacked on a leading axis under
  ``Transformer/encoderblock/...`` instead of ``Transformer/encoderblock_{i}/...``;
  ``stack_block_params`` and ``unstack_block_params`` convert whole trees (parameters,
  optimizer state, checkpoints) between the two layouts, and the timm converter
  produces whichever the model uses.

Hooks (timm's ``forward_features``/``forward_head``/``_pos_embed``, as Linen methods).
A variant subclasses and overrides the few it changes; every other setting (scan,
remat, attention backends, dtypes) keeps working, and so does the parameter tree as
long as an override creates its parameters under the same names. Each hook runs
inside the compact ``__call__``, so it may create submodules and parameters.

``VisionTransformer`` (images -> logits), in call order:

* ``embed_patches(images) -> (tokens [B, N, D], grid (gh, gw))``: the ``embedding``
  conv and the size checks. FlexiViT (``flexi_patch_size``) resizes the patch kernel
  here per call (``FlexiPatchEmbed``); NaFlex/NaViT (``models/naflex.py``) take
  pre-patchified inputs here (patches plus their grid positions).
* ``add_fixed_position_embedding(tokens, grid)``: the parameter-free ``sincos2d``
  table, added to the patches before any prefix token (identity for ``learn``).
* ``add_prefix_tokens(tokens)``: the class token. DeiT adds its distillation token.
* ``make_encoder(**settings)``: the ``Transformer`` module, an ``encoder_type``
  (class attribute, ``Encoder``). A variant names an ``Encoder`` subclass there to
  reach the hooks below, and passes that subclass's own fields as ``settings``.
* ``pool(tokens)``: token / gap / map pooling to one vector per image (packed
  NaFlex batches pool per image with their mask here).
* ``forward_features(images, *, train)``: the four above, ending at the normed tokens.
* ``forward_head(tokens, *, train)``: pooling, pre-logits and ``head`` via
  ``layers.classifier_head``. DeiT's two heads override this.

``Encoder`` (the ``Transformer`` scope: tokens -> normed tokens):

* ``add_position_embedding(x, grid)``: the learned ``posembed_input`` table (prefix
  tokens included). FlexiViT/NaFlex resample the table to ``grid`` (which may hold
  per-image sizes); MAE adds it and then keeps the visible tokens only, so the
  blocks run on those.
* ``make_block(index, name, drop_path_rate, **settings)``: the block module for one
  index (None when scanned), a ``block_type`` (class attribute) built with the
  encoder's settings plus ``settings``. MoE swaps the block (or its MLP) in
  configured layers; token reduction builds ``TokenReductionBlock`` blocks. Different
  block types need ``scan_layers=False``.
* ``run_blocks(x, *, mask, train)``: the loop (or ``nn.scan``) with remat, batch
  sharding constraints and the per-block ``block_{i}`` intermediates that early-exit
  heads read. ``TokenReductionEncoder`` overrides it to carry token sizes (and
  sources) from block to block.

``Encoder1DBlock`` (one pre-norm block):

* ``attend(y, *, mask, train, bias=None, attention_fn=None)``: the attention branch
  on normed tokens. ToMe's proportional attention passes ``log(size)`` as ``bias``
  and reads the keys through a wrapped ``attention_fn`` (it receives the projected
  query, key and value).
* ``between(x, *, train)``: identity between the attention and MLP residuals (a
  variant that changes the tokens there). Token reduction also changes the token
  sizes there, so ``TokenReductionBlock`` runs the same steps on
  ``(tokens, size, source)`` and reduces in ``reduce`` (see ``token_reduction``).
* ``mlp(y, *, train)``: the MLP branch (``MlpBlock_3``). ``MoeBlock`` swaps it for
  an MoE layer (``Moe``), which sows its auxiliary loss into the ``aux`` collection
  (see ``moe``).
"""

import functools
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

import numpy as np

from vit_jax import kernels
from vit_jax import sharding
from vit_jax.models import layers, moe as moe_lib, robust_ops, token_reduction
from vit_jax.models.convert import StateDict, register_timm_converter
from vit_jax.models.registry import register_variant

Array = Any


def _resample():
  # Imported on use: vit_jax.weights (resampling's home) imports this module.
  from vit_jax.models import resample  # pylint: disable=g-import-not-at-top
  return resample


# Width, depth, MLP width and heads of the standard sizes (ViT paper, DeiT, timm).
VARIANTS = {
    "tiny": dict(hidden_size=192, num_layers=12, mlp_dim=768, num_heads=3),
    "small": dict(hidden_size=384, num_layers=12, mlp_dim=1536, num_heads=6),
    "base": dict(hidden_size=768, num_layers=12, mlp_dim=3072, num_heads=12),
    "large": dict(hidden_size=1024, num_layers=24, mlp_dim=4096, num_heads=16),
    "huge": dict(hidden_size=1280, num_layers=32, mlp_dim=5120, num_heads=16),
}
PATCH_SIZES = (8, 14, 16, 32)

# Rematerialisation policies by config name; "none" switches remat off.
REMAT_POLICIES = {
    "full": None,  # jax.checkpoint's default: save nothing but the block input
    **{name: getattr(jax.checkpoint_policies, name) for name in (
        "nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
        "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")},
}


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding (``pos_embedding``) to the tokens.

  With ``stored_grid`` the table holds the prefix tokens plus that patch grid and is
  resampled (bilinear, as FlexiViT) to the call's ``grid``; without it, the table is
  built for ``x``'s token count.
  """
  param_dtype: Any = jnp.float32
  stored_grid: Optional[tuple[int, int]] = None

  @nn.compact
  def __call__(self, x: Array, grid: Optional[tuple[int, int]] = None) -> Array:
    if self.stored_grid is None or grid is None:
      shape = (1,) + x.shape[1:]
    else:
      prefix = x.shape[1] - grid[0] * grid[1]
      shape = (1, prefix + self.stored_grid[0] * self.stored_grid[1], x.shape[-1])
    pos_embedding = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                               shape, self.param_dtype)
    if self.stored_grid is not None and grid is not None and (
        tuple(grid) != tuple(self.stored_grid)):
      pos_embedding = _resample().resample_posemb(
          pos_embedding, grid, old_size=self.stored_grid, num_prefix_tokens=prefix,
          method="bilinear")
    return x + pos_embedding.astype(x.dtype)


class FlexiPatchEmbed(nn.Module):
  """The ``embedding`` conv with its kernel stored at ``patch_size`` and run at
  ``run_patch_size`` (FlexiViT): same parameters as ``nn.Conv`` (``kernel`` HWIO,
  ``bias``), the kernel resized in every call so gradients reach the stored one.

  Takes NHWC images, or (NaFlex) flat patches ``[B, L, run_patch_size**2 * C]``
  flattened in (row, column, channel) order, which the flattened kernel multiplies.
  """
  features: int
  patch_size: int
  run_patch_size: int
  resize_method: str = "pi"
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    p, q = self.patch_size, self.run_patch_size
    flat = images.ndim == 3
    channels = images.shape[-1]
    if flat:
      if channels % (q * q):
        raise ValueError(f"flat patches of {channels} values are not {q}x{q} patches "
                         f"(patch size {q}) of whole channels")
      channels //= q * q
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, channels, self.features), self.param_dtype)
    kernel = _resample().resize_patch_kernel(kernel, (q, q), method=self.resize_method)
    if flat:
      x = jnp.dot(images.astype(self.dtype),
                  kernel.reshape(-1, self.features).astype(self.dtype))
    else:
      x = jax.lax.conv_general_dilated(
          images.astype(self.dtype), kernel.astype(self.dtype), (q, q), "VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      x = x + self.param("bias", nn.initializers.zeros, (self.features,),
                         self.param_dtype).astype(self.dtype)
    return x


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)).

  ``mask`` (boolean, broadcastable to ``[batch, heads, q, k]``, True where attention is
  allowed) serves the text towers: causal and padding masks. ``attend``, ``between``
  and ``mlp`` are the hooks a variant overrides (see the module docstring).
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False
  attention_fn: Callable = layers.dot_product_attention
  norm_epsilon: float = 1e-6
  qkv_bias: bool = True  # timm's qkv_bias=False drops only the query/key/value biases
  qk_norm: bool = False  # per-head LayerNorm of queries and keys (Soft MoE models)
  ops: robust_ops.BlockOps = robust_ops.BlockOps()  # gate, ShiftGELU, I-LayerNorm
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def norm(self, name: str) -> nn.Module:
    if self.ops.norm == "ilayernorm":
      return robust_ops.ILayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)
    return layers.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

  def attend(self, y: Array, *, mask: Optional[Array], train: bool,
             bias: Optional[Array] = None,
             attention_fn: Optional[Callable] = None) -> Array:
    """The attention branch on normed tokens (before dropout and drop path).

    ``bias`` is added to the attention logits; ``attention_fn`` replaces the field's
    for this call (token reduction reads the projected query and key through it).
    """
    return layers.MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_dropout_rate=self.attention_dropout_rate,
        qkv_bias=self.qkv_bias, qk_norm=self.qk_norm,
        attention_fn=attention_fn or self.attention_fn, gate=self.ops.attention_gate,
        dtype=self.dtype, param_dtype=self.param_dtype,
        name="MultiHeadDotProductAttention_1")(y, bias=bias, mask=mask, train=train)

  def between(self, x: Array, *, train: bool) -> Array:
    """Tokens between the two residual branches; identity here."""
    del train
    return x

  def mlp(self, y: Array, *, train: bool) -> Array:
    """The MLP branch on normed tokens (before drop path)."""
    return layers.MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                           gelu_approximate=self.gelu_approximate,
                           activation=robust_ops.activation_fn(self.ops.activation),
                           dtype=self.dtype,
                           param_dtype=self.param_dtype, name="MlpBlock_3")(y, train=train)

  @nn.compact
  def __call__(self, x: Array, *, mask: Optional[Array] = None, train: bool = False,
               drop_path_rate: Optional[Array] = None) -> Array:
    """``drop_path_rate`` (traced, per layer) replaces the field when scanned."""
    rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
    y = self.attend(self.norm("LayerNorm_0")(x), mask=mask, train=train)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=not train)
    x = self.between(x + layers.DropPath(rate)(y, train=train), train=train)
    y = self.mlp(self.norm("LayerNorm_2")(x), train=train)
    return x + layers.DropPath(rate)(y, train=train)


class TokenReductionBlock(Encoder1DBlock):
  """A block that merges (ToMe) or keeps and fuses (EViT) tokens between its residuals.

  Called with and returning ``(tokens, size, source)`` (``token_reduction``'s token
  state): the plain block's steps, with the sizes that proportional attention reads
  and the merge changes carried alongside the tokens. Same parameters as the plain
  block (DynamicViT's pruning blocks add ``score_predictor``, run in ``prune`` before
  the block); the algorithms live in ``token_reduction``.
  """
  merge: int = 0  # ToMe's r in this block (0: no merging here)
  proportional_attention: bool = False  # add log(size) to the logits (ToMe models)
  keep_rate: float = 1.0  # EViT's keep rate in this block (1: no pruning here)
  prune_keep: int = 0  # DynamicViT: patch tokens kept before this block (0: no pruning)
  prune_target: float = 1.0  # DynamicViT: the keep ratio this stage aims at, rho**s
  ratio_weight: float = 0.0  # DynamicViT: this stage's weight in the keep-ratio loss
  policy_attention: bool = False  # DynamicViT training: attention ignores dropped tokens
  num_prefix_tokens: int = 1  # class (and distillation) tokens, never reduced

  def prune(self, x: Array, size: Array, source: Optional[Array], *, train: bool
            ) -> tuple[Array, Array, Optional[Array]]:
    """DynamicViT's step before the block: drop tokens (inference) or mark them by
    a size of 0 (training, Gumbel-softmax samples; see ``token_reduction``)."""
    p = self.num_prefix_tokens
    log_probs = token_reduction.ScorePredictor(
        dtype=self.dtype, param_dtype=self.param_dtype, name="score_predictor")(
            x[:, p:], size[:, p:])
    if not train:
      return token_reduction.keep_top(x, size, source, log_probs[..., 0],
                                      self.prune_keep, p)
    keep = token_reduction.gumbel_keep(self.make_rng("dropout"), log_probs) * size[:, p:]
    self.sow("intermediates", "keep_decision", keep)
    # The keep-ratio loss goes where MoE's auxiliary losses go (the trainer adds them).
    ratio_loss = token_reduction.keep_ratio_loss(keep, self.prune_target)
    self.sow(moe_lib.AUX_COLLECTION, "loss", self.ratio_weight * ratio_loss)
    self.sow(moe_lib.AUX_COLLECTION, "metrics", {
        f"dynamic_vit/keep_ratio_{self.name}": keep.mean(),
        f"dynamic_vit/ratio_loss_{self.name}": ratio_loss})
    return x, jnp.concatenate([size[:, :p], keep], axis=1), source

  def reduce(self, x: Array, size: Array, source: Optional[Array], query: Array,
             key: Array) -> tuple[Array, Array, Optional[Array]]:
    """The ``between`` step: fewer tokens, their sizes and sources."""
    if self.merge:
      return token_reduction.merge_tokens(x, size, source, key, self.merge,
                                          self.num_prefix_tokens)
    if self.keep_rate < 1.0:
      attention = token_reduction.class_attention(query, key, self.num_prefix_tokens)
      return token_reduction.keep_and_fuse(x, size, source, attention, self.keep_rate,
                                           self.num_prefix_tokens)
    return x, size, source

  @nn.compact
  def __call__(self, state: tuple[Array, Array, Optional[Array]], *,
               mask: Optional[Array] = None, train: bool = False,
               drop_path_rate: Optional[Array] = None):
    x, size, source = state
    rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
    if self.prune_keep:
      x, size, source = self.prune(x, size, source, train=train)
    seen = {}

    def recording_attention(query, key, value, **kwargs):
      seen.update(query=query, key=key)
      if train and self.policy_attention:  # size holds the keep marks (no bias, mask)
        return token_reduction.policy_attention(query, key, value, size)
      return self.attention_fn(query, key, value, **kwargs)

    bias = jnp.log(size)[:, None, None, :] if self.proportional_attention else None
    y = self.attend(self.norm("LayerNorm_0")(x), mask=mask, train=train, bias=bias,
                    attention_fn=recording_attention)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=not train)
    x, size, source = self.reduce(x + layers.DropPath(rate)(y, train=train), size,
                                  source, seen["query"], seen["key"])
    y = self.mlp(self.norm("LayerNorm_2")(x), train=train)
    return x + layers.DropPath(rate)(y, train=train), size, source


class Encoder(nn.Module):
  """The ``Transformer`` scope: position embedding, blocks and the final norm.

  ``pre_norm`` adds a LayerNorm (``norm_pre``) after the position embedding, before
  the blocks (CLIP's ``ln_pre``). ``add_position_embedding``, ``make_block`` and
  ``run_blocks`` are the hooks a variant overrides (see the module docstring).
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  learned_posemb: bool = True
  pre_norm: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False
  attention_fn: Callable = layers.dot_product_attention
  remat_policy: str = "none"
  scan_layers: bool = False
  norm_epsilon: float = 1e-6
  posemb_grid: Optional[tuple[int, int]] = None  # stored table's grid (then resampled)
  qk_norm: bool = False
  ops: robust_ops.BlockOps = robust_ops.BlockOps()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def add_position_embedding(self, x: Array, grid: Any = None) -> Array:
    """Adds the learned table: built for ``x``'s token count, or (``posemb_grid``
    set) stored for that grid and resampled to ``grid``."""
    if not self.learned_posemb:
      return x
    return AddPositionEmbs(param_dtype=self.param_dtype, stored_grid=self.posemb_grid,
                           name="posembed_input")(x, grid)

  block_type = Encoder1DBlock  # what make_block builds (a class attribute, not a field)

  def make_block(self, index: Optional[int], name: str, drop_path_rate: float = 0.0,
                 **settings) -> nn.Module:
    """The block at ``index`` (None: the one block ``nn.scan`` repeats).

    ``settings`` are further fields of ``block_type`` (a subclass's own).
    """
    del index
    return self.block_type(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, drop_path_rate=drop_path_rate,
        gelu_approximate=self.gelu_approximate, attention_fn=self.attention_fn,
        norm_epsilon=self.norm_epsilon, qk_norm=self.qk_norm, ops=self.ops,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name, **settings)

  def run_blocks(self, x: Array, *, mask: Optional[Array], train: bool) -> Array:
    """Every block in turn (or one ``nn.scan``), sowing ``block_{i}`` after each."""
    rates = layers.stochastic_depth_rates(self.drop_path_rate, self.num_layers)
    collect = self.is_mutable_collection("intermediates")

    def apply_block(module, x, rate):
      x = sharding.constrain_batch(module(x, mask=mask, train=train, drop_path_rate=rate))
      return x, (x if collect and self.scan_layers else None)

    if self.remat_policy != "none":
      apply_block = nn.remat(apply_block, policy=REMAT_POLICIES[self.remat_policy],
                             prevent_cse=not self.scan_layers)  # scan already does
    if self.scan_layers:
      scan = nn.scan(apply_block, variable_axes={"params": 0},
                     split_rngs={"params": True, "dropout": True}, length=self.num_layers)
      # Rates become a per-layer input (None, i.e. the field's 0.0, without drop path).
      x, stacked = scan(self.make_block(None, "encoderblock"),
                        x, jnp.asarray(rates) if self.drop_path_rate else None)
      for i in range(self.num_layers if collect else 0):
        self.sow("intermediates", f"block_{i}", stacked[i])
    else:
      for i, rate in enumerate(rates):
        x, _ = apply_block(self.make_block(i, f"encoderblock_{i}", rate), x, None)
        self.sow("intermediates", f"block_{i}", x)
    return x

  @nn.compact
  def __call__(self, x: Array, *, mask: Optional[Array] = None, grid: Any = None,
               train: bool = False) -> Array:
    x = self.add_position_embedding(x, grid)
    norm = robust_ops.ILayerNorm if self.ops.norm == "ilayernorm" else layers.LayerNorm
    if self.pre_norm:
      x = norm(epsilon=self.norm_epsilon, dtype=self.dtype,
               param_dtype=self.param_dtype, name="norm_pre")(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    x = self.run_blocks(sharding.constrain_batch(x), mask=mask, train=train)
    return norm(epsilon=self.norm_epsilon, dtype=self.dtype,
                param_dtype=self.param_dtype, name="encoder_norm")(x)


class TokenReductionEncoder(Encoder):
  """An ``Encoder`` whose blocks merge (ToMe) or keep and fuse (EViT) tokens.

  ``token_merging``: ``r`` per block (a tuple, one per block); ``token_keep_rate`` in
  the blocks ``token_keep_layers``. Sows each block's tokens (``block_{i}``, fewer
  as they go), ``token_size_{i}`` (patches per token after block ``i``) and, when
  intermediates are collected, ``token_source_{i}`` ``[B, tokens, input_tokens]``.
  """
  block_type = TokenReductionBlock
  token_merging: tuple[int, ...] = ()
  token_keep_rate: float = 1.0
  token_keep_layers: tuple[int, ...] = ()
  token_pruning: float = 1.0
  token_pruning_layers: tuple[int, ...] = ()
  token_pruning_ratio_weight: float = 2.0
  num_prefix_tokens: int = 1

  def make_block(self, index: Optional[int], name: str, drop_path_rate: float = 0.0,
                 **settings) -> nn.Module:
    merging = any(self.token_merging)
    return super().make_block(
        index, name, drop_path_rate, merge=self.token_merging[index] if merging else 0,
        proportional_attention=merging, num_prefix_tokens=self.num_prefix_tokens,
        keep_rate=self.token_keep_rate if index in self.token_keep_layers else 1.0,
        **settings)

  def run_blocks(self, x: Array, *, mask: Optional[Array], train: bool) -> Array:
    if any(self.token_merging):  # the blocks clamp r themselves; this warns once
      token_reduction.clamp_merge_schedule(self.token_merging, x.shape[1],
                                           self.num_prefix_tokens)
    pruning = {}  # DynamicViT: block index -> patch tokens kept before it
    if self.token_pruning < 1.0:
      pruning = dict(zip(self.token_pruning_layers, token_reduction.pruning_keep_counts(
          self.token_pruning, len(self.token_pruning_layers),
          x.shape[1] - self.num_prefix_tokens)))
    rates = layers.stochastic_depth_rates(self.drop_path_rate, self.num_layers)
    collect = self.is_mutable_collection("intermediates")
    batch, tokens = x.shape[:2]
    # Sources cost [B, N, N] per block: tracked only for forward_intermediates.
    source = jnp.broadcast_to(jnp.eye(tokens, dtype=jnp.float32),
                              (batch, tokens, tokens)) if collect else None
    state = (x, jnp.ones((batch, tokens), jnp.float32), source)

    def apply_block(module, state):
      x, size, source = module(state, mask=mask, train=train)
      return sharding.constrain_batch(x), size, source

    if self.remat_policy != "none":
      apply_block = nn.remat(apply_block, policy=REMAT_POLICIES[self.remat_policy])
    for i, rate in enumerate(rates):
      stage = self.token_pruning_layers.index(i) + 1 if i in pruning else 0
      dynamic = dict(prune_keep=pruning.get(i, 0),
                     policy_attention=bool(pruning) and i >= min(pruning, default=0),
                     prune_target=self.token_pruning ** stage,
                     ratio_weight=self.token_pruning_ratio_weight / max(len(pruning), 1))
      state = apply_block(self.make_block(i, f"encoderblock_{i}", rate, **dynamic), state)
      self.sow("intermediates", f"block_{i}", state[0])
      self.sow("intermediates", f"token_size_{i}", state[1])
      if collect:
        self.sow("intermediates", f"token_source_{i}", state[2])
    return state[0]


class MoeBlock(Encoder1DBlock):
  """A block whose MLP is a mixture of experts (``moe_lib.MoeMlp``, scope ``Moe``)
  when ``moe`` is set; the plain block (``MlpBlock_3``) otherwise."""
  moe: Optional[moe_lib.MoeSettings] = None

  def mlp(self, y: Array, *, train: bool) -> Array:
    if self.moe is None:
      return super().mlp(y, train=train)
    return moe_lib.MoeMlp(self.moe, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                          gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="Moe")(y, train=train)


class MoeEncoder(Encoder):
  """An ``Encoder`` with MoE MLPs in the blocks ``moe.layers`` (same parameter names
  elsewhere, so a dense checkpoint loads into every other block unchanged)."""
  block_type = MoeBlock
  moe: Optional[moe_lib.MoeSettings] = None

  def make_block(self, index: Optional[int], name: str, drop_path_rate: float = 0.0,
                 **settings) -> nn.Module:
    moe = self.moe if index in self.moe.layers else None
    return super().make_block(index, name, drop_path_rate, moe=moe, **settings)


class VisionTransformer(nn.Module):
  """ViT classifier. Call with NHWC images; returns float32 logits (or features).

  Attributes:
    num_classes: size of the head; 0 returns the pooled (pre-logits) features.
    image_size: the resolution the position embedding is built for.
    classifier: "token" (class token), "gap" (mean of the tokens after the final
      norm) or "map" (multihead attention pooling, as in big_vision/SigLIP).
    posemb: "learn" or "sincos2d" (fixed, no parameters).
    representation_size: width of the optional tanh pre-logits layer.
    drop_path_rate: stochastic depth at the last block; rises linearly from 0.
    attention: "softmax" (the ViT) or "linear" (non-causal linear attention with
      feature map ``linear_feature_map``, Katharopoulos et al. 2020; same parameters).
    attention_impl: "xla" (reference), "pallas" (fused kernels) or "auto"; see
      ``vit_jax.kernels``. Switching it never changes the outputs beyond float
      tolerance. "cudnn" is accepted for softmax attention on GPU.
    remat_policy: "none", "full" or a ``jax.checkpoint_policies`` name (see above).
    scan_layers: run the blocks as one ``nn.scan`` (stacked block parameters).
    pre_norm: LayerNorm before the blocks (CLIP image towers).
    patch_bias: whether the patch embedding has a bias (CLIP's has none).
    norm_epsilon: epsilon of every LayerNorm in the encoder (1e-6; CLIP uses 1e-5).
    token_merging: ToMe's ``r``, tokens merged in every block (an int) or per block
      (a tuple); 0 is the plain model. As in ToMe, a block merges at most half of
      its unprotected tokens (``effective_token_merging`` says what each block
      merges). See ``token_reduction``.
    token_keep_rate: EViT's fraction of patch tokens kept in ``token_keep_layers``
      (default: the blocks at 1/4, 1/2 and 3/4 depth); 1.0 is the plain model.
    flexi_patch_size: FlexiViT: run at this patch size. The ``embedding`` kernel stays
      stored at ``patch_size`` (any checkpoint loads unchanged) and is resized per
      call by ``flexi_resize`` ("pi": pseudo-inverse resize; "bilinear": the naive
      baseline); the learned position table stays stored for ``image_size /
      patch_size`` and is resampled (bilinear) to the input's grid, so any input
      whose sides divide by ``flexi_patch_size`` runs. None: the plain model.
    token_pruning: DynamicViT's keep ratio ``rho``: before the ``s``-th of
      ``token_pruning_layers`` (default as EViT's) a learned predictor keeps
      ``int(rho**s * n)`` of the ``n`` patch tokens; 1.0 is the plain model.
    token_pruning_ratio_weight: DynamicViT's keep-ratio loss weight (the paper's
      2.0): in training each pruning block sows ``weight / stages * mean_b (mean of
      its keep marks - rho**s)**2`` into the ``aux`` collection, which the
      classification trainer adds to the loss (as MoE's auxiliary losses).
    qk_norm: per-head LayerNorm of queries and keys (vmoe's Soft MoE models).
    attention_softmax: "softmax" (the ViT), "clipped" (``clip((softmax_zeta -
      softmax_gamma) * softmax + softmax_gamma, 0, 1)``, Quantizable Transformers) or
      "shiftmax" (I-ViT's integer softmax); see ``robust_ops``. Needs the XLA
      attention (``attention_impl="xla"``): the fused kernels have the plain softmax.
    attention_gate: gated attention (Quantizable Transformers): each head's output
      times a sigmoid gate from its token (``MultiHeadDotProductAttention_1/gate``).
    mlp_activation: "gelu" or "shiftgelu" (I-ViT's integer GELU).
    norm_type: "layernorm" or "ilayernorm" (I-ViT's integer LayerNorm, same
      parameters) for every LayerNorm of the encoder.
    moe: mixture-of-experts MLPs, a mapping of ``moe_lib.MoeSettings`` fields
      (``layers``, ``num_experts``, ``router`` "soft" | "top1" | "top2",
      ``capacity_factor``, ``num_slots``, ...); None or empty ``layers``: dense.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """
  num_classes: int = 1000
  image_size: Union[int, Sequence[int]] = 224
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  classifier: str = "token"
  posemb: str = "learn"
  representation_size: Optional[int] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  head_zeroinit: bool = True
  gelu_approximate: bool = False
  attention: str = "softmax"
  attention_impl: str = "xla"
  linear_feature_map: str = "elu+1"
  remat_policy: str = "none"
  scan_layers: bool = False
  pre_norm: bool = False
  patch_bias: bool = True
  norm_epsilon: float = 1e-6
  token_merging: Union[int, Sequence[int]] = 0
  token_keep_rate: float = 1.0
  token_keep_layers: Optional[Sequence[int]] = None
  flexi_patch_size: Optional[int] = None
  flexi_resize: str = "pi"
  token_pruning: float = 1.0
  token_pruning_layers: Optional[Sequence[int]] = None
  token_pruning_ratio_weight: float = 2.0
  qk_norm: bool = False
  moe: Optional[Mapping[str, Any]] = None
  attention_softmax: str = "softmax"
  softmax_zeta: float = 1.0
  softmax_gamma: float = -0.03
  attention_gate: bool = False
  mlp_activation: str = "gelu"
  norm_type: str = "layernorm"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def run_patch_size(self) -> int:
    """The patch size the model runs at (``flexi_patch_size`` or ``patch_size``)."""
    return self.patch_size if self.flexi_patch_size is None else self.flexi_patch_size

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens in front of the patches (token reduction never merges them)."""
    return 1 if self.classifier == "token" else 0

  def _attention_fn(self) -> Callable:
    if self.attention not in ("softmax", "linear"):
      raise ValueError(f"attention must be 'softmax' or 'linear', got {self.attention!r}")
    if self.attention == "linear":
      if self.attention_dropout_rate:
        raise ValueError("attention='linear' has no attention weights to drop: set "
                         "attention_dropout_rate=0")
      return kernels.linear_attention_fn(self.attention_impl,
                                         feature_map=self.linear_feature_map)
    if self.attention_softmax != "softmax":
      if self.attention_impl != "xla":
        raise ValueError(f"attention_softmax={self.attention_softmax!r} runs in the "
                         "XLA attention only; set attention_impl='xla' (the fused "
                         f"{self.attention_impl!r} kernels compute the plain softmax)")
      return functools.partial(layers.dot_product_attention, softmax_fn=robust_ops.softmax_fn(
          self.attention_softmax, zeta=self.softmax_zeta, gamma=self.softmax_gamma))
    if self.attention_impl == "xla":
      return layers.dot_product_attention  # exactly the original model
    if (self.attention_impl in ("pallas", "pallas_triton")
        and any(np.atleast_1d(self.token_merging))):
      logging.log_first_n(
          logging.WARNING, "token_merging: proportional attention adds log(token size) "
          f"to the logits and the flash kernel ({self.attention_impl!r}) takes no bias; "
          "using the XLA attention (attention_impl='xla') instead", 1)
      return layers.dot_product_attention
    return kernels.attention_fn(self.attention_impl)

  def _check_config(self):
    if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be 'none' or one of {sorted(REMAT_POLICIES)}, "
                       f"got {self.remat_policy!r}")
    if self.classifier not in ("token", "gap", "map"):
      raise ValueError(f"classifier must be 'token', 'gap' or 'map', got {self.classifier!r}")
    if self.posemb not in ("learn", "sincos2d"):
      raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
    if self.flexi_patch_size is not None and (
        not isinstance(self.flexi_patch_size, (int, np.integer))
        or isinstance(self.flexi_patch_size, bool) or self.flexi_patch_size < 1):
      raise ValueError("flexi_patch_size must be a positive integer (the patch size to "
                       f"resize the {self.patch_size}x{self.patch_size} kernel to), got "
                       f"{self.flexi_patch_size!r}")
    if self.flexi_resize not in _resample().PATCH_KERNEL_METHODS:
      raise ValueError(f"flexi_resize must be one of {_resample().PATCH_KERNEL_METHODS}, "
                       f"got {self.flexi_resize!r}")
    robust_ops.check_settings(
        attention_softmax=self.attention_softmax, softmax_zeta=self.softmax_zeta,
        softmax_gamma=self.softmax_gamma, mlp_activation=self.mlp_activation,
        norm_type=self.norm_type, attention=self.attention,
        attention_dropout_rate=self.attention_dropout_rate)
    token_reduction.check_settings(
        token_merging=self.token_merging, token_keep_rate=self.token_keep_rate,
        num_prefix_tokens=self.num_prefix_tokens, scan_layers=self.scan_layers,
        attention=self.attention, attention_dropout_rate=self.attention_dropout_rate,
        token_pruning=self.token_pruning,
        token_pruning_ratio_weight=self.token_pruning_ratio_weight)
    if self.moe_settings is not None:
      if self.scan_layers:
        raise ValueError("moe: MoE blocks differ from the dense ones, so the blocks "
                         "cannot be scanned; set scan_layers=False")
      if any(np.atleast_1d(self.token_merging)) or self.token_keep_rate < 1.0 or self.token_pruning < 1.0:
        raise ValueError("moe cannot be combined with token_merging/token_keep_rate/token_pruning "
                         "(token reduction builds its own blocks)")

  @property
  def block_ops(self) -> robust_ops.BlockOps:
    return robust_ops.BlockOps(attention_gate=bool(self.attention_gate),
                               activation=self.mlp_activation, norm=self.norm_type)

  def effective_token_merging(self, image_size: Union[int, Sequence[int], None] = None
                              ) -> tuple[int, ...]:
    """ToMe's ``r`` per block as the blocks merge it for ``image_size`` inputs (default:
    the model's): ``token_merging`` with each block clamped to half of its unprotected
    tokens (``token_reduction.effective_merge_schedule``). The tokens left after the
    last block are the input tokens minus the sum."""
    height, width = layers.to_2tuple(image_size or self.image_size)
    patches = (height // self.run_patch_size) * (width // self.run_patch_size)
    return token_reduction.effective_merge_schedule(
        token_reduction.merge_schedule(self.token_merging, self.num_layers),
        patches + self.num_prefix_tokens, self.num_prefix_tokens)

  @property
  def moe_settings(self) -> Optional[moe_lib.MoeSettings]:
    return moe_lib.MoeSettings.from_mapping(self.moe, self.num_layers)

  def patch_grid(self, height: int, width: int) -> tuple[int, int]:
    """The token grid for an input size, or a ValueError naming the constraint."""
    expected = layers.to_2tuple(self.image_size)
    p = self.run_patch_size
    if height % p or width % p:
      # Suggest the nearest sizes that work (the model's own image_size may not).
      down = f"{max(height // p, 1) * p}x{max(width // p, 1) * p}"
      up = f"{-(-height // p) * p}x{-(-width // p) * p}"
      raise ValueError(
          f"ViT with patch size {p} needs image sides divisible by {p}; got "
          f"{height}x{width}. Resize or crop the input (e.g. to {down} or {up}).")
    # FlexiViT resamples the learned table to any grid.
    if ((height, width) != expected and self.posemb == "learn"
        and self.flexi_patch_size is None):
      raise ValueError(
          f"this ViT's learned position embedding is built for {expected[0]}x"
          f"{expected[1]} images ({expected[0] // p}x{expected[1] // p} patches); got "
          f"{height}x{width}. Create the model with image_size=({height}, {width}) "
          "and resample the position embedding when loading weights.")
    return height // p, width // p

  # Dtypes from configs may be names ("bfloat16").
  @property
  def compute_dtype(self) -> Any:
    return layers.canonical_dtype(self.dtype)

  @property
  def storage_dtype(self) -> Any:
    return layers.canonical_dtype(self.param_dtype)

  def embed_patches(self, images: Array) -> tuple[Array, tuple[int, int]]:
    """NHWC images -> patch tokens ``[B, gh * gw, hidden_size]`` and the grid."""
    layers.check_images(images)
    gh, gw = self.patch_grid(images.shape[1], images.shape[2])
    if self.flexi_patch_size is not None:
      x = FlexiPatchEmbed(self.hidden_size, self.patch_size, self.flexi_patch_size,
                          resize_method=self.flexi_resize, use_bias=self.patch_bias,
                          dtype=self.compute_dtype, param_dtype=self.storage_dtype,
                          name="embedding")(images)
      return x.reshape(x.shape[0], gh * gw, self.hidden_size), (gh, gw)
    x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                use_bias=self.patch_bias, dtype=self.compute_dtype,
                param_dtype=self.storage_dtype, name="embedding")(
                    images.astype(self.compute_dtype))
    return x.reshape(x.shape[0], gh * gw, self.hidden_size), (gh, gw)

  def add_fixed_position_embedding(self, x: Array, grid: tuple[int, int]) -> Array:
    """The ``sincos2d`` table on the patch tokens (learned tables live in the encoder)."""
    if self.posemb != "sincos2d":
      return x
    return x + layers.posemb_sincos_2d(*grid, self.hidden_size, dtype=self.compute_dtype)

  def add_prefix_tokens(self, x: Array) -> Array:
    """The class token (``classifier="token"``) in front of the patch tokens."""
    if self.classifier != "token":
      return x
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size),
                     self.storage_dtype)
    return jnp.concatenate([jnp.tile(cls.astype(self.compute_dtype), [x.shape[0], 1, 1]),
                            x], axis=1)

  encoder_type = Encoder  # what make_encoder builds (a class attribute, not a field)

  def make_encoder(self, **settings) -> nn.Module:
    """The ``Transformer`` module, an ``encoder_type`` built with the model's settings
    plus ``settings`` (a subclass's own fields, e.g. MAE's visible-patch indices).

    With token reduction set, a ``TokenReductionEncoder`` (same parameters, plus
    DynamicViT's ``score_predictor`` in its pruning blocks).
    """
    encoder = self.encoder_type
    schedule = token_reduction.merge_schedule(self.token_merging, self.num_layers)
    reduces = any(schedule) or self.token_keep_rate < 1.0 or self.token_pruning < 1.0
    if encoder is not Encoder and (reduces or self.moe_settings is not None):
      raise ValueError(f"{type(self).__name__} builds its own encoder "
                       f"({encoder.__name__}); it cannot be combined with token "
                       "reduction or moe")
    if reduces:
      encoder = TokenReductionEncoder
      settings = dict(
          settings, token_merging=schedule, token_keep_rate=self.token_keep_rate,
          token_keep_layers=token_reduction.keep_layers(self.token_keep_layers,
                                                        self.num_layers),
          token_pruning=self.token_pruning,
          token_pruning_ratio_weight=self.token_pruning_ratio_weight,
          token_pruning_layers=token_reduction.keep_layers(
              self.token_pruning_layers, self.num_layers, "token_pruning_layers"),
          num_prefix_tokens=self.num_prefix_tokens)
    if self.moe_settings is not None:
      encoder, settings = MoeEncoder, dict(settings, moe=self.moe_settings)
    return encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim,
                   num_heads=self.num_heads, learned_posemb=self.posemb == "learn",
                   pre_norm=self.pre_norm, dropout_rate=self.dropout_rate,
                   attention_dropout_rate=self.attention_dropout_rate,
                   drop_path_rate=self.drop_path_rate,
                   gelu_approximate=self.gelu_approximate,
                   attention_fn=self._attention_fn(), remat_policy=self.remat_policy,
                   scan_layers=self.scan_layers, norm_epsilon=self.norm_epsilon,
                   posemb_grid=self.stored_posemb_grid, qk_norm=self.qk_norm,
                   ops=self.block_ops, dtype=self.compute_dtype,
                   param_dtype=self.storage_dtype, name="Transformer", **settings)

  @property
  def stored_posemb_grid(self) -> Optional[tuple[int, int]]:
    """The grid the learned table is stored for when it is resampled per call."""
    if self.flexi_patch_size is None:
      return None
    h, w = layers.to_2tuple(self.image_size)
    return h // self.patch_size, w // self.patch_size

  def pool(self, x: Array) -> Array:
    """Normed tokens -> one vector per image (``classifier``)."""
    if self.classifier == "token":
      return x[:, 0]
    if self.classifier == "gap":
      return jnp.mean(x, axis=1)
    return layers.MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                          gelu_approximate=self.gelu_approximate, dtype=self.compute_dtype,
                          param_dtype=self.storage_dtype, name="MAPHead_0")(x)

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """Images -> the encoder's normed tokens (prefix tokens first)."""
    x, grid = self.embed_patches(images)
    x = self.add_prefix_tokens(self.add_fixed_position_embedding(x, grid))
    return self.make_encoder()(x, grid=grid, train=train)

  def forward_head(self, x: Array, *, train: bool = False) -> Any:
    """Normed tokens -> float32 logits (the pooled features when ``num_classes=0``)."""
    del train
    x = self.pool(x)
    if self.representation_size is not None:
      x = jnp.tanh(layers.Dense(self.representation_size, dtype=self.compute_dtype,
                                param_dtype=self.storage_dtype, name="pre_logits")(x))
    return layers.classifier_head(self, x, self.num_classes,
                                  kernel_init=layers.head_init(self.head_zeroinit),
                                  dtype=self.compute_dtype, param_dtype=self.storage_dtype)

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Any:
    self._check_config()
    return self.forward_head(self.forward_features(images, train=train), train=train)


@register_timm_converter("vit")
def convert_timm_vit(state: StateDict, model: VisionTransformer) -> dict:
  """timm ``VisionTransformer`` state dict -> vision_transformer-layout params.

  Matches timm models with a class token or MAP pooling (``global_pool="map"``);
  timm's average pooling applies its norm after pooling, which this layout does not.
  """
  encoder = {"encoder_norm": state.norm("norm")}
  if model.posemb == "learn":
    encoder["posembed_input"] = {"pos_embedding": state.take("pos_embed")}
  if model.pre_norm:
    encoder["norm_pre"] = state.norm("norm_pre")
  for i in range(model.num_layers):
    block = f"blocks.{i}"
    encoder[f"encoderblock_{i}"] = {
        "LayerNorm_0": state.norm(f"{block}.norm1"),
        "MultiHeadDotProductAttention_1": layers.timm_attention_params(
            state, f"{block}.attn", model.num_heads),
        "LayerNorm_2": state.norm(f"{block}.norm2"),
        "MlpBlock_3": layers.timm_mlp_params(state, f"{block}.mlp"),
    }
  params = {"embedding": state.conv("patch_embed.proj", bias=model.patch_bias),
            "Transformer": encoder}
  if model.classifier == "token":
    params["cls"] = state.take("cls_token")
  if model.classifier == "map":
    params["MAPHead_0"] = {
        "probe": state.take("attn_pool.latent"),
        "MultiHeadDotProductAttention_0": layers.timm_attention_params(
            state, "attn_pool", model.num_heads, linears=layers.Q_KV),
        "LayerNorm_0": state.norm("attn_pool.norm"),
        "MlpBlock_0": layers.timm_mlp_params(state, "attn_pool.mlp"),
    }
  if model.num_classes:
    params["head"] = state.linear("head")
  return stack_block_params(params) if model.scan_layers else params


_BLOCK = re.compile(r"^encoderblock_(\d+)$")


def stack_block_params(tree: Mapping[str, Any]) -> dict:
  """``encoderblock_{i}/...`` subtrees -> one ``encoderblock/...`` stacked on axis 0.

  Works on any nested dict holding ViT block trees: parameters, the optimizer state
  (``mu``/``nu``/``trace`` mirror the parameters) or a whole checkpoint read with
  ``vit_jax.checkpoint.load_state_arrays``. Use it to load an unscanned checkpoint
  or converted weights into a ``scan_layers=True`` model.
  """
  if not isinstance(tree, Mapping):
    return tree
  blocks = {int(m.group(1)): k for k in tree if (m := _BLOCK.match(str(k)))}
  out = {k: stack_block_params(v) for k, v in tree.items() if k not in blocks.values()}
  if blocks:
    if sorted(blocks) != list(range(len(blocks))):
      raise ValueError(f"encoder blocks are not numbered 0..{len(blocks) - 1}: "
                       f"{sorted(blocks)}")
    layers_ = [stack_block_params(tree[blocks[i]]) for i in range(len(blocks))]
    out["encoderblock"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                       *layers_)
  return out


def unstack_block_params(tree: Mapping[str, Any]) -> dict:
  """The inverse of ``stack_block_params``: ``encoderblock`` -> ``encoderblock_{i}``."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: unstack_block_params(v) for k, v in tree.items() if k != "encoderblock"}
  if "encoderblock" in tree:
    stacked = tree["encoderblock"]
    depth = {np.shape(x)[0] for x in jax.tree.leaves(stacked)}
    if len(depth) != 1:
      raise ValueError(f"stacked encoder block arrays disagree on depth: {sorted(depth)}")
    for i in range(depth.pop()):
      out[f"encoderblock_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
  return out


def _register_variants():
  """Registers timm-style names: vit_{size}_patch{p}_{res} for every size and patch."""
  for size, dims in VARIANTS.items():
    for patch in PATCH_SIZES:
      resolutions = (224, 384) if patch in (16, 32) else (224,)
      for res in resolutions:
        name = f"vit_{size}_patch{patch}_{res}"
        defaults = dict(dims, patch_size=patch, image_size=res)
        register_variant(name, VisionTransformer, defaults, family="vit", image_size=res,
                         doc=f"ViT-{size[0].upper()}/{patch} at {res}x{res}.")


# CLIP image towers under timm's names (OpenAI CLIP / open_clip layout: pre-norm, no
# patch bias, LayerNorm epsilon 1e-5); the two-tower models in two_tower.py use them.
CLIP_VARIANTS = {
    "vit_base_patch32_clip_224": dict(VARIANTS["base"], patch_size=32),
    "vit_base_patch16_clip_224": dict(VARIANTS["base"], patch_size=16),
    "vit_large_patch14_clip_224": dict(VARIANTS["large"], patch_size=14),
}


def _register_clip_variants():
  for name, dims in CLIP_VARIANTS.items():
    defaults = dict(dims, image_size=224, pre_norm=True, patch_bias=False,
                    norm_epsilon=1e-5)
    register_variant(name, VisionTransformer, defaults, family="vit", image_size=224,
                     doc=f"CLIP image tower {name} (pre-norm, no patch bias).")


# Mixture-of-experts ViTs under vmoe's configurations (google-research/vmoe):
# V-MoE (configs/vmoe_paper/common.py: K=2, E=8, MoE in every 2nd block or the last
# 2 odd ones, capacity factor 1.05, noise 1/E, importance and load loss weights 0.005,
# pre-logits of the model width; V-MoE's S is 512 wide, 8 deep) and Soft MoE
# (projects/soft_moe/configs: MoE in the last n blocks, one slot per expert, GAP, QK
# norm). Every setting stays overridable, e.g. moe=dict(..., router="top1").
VMOE_SIZES = {"s": dict(hidden_size=512, num_layers=8, mlp_dim=2048, num_heads=8),
              "b": VARIANTS["base"], "l": VARIANTS["large"], "h": VARIANTS["huge"]}
VMOE_VARIANTS = {  # name: (size, patch, experts, k, where ("every" | "last"), count)
    "vmoe_s32_e8_top2_last2": ("s", 32, 8, 2, "last", 2),
    "vmoe_b32_e8_top2": ("b", 32, 8, 2, "every", 2),
    "vmoe_b16_e8_top2": ("b", 16, 8, 2, "every", 2),
    "vmoe_l16_e8_top2": ("l", 16, 8, 2, "every", 2),
}
SOFT_MOE_VARIANTS = {  # name: (size, patch, experts, last n blocks)
    "vit_s16_softmoe_128e": ("small", 16, 128, 6),
    "vit_s14_softmoe_256e": ("small", 14, 256, 6),
    "vit_b16_softmoe_128e": ("base", 16, 128, 6),
    "vit_l16_softmoe_128e": ("large", 16, 128, 12),
    "vit_h14_softmoe_256e": ("huge", 14, 256, 16),
}


def _register_moe_variants():
  for name, (size, patch, experts, k, where, count) in VMOE_VARIANTS.items():
    dims = VMOE_SIZES[size]
    depth = dims["num_layers"]
    moe_layers = (tuple(range(count - 1, depth, count)) if where == "every"
                  else tuple(range(1, depth, 2))[-count:])
    defaults = dict(dims, patch_size=patch, image_size=224,
                    representation_size=dims["hidden_size"],
                    moe=dict(layers=moe_layers, num_experts=experts, router=f"top{k}",
                             capacity_factor=1.05, noise_std=1.0,
                             importance_loss_weight=0.005, load_loss_weight=0.005))
    register_variant(name, VisionTransformer, defaults, family="vit", image_size=224,
                     doc=f"V-MoE-{size.upper()}/{patch}, E={experts}, K={k}, MoE in "
                         f"blocks {moe_layers}.")
  for name, (size, patch, experts, last) in SOFT_MOE_VARIANTS.items():
    dims = VARIANTS[size]
    moe_layers = tuple(range(dims["num_layers"]))[-last:]
    defaults = dict(dims, patch_size=patch, image_size=224, classifier="gap",
                    qk_norm=True, moe=dict(layers=moe_layers, num_experts=experts,
                                           router="soft", num_slots=1))
    register_variant(name, VisionTransformer, defaults, family="vit", image_size=224,
                     doc=f"Soft MoE {size}/{patch} with {experts} experts (1 slot each) "
                         f"in the last {last} blocks.")


_register_variants()
_register_clip_variants()
_register_moe_variants()
