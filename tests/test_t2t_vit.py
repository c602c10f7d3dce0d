"""T2T-ViT family: parameter counts of the official code, the soft split, training.

T2T-ViT is not in timm and no reference model runs offline, so the tokenizer's soft
split is checked against a direct implementation of ``torch.nn.Unfold``'s definition,
and the parameter counts against the official configuration.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheap_compiles import cheap_compiles  # noqa: F401  (autouse: cheaper XLA compiles)
from helpers import train_in_process
from vit_jax import models
from vit_jax.models import t2t_vit

# Parameter counts of the official models (yitu-opensource/T2T-ViT, models/t2t_vit.py:
# T2T_ViT(embed_dim, depth, num_heads, mlp_ratio=3, token_dim=64), qkv_bias=False),
# counted with a 1000-class head, twice: by hand, layer by layer, from its constructors,
# and with sum(p.numel()) over a torch re-build of those constructors' parameter-owning
# modules (models/t2t_vit.py, token_performer.py, token_transformer.py,
# transformer_block.py) in a one-off script on the meta device; both agree:
#   T2T layer 1: LayerNorm(147) + Linear(147, 192) [performer: with bias; transformer
#     "qkv": without] + Linear(64, 64) + LayerNorm(64) + MLP 64->64->64
#   T2T layer 2: the same from 576 = 64 * 3 * 3 input features
#   project Linear(576, D); cls token D; blocks: 2 LayerNorm(D) + Linear(D, 3D) no bias
#     + Linear(D, D) + MLP D->3D->D; final LayerNorm(D); head Linear(D, 1000).
# TRAINABLE counts the parameters with requires_grad, which are this model's "params".
# The official models also register two frozen tensors as parameters: the Performer
# random features (32 x 64 per T2T layer) and the sinusoid position table ((N+1) x D,
# N = 196 at 224). With them the totals are 21.55M / 39.18M / 64.11M, which round to the
# paper's 21.5M / 39.2M / 64.1M (without them 39.1M and 64.0M would not).
TRAINABLE = {
    "t2t_vit_14": 21_465_806,
    "t2t_vit_19": 39_085_070,
    "t2t_vit_24": 64_000_974,
    "t2t_vit_t_14": 21_465_422,
    "t2t_vit_t_19": 39_084_686,
    "t2t_vit_t_24": 64_000_590,
}
OFFICIAL_TOTAL = {  # sum(p.numel() for p in model.parameters()) of the official models
    "t2t_vit_14": 21_545_550,
    "t2t_vit_19": 39_177_422,
    "t2t_vit_24": 64_105_934,
}
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, token_dim=16, num_classes=10)


def test_every_registered_t2t_vit_has_an_exact_count():
  assert sorted(models.list_models(family="t2t_vit")) == sorted(TRAINABLE)


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_param_count(name):
  """Exact trainable count; with the frozen tensors, the official total (performer)."""
  model = models.create(name)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                             jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert size(variables["params"]) == TRAINABLE[name]
  if name in OFFICIAL_TOTAL:
    assert set(variables) == {"params", "constants"}
    table = (14 * 14 + 1) * model.hidden_size  # the sinusoid position table
    assert size(variables["params"]) + size(variables["constants"]) + table == (
        OFFICIAL_TOTAL[name])
  else:
    assert set(variables) == {"params"}


def test_param_count_api():
  assert models.param_count("t2t_vit_14") == TRAINABLE["t2t_vit_14"]


def unfold_reference(x: np.ndarray, kernel: int, stride: int, padding: int) -> np.ndarray:
  """torch.nn.Unfold by its definition, as NHWC: feature index c * k * k + i * k + j."""
  batch, height, width, channels = x.shape
  padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h = (height + 2 * padding - kernel) // stride + 1
  out_w = (width + 2 * padding - kernel) // stride + 1
  out = np.zeros((batch, out_h, out_w, channels * kernel * kernel), x.dtype)
  for y in range(out_h):
    for xx in range(out_w):
      for c in range(channels):
        for i in range(kernel):
          for j in range(kernel):
            out[:, y, xx, c * kernel * kernel + i * kernel + j] = (
                padded[:, y * stride + i, xx * stride + j, c])
  return out


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 13, 10, 3), 7, 4, 2),   # the first soft split, non-square and uneven sides
    ((1, 7, 7, 5), 3, 2, 1),     # the later ones
    ((1, 8, 6, 2), 3, 2, 1),
])
def test_soft_split_equals_unfold(shape, kernel, stride, padding):
  x = np.random.RandomState(0).randn(*shape).astype(np.float32)
  ours = np.asarray(t2t_vit.soft_split(jnp.asarray(x), kernel, stride, padding))
  np.testing.assert_array_equal(ours, unfold_reference(x, kernel, stride, padding))


def test_sinusoid_table():
  table = t2t_vit.sinusoid_table(5, 6)[0]
  pos, j = 3, 4  # even channel: sin(pos / 10000^(2 * (j // 2) / d))
  np.testing.assert_allclose(table[pos, j], np.sin(pos / 10000 ** (4 / 6)), rtol=1e-6)
  np.testing.assert_allclose(table[pos, j + 1], np.cos(pos / 10000 ** (4 / 6)), rtol=1e-6)
  np.testing.assert_array_equal(table[0, 1::2], 1.0)


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_token_grid_and_layer_shapes(tokens_type):
  model = models.create("t2t_vit_14", tokens_type=tokens_type, **TINY)
  variables, (_, inter) = jax.eval_shape(
      lambda x: (model.init(jax.random.key(0), x),
                 models.forward_intermediates(model, model.init(jax.random.key(0), x), x)),
      jax.ShapeDtypeStruct((2, 48, 32, 3), jnp.float32))
  assert inter["block_0"].shape == (2, 1 + 3 * 2, 32)  # side / 16 tokens, plus cls
  t2t = variables["params"]["tokens_to_token"]
  first = "kqv" if tokens_type == "performer" else "qkv"
  assert t2t["attention1"][first]["kernel"].shape == (3 * 7 * 7, 3 * 16)
  assert t2t["attention2"][first]["kernel"].shape == (16 * 3 * 3, 3 * 16)
  assert t2t["project"]["kernel"].shape == (16 * 3 * 3, 32)
  if tokens_type == "performer":
    constants = variables["constants"]["tokens_to_token"]
    assert constants["attention1"]["random_features"].shape == (8, 16)  # m = 16 / 2
  else:
    assert "constants" not in variables and "bias" not in t2t["attention1"]["qkv"]


def test_performer_features_are_frozen_orthogonal_and_dropout_trains_only():
  model = models.create("t2t_vit_14", **TINY)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  omega = variables["constants"]["tokens_to_token"]["attention1"]["random_features"]
  # Orthogonal rows scaled by sqrt(m), as the official init.
  np.testing.assert_allclose(omega @ omega.T, 8 * np.eye(8), atol=1e-4)
  apply = jax.jit(lambda v, x, key: (
      model.apply(v, x), model.apply(v, x, train=True, rngs={"dropout": key})))
  logits, train = apply(variables, images, jax.random.key(2))
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  # The Performer layers' own dropout (0.1, as the official code) acts in training.
  assert not np.allclose(train, logits, atol=1e-5)


def test_performer_attention_is_a_normalised_average_of_values():
  """FAVOR+ weights are positive and sum to one: constant values pass through unchanged."""
  layer = t2t_vit.TokenPerformer(features=8, dropout_rate=0.0)
  # Threefry keys whatever the session's default PRNG: with other draws a token's FAVOR+
  # normaliser can be ~1e-5, where the official 1e-8 added to it shows at 1e-3 relative.
  key = lambda seed: jax.random.key(seed, impl="threefry2x32")
  x = jax.random.normal(key(0), (1, 5, 12))
  variables = jax.jit(layer.init)(key(1), x)
  params = jax.tree.map(lambda p: p, variables["params"])
  # Values: the same vector c for every token (zero kernel, bias c); identity proj;
  # the MLP's output layer zeroed. Then y = v + attention(v) = 2c for every token.
  kqv = params["kqv"]
  kqv["kernel"] = kqv["kernel"].at[:, 16:].set(0.0)
  kqv["bias"] = kqv["bias"].at[16:].set(jnp.arange(8.0))
  params["proj"] = {"kernel": jnp.eye(8), "bias": jnp.zeros(8)}
  params["mlp"]["Dense_1"] = jax.tree.map(jnp.zeros_like, params["mlp"]["Dense_1"])
  out = jax.jit(layer.apply)({**variables, "params": params}, x)
  # rtol: the official 1e-8 added to the normaliser shows at ~1e-6 relative.
  np.testing.assert_allclose(out, jnp.broadcast_to(2 * jnp.arange(8.0), (1, 5, 8)),
                             rtol=1e-5, atol=1e-6)


def test_trains(tfds_dir, tmp_path):
  """Through the real trainer, with the frozen Performer features in the model state."""
  result = train_in_process(tfds_dir, tmp_path, "t2t_vit_14", steps=30,
                            learning_rate=3e-3, **{**TINY, "num_classes": 10})
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0] - 0.2, losses
