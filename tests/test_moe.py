"""Mixture-of-experts layers (vit_jax/models/moe.py) against explicit numpy loops.

The references route token by token and expert by expert in float64, filling each
expert's buffer in priority order and dropping what does not fit, so they check the
vectorised one-hot/cumsum routing, the dispatch/combine einsums and the vmapped
experts together.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, subprocess_env
from vit_jax.models import moe

TOKENS, DIM, HIDDEN, EXPERTS, BATCH = 8, 8, 16, 4, 3


erf = np.vectorize(math.erf)


def gelu(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def expert_mlp(params, e, x):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64)[e], params["Experts"])
  h = gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def random_variables(module, x, seed=1):
  """Initialised, then every leaf redrawn so that the experts differ."""
  variables = jax.jit(module.init)(jax.random.key(0), x)
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [0.5 * jax.random.normal(k, leaf.shape) if leaf.ndim else leaf
            for k, leaf in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, leaves)


def top_k_reference(params, x, k, capacity_factor, batch_priority, renormalize):
  """Per image: each token's k best experts; buffers fill 1st choices first."""
  kernel = np.asarray(params["Router"]["dense"]["kernel"], np.float64)
  out = np.zeros_like(x)
  dropped = 0
  cap = math.ceil(TOKENS * k * capacity_factor / EXPERTS)
  for g in range(x.shape[0]):
    logits = x[g] @ kernel
    gates = np.exp(logits - logits.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    choices = [np.argsort(-gates[s], kind="stable")[:k] for s in range(TOKENS)]
    order = (np.argsort(-gates.max(-1), kind="stable") if batch_priority
             else np.arange(TOKENS))
    filled = [0] * EXPERTS
    kept = [[] for _ in range(TOKENS)]
    for rank in range(k):
      for s in order:
        e = choices[s][rank]
        if filled[e] < cap:
          filled[e] += 1
          kept[s].append(e)
        else:
          dropped += 1
    for s in range(TOKENS):
      total = sum(gates[s][e] for e in choices[s]) if renormalize else 1.0
      for e in kept[s]:
        out[g, s] += gates[s][e] / total * expert_mlp(params, e, x[g, s])
  return out, dropped / (x.shape[0] * TOKENS * k)


@pytest.fixture(scope="module", autouse=True)
def expert_parallel_run(tmp_path_factory):
  """tests/moe_sharding_worker.py on 8 virtual devices, started first and read by the
  last test, so that its compiles overlap the tests in between."""
  out = tmp_path_factory.mktemp("moe8") / "out.json"
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "moe_sharding_worker.py"), str(out)],
      env=subprocess_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  yield proc, out
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def tokens():
  return np.asarray(jax.random.normal(jax.random.key(7), (BATCH, TOKENS, DIM)), np.float32)


@pytest.mark.parametrize("router,capacity_factor,batch_priority,renormalize", [
    ("top1", 1.0, False, False),
    ("top1", 0.5, True, False),  # capacity 1: most tokens dropped
    ("top2", 0.5, False, True),
    ("top2", 0.75, True, False),
])
def test_top_k_layer_equals_a_per_token_loop(tokens, router, capacity_factor,
                                              batch_priority, renormalize):
  settings = moe.MoeSettings(layers=(0,), num_experts=EXPERTS, router=router,
                             capacity_factor=capacity_factor,
                             batch_priority=batch_priority, renormalize=renormalize)
  layer = moe.MoeMlp(settings, mlp_dim=HIDDEN)
  variables = random_variables(layer, tokens)
  out, state = jax.jit(lambda v, x: layer.apply(v, x, train=False, mutable=["aux"]))(
      variables, tokens)
  expected, dropped = top_k_reference(variables["params"], tokens.astype(np.float64),
                                      settings.k, capacity_factor, batch_priority,
                                      renormalize)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  aux_loss, metrics = moe.auxiliary_losses(state["aux"])
  np.testing.assert_allclose(metrics["moe/dropped_fraction"], dropped, atol=1e-6)
  if capacity_factor < 1:
    assert dropped > 0  # the case exercises the capacity limit
  # Importance loss: CV^2 of the summed gates, per image, averaged.
  kernel = np.asarray(variables["params"]["Router"]["dense"]["kernel"], np.float64)
  gates = jax.nn.softmax(tokens.astype(np.float64) @ kernel)
  importance = np.asarray(gates).sum(1)
  cv2 = (importance.std(-1) / importance.mean(-1)) ** 2
  np.testing.assert_allclose(metrics["moe/importance_loss"], cv2.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux_loss, settings.importance_loss_weight * cv2.mean(),
                             rtol=1e-5)


def test_batch_priority_changes_who_is_dropped(tokens):
  """Same gates, capacity 1: the two orders keep different tokens."""
  gates = jax.nn.softmax(jnp.asarray(tokens[..., :EXPERTS]) * 3)
  plain = moe.top_k_routing(gates, 1, 1, batch_priority=False)[2]
  priority = moe.top_k_routing(gates, 1, 1, batch_priority=True)[2]
  assert (np.asarray(plain) != np.asarray(priority)).any()


def test_load_loss_equals_its_definition():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, TOKENS, EXPERTS))
  noise_std = 0.3
  noisy = logits + noise_std * rng.normal(size=logits.shape)
  for k in (1, 2):
    expected = []
    for g in range(2):
      prob = np.zeros((TOKENS, EXPERTS))
      for s in range(TOKENS):
        threshold = np.sort(noisy[g, s])[::-1][k - 1]
        for e in range(EXPERTS):
          z = (threshold - logits[g, s, e]) / noise_std
          prob[s, e] = 1.0 - 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
      load = prob.mean(0)
      expected.append((load.std() / load.mean()) ** 2)
    got = moe.load_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(noisy, jnp.float32),
                        noise_std, k)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_noisy_gating_trains_with_the_load_loss(tokens):
  settings = moe.MoeSettings(layers=(0,), num_experts=EXPERTS, router="top2")
  layer = moe.MoeMlp(settings, mlp_dim=HIDDEN)
  variables = random_variables(layer, tokens)
  run = jax.jit(lambda key: layer.apply(variables, tokens, train=True, mutable=["aux"],
                                         rngs={"dropout": key}))
  (out0, state0), (out1, _) = run(jax.random.key(0)), run(jax.random.key(1))
  assert not np.allclose(out0, out1)  # the noise reaches the routing
  aux, metrics = moe.auxiliary_losses(state0["aux"])
  np.testing.assert_allclose(aux, 0.005 * (metrics["moe/importance_loss"]
                                           + metrics["moe/load_loss"]), rtol=1e-5)


def test_soft_moe_layer_equals_a_per_slot_loop(tokens):
  slots = 2
  settings = moe.MoeSettings(layers=(0,), num_experts=EXPERTS, router="soft",
                             num_slots=slots)
  layer = moe.MoeMlp(settings, mlp_dim=HIDDEN)
  variables = random_variables(layer, tokens)
  out = jax.jit(lambda v, x: layer.apply(v, x, train=False))(variables, tokens)
  params = variables["params"]
  mu = np.asarray(params["Router"]["mu"], np.float64)
  scale = float(params["Router"]["scale"])
  x = tokens.astype(np.float64)
  expected = np.zeros_like(x)
  for g in range(BATCH):
    xn = [v / math.sqrt((v ** 2).sum() + 1e-6) for v in x[g]]
    logits = np.zeros((TOKENS, EXPERTS, slots))
    for e in range(EXPERTS):
      for p in range(slots):
        m = mu[:, e, p] / math.sqrt((mu[:, e, p] ** 2).sum() + 1e-6)
        for s in range(TOKENS):
          logits[s, e, p] = xn[s] @ (scale * m)
    outputs = {}
    for e in range(EXPERTS):
      for p in range(slots):
        weights = np.exp(logits[:, e, p]) / np.exp(logits[:, e, p]).sum()
        outputs[e, p] = expert_mlp(params, e, sum(w * x[g, s] for s, w in enumerate(weights)))
    for s in range(TOKENS):
      weights = np.exp(logits[s]) / np.exp(logits[s]).sum()
      expected[g, s] = sum(weights[e, p] * outputs[e, p] for e, p in outputs)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_settings_errors_name_the_setting():
  with pytest.raises(ValueError, match="moe.router"):
    moe.MoeSettings.from_mapping(dict(layers=(1,), router="top3"), 4)
  with pytest.raises(ValueError, match=r"moe.layers.*\[7\]"):
    moe.MoeSettings.from_mapping(dict(layers=(1, 7)), 4)
  with pytest.raises(ValueError, match="num_expert"):
    moe.MoeSettings.from_mapping(dict(layers=(1,), num_expert=4), 4)
  with pytest.raises(ValueError, match="moe.dispatch must be one of"):
    moe.MoeSettings.from_mapping(dict(layers=(1,), dispatch="alltoall"), 4)
  assert moe.MoeSettings.from_mapping(dict(layers=()), 4) is None
  assert moe.MoeSettings.from_mapping(dict(layers="3,1"), 4).layers == (1, 3)


def test_ewa_layer_partitions_tokens_and_evaluates_the_mean_expert(tokens):
  """Training: every token leaves through exactly one expert, the experts share the
  tokens evenly (a numpy loop over all experts finds which); the partition changes
  with the key. Evaluation: the MLP with the experts' mean weights."""
  settings = moe.MoeSettings(layers=(0,), num_experts=EXPERTS, router="ewa")
  layer = moe.MoeMlp(settings, mlp_dim=HIDDEN)
  variables = random_variables(layer, tokens)
  assert "Router" not in variables["params"]
  run = jax.jit(lambda key: layer.apply(variables, tokens, train=True,
                                         rngs={"dropout": key}))
  x = tokens.astype(np.float64)
  candidates = np.stack([expert_mlp(variables["params"], e, x) for e in range(EXPERTS)])
  assignments = []
  for seed in (0, 1):
    out = np.asarray(run(jax.random.key(seed)), np.float64)
    close = np.all(np.abs(candidates - out[None]) < 1e-5, axis=-1)  # [E, G, S]
    assert (close.sum(0) == 1).all()  # one expert per token (the experts differ)
    expert = close.argmax(0)  # [G, S]
    for g in range(BATCH):
      np.testing.assert_array_equal(np.bincount(expert[g], minlength=EXPERTS),
                                    [TOKENS // EXPERTS] * EXPERTS)
    assignments.append(expert)
  assert (assignments[0] != assignments[1]).any()
  mean = jax.tree.map(lambda p: np.asarray(p, np.float64).mean(0)[None],
                      variables["params"]["Experts"])
  expected = expert_mlp({"Experts": mean}, 0, x)
  out = jax.jit(lambda v: layer.apply(v, tokens, train=False))(variables)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_expert_weights_averaging_equals_a_numpy_loop():
  """The optax transform against W_i <- s W_i + (1 - s) mean_{j != i} W_j, applied to
  params + updates every 2nd step only, and only to expert parameters."""
  import optax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  params = {"Transformer": {"encoderblock_1": {"Moe": {"Experts": {"Dense_0": {
      "kernel": rng.normal(size=(EXPERTS, 3, 5)), "bias": rng.normal(size=(EXPERTS, 5))}}}},
      "head": {"kernel": rng.normal(size=(3, 2))}}}
  params = jax.tree.map(lambda a: a.astype(np.float32), params)
  sgd = optax.sgd(0.1)
  assert moe.ewa_from_config(sgd, None) is sgd
  assert moe.ewa_from_config(sgd, dict(layers=(1,), router="top2")) is sgd
  # What the classification trainer chains for config.model.moe.router="ewa".
  tx = moe.ewa_from_config(sgd, dict(layers=(1,), router="ewa", ewa_share=0.3,
                                     ewa_every=2))
  state = tx.init(params)
  expected = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for step in range(1, 5):
    grads = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, expected, grads)
    if step % 2 == 0:
      for name, w in expected["Transformer"]["encoderblock_1"]["Moe"]["Experts"][
          "Dense_0"].items():
        averaged = np.empty_like(w)
        for i in range(EXPERTS):
          others = sum(w[j] for j in range(EXPERTS) if j != i) / (EXPERTS - 1)
          averaged[i] = 0.3 * w[i] + 0.7 * others
        expected["Transformer"]["encoderblock_1"]["Moe"]["Experts"]["Dense_0"][name] = averaged
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(expected)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                                 err_msg=f"step {step} {jax.tree_util.keystr(path)}")
  kernel = np.asarray(params["Transformer"]["encoderblock_1"]["Moe"]["Experts"][
      "Dense_0"]["kernel"])
  assert np.abs(kernel - kernel.mean(0)).max() > 1e-3  # not collapsed to one expert


def test_ewa_collapses_into_the_dense_vit_and_checks_its_settings():
  """collapse_ewa: the plain ViT's parameter tree, each Moe the mean of its experts
  (the evaluated MLP, checked against numpy in the layer test), the rest unchanged.
  Shapes come from eval_shape and values from numpy: no compile."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  model = models.create("vit_tiny_patch16_224", **TINY_VIT,
                        moe=dict(layers=(1,), num_experts=4, router="ewa"))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                        jax.eval_shape(model.init, jax.random.key(0), images)["params"])
  dense = models.create("vit_tiny_patch16_224", **TINY_VIT)
  dense_shapes = jax.eval_shape(dense.init, jax.random.key(0), images)["params"]
  collapsed = moe.collapse_ewa(params)
  assert jax.tree.structure(collapsed) == jax.tree.structure(dense_shapes)
  assert jax.tree.all(jax.tree.map(lambda a, s: a.shape == s.shape, collapsed, dense_shapes))
  for name in ("Dense_0", "Dense_1"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_allclose(
          collapsed["Transformer"]["encoderblock_1"]["MlpBlock_3"][name][leaf],
          params["Transformer"]["encoderblock_1"]["Moe"]["Experts"][name][leaf].mean(0),
          rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(collapsed["Transformer"]["encoderblock_0"]["MlpBlock_3"][
      "Dense_0"]["kernel"], params["Transformer"]["encoderblock_0"]["MlpBlock_3"][
          "Dense_0"]["kernel"])
  top2 = models.create("vit_tiny_patch16_224", **TINY_VIT, moe=dict(layers=(1,)))
  with pytest.raises(ValueError, match="encoderblock_1/Moe has a router"):
    moe.collapse_ewa(jax.eval_shape(top2.init, jax.random.key(0), images)["params"])
  with pytest.raises(ValueError, match="moe.ewa_share"):
    moe.MoeSettings.from_mapping(dict(layers=(1,), router="ewa", ewa_share=1.5), 4)
  with pytest.raises(ValueError, match="moe.ewa_every"):
    moe.MoeSettings.from_mapping(dict(layers=(1,), router="ewa", ewa_every=0), 4)
  with pytest.raises(ValueError, match="moe.num_experts=1"):
    moe.MoeSettings.from_mapping(dict(layers=(1,), router="ewa", num_experts=1), 4)


def vmoe_param_count(*, width, depth, mlp_dim, heads, patch, experts, moe_layers,
                     classes=1000, classifier="token", representation=None,
                     qk_norm=False, router="top", slots=1, image=224):
  """Parameters of vmoe's VisionTransformerMoe from its code's shapes (vmoe/nn/
  vit_moe.py, routing.py, projects/soft_moe/router.py), summed by hand."""
  tokens = (image // patch) ** 2 + (classifier == "token")
  count = patch * patch * 3 * width + width  # embedding conv
  count += width * (classifier == "token") + tokens * width  # cls, posembed_input
  attention = 4 * (width * width + width) + (2 * (width // heads) if qk_norm else 0)
  mlp = 2 * width * mlp_dim + mlp_dim + width
  gate = width * experts if router == "top" else width * experts * slots + 1
  for block in range(depth):
    count += 4 * width + attention  # two LayerNorms
    count += experts * mlp + gate if block in moe_layers else mlp
  count += 2 * width  # encoder_norm
  if representation:
    count += width * representation + representation
  return count + (representation or width) * classes + classes


def _vmoe(width, depth, mlp_dim, heads, patch, moe_layers):
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, heads=heads, patch=patch,
              experts=8, moe_layers=moe_layers, representation=width)


def _soft(width, depth, mlp_dim, heads, patch, experts, last):
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, heads=heads, patch=patch,
              experts=experts, moe_layers=range(depth - last, depth), classifier="gap",
              qk_norm=True, router="soft")


# vmoe/configs/vmoe_paper/common.py (V-MoE's S is 512 wide and 8 deep; "Every 2" is
# blocks 1, 3, ...; "Last 2" the last two of those) and projects/soft_moe/configs.
# The L and H names (vmoe_l16_e8_top2, vit_l16_softmoe_128e, vit_h14_softmoe_256e)
# are built by the same registration code; tracing 24-32 blocks each costs more
# test time than it adds checking.
VMOE_COUNTS = {
    "vmoe_s32_e8_top2_last2": _vmoe(512, 8, 2048, 8, 32, (5, 7)),
    "vmoe_b32_e8_top2": _vmoe(768, 12, 3072, 12, 32, range(1, 12, 2)),
    "vmoe_b16_e8_top2": _vmoe(768, 12, 3072, 12, 16, range(1, 12, 2)),
    "vit_s16_softmoe_128e": _soft(384, 12, 1536, 6, 16, 128, 6),
    "vit_s14_softmoe_256e": _soft(384, 12, 1536, 6, 14, 256, 6),
    "vit_b16_softmoe_128e": _soft(768, 12, 3072, 12, 16, 128, 6),
}


@pytest.mark.parametrize("name", sorted(VMOE_COUNTS))
def test_parameter_counts_equal_vmoes_configurations(name):
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  assert models.param_count(name) == vmoe_param_count(**VMOE_COUNTS[name])


TINY_VIT = dict(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
                mlp_dim=64, num_classes=10)


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
  """A tiny dense ViT's ``.npz`` (random weights, head included) and its logits."""
  from vit_jax import export, models  # pylint: disable=g-import-not-at-top
  model = models.create("vit_tiny_patch16_224", **TINY_VIT)
  images = jax.random.normal(jax.random.key(5), (4, 16, 16, 3))
  variables = random_variables(model, images, seed=3)
  path = str(tmp_path_factory.mktemp("dense") / "dense.npz")
  export.to_npz(variables["params"], path)
  return path, images, jax.jit(model.apply)(variables, images)


@pytest.mark.parametrize("router", ["top2", "soft"])
def test_upcycling_copies_the_mlp_into_every_expert(dense_checkpoint, router):
  """Top-2 with renormalised gates and room for every token equals the dense model;
  Soft MoE does not (slots mix tokens before the MLP)."""
  from vit_jax import models, weights  # pylint: disable=g-import-not-at-top
  path, images, dense_logits = dense_checkpoint
  model = models.create("vit_tiny_patch16_224", **TINY_VIT, moe=dict(
      layers=(1,), num_experts=4, router=router, renormalize=True, capacity_factor=2.0))
  fresh = jax.jit(model.init)(jax.random.key(0), images[:1])
  variables, report = weights.load(path, model, fresh)
  assert len(report.upcycled) == 4 and not report.missing and not report.unexpected
  assert all("Moe/Router" in n for n in report.reinitialised)
  experts = variables["params"]["Transformer"]["encoderblock_1"]["Moe"]["Experts"]
  assert experts["Dense_0"]["kernel"].shape == (4, 32, 64)
  logits = jax.jit(model.apply)(variables, images)
  if router == "top2":
    np.testing.assert_allclose(logits, dense_logits, atol=1e-5, rtol=1e-5)
  else:
    assert np.max(np.abs(logits - dense_logits)) > 1e-3


def test_upcycled_model_trains_from_the_dense_checkpoint(tfds_dir, digits_pretrained,
                                                         tmp_path):
  """Through the classification trainer: init from the dense digits run (experts
  copied, routers fresh), two steps at learning rate 0 (so the evaluated model is
  the upcycled one), the routers' metrics in TensorBoard, the dense accuracy kept."""
  from helpers import train_in_process  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  dense_workdir, dense = digits_pretrained
  result = train_in_process(
      tfds_dir, tmp_path, "vit_tiny_patch16_224", steps=2, batch_size=16,
      learning_rate=0.0, config_overrides={"init": dense_workdir},
      image_size=16, patch_size=4, hidden_size=64, num_layers=4, num_heads=4,
      mlp_dim=128, moe=dict(layers=(1, 3), num_experts=4, router="top2",
                            renormalize=True, capacity_factor=2.0))
  assert result["eval_top1"] == dense["eval_top1"]
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  tags = set(acc.Tags()["scalars"]) | set(acc.Tags().get("tensors", []))
  for tag in ("train/moe/aux_loss", "train/moe/importance_loss", "train/moe/load_loss",
              "train/moe/dropped_fraction"):
    assert tag in tags, (tag, sorted(tags))


def test_moe_training_resumes_bit_identically_and_logs_the_router(tfds_dir, tmp_path):
  """Top-2 V-MoE routing (noisy gating draws from the step's RNG) through the
  classification trainer: a rerun after a kill (the newest checkpoint never committed)
  ends bit-identical to the uninterrupted run, and the routers' metrics reach
  TensorBoard with values a working router gives."""
  import shutil  # pylint: disable=g-import-not-at-top
  from helpers import train_in_process  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top

  def train(path):
    return train_in_process(
        tfds_dir, path, "vit_tiny_patch16_224", steps=6, batch_size=16,
        learning_rate=3e-3, **TINY_VIT, config_overrides={
            "checkpoint_every": 3, "keep_checkpoints": 3, "log_every": 1},
        moe=dict(layers=(1,), num_experts=4, router="top2", capacity_factor=1.0,
                 batch_priority=True))

  def state(path):
    arrays = checkpoint.load_state_arrays(str(path / "checkpoints" / "6"))
    return jax.tree_util.tree_leaves_with_path(
        {"params": arrays["params"], "opt_state": arrays["opt_state"]})

  reference = train(tmp_path / "moe")
  killed = tmp_path / "killed"
  shutil.copytree(tmp_path / "moe", killed)
  shutil.rmtree(killed / "checkpoints" / "6")
  (killed / "results.json").unlink()
  resumed = train(killed)
  drop_history = lambda r: {k: v for k, v in r.items() if k != "train_loss_history"}
  assert drop_history(resumed) == drop_history(reference)
  leaves = state(tmp_path / "moe")
  assert any("['Moe']['Experts']" in jax.tree_util.keystr(n) for n, _ in leaves)
  for (name, a), (_, b) in zip(leaves, state(killed), strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(name))

  acc = event_accumulator.EventAccumulator(str(tmp_path / "moe" / "tensorboard"))
  acc.Reload()
  def values(tag):
    if tag in acc.Tags()["scalars"]:
      return [e.value for e in acc.Scalars(tag)]
    return [float(tf_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
  def tf_ndarray(proto):
    from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
    return tensor_util.make_ndarray(proto)
  logged = {t: values(f"train/moe/{t}") for t in (
      "aux_loss", "importance_loss", "load_loss", "dropped_fraction")}
  assert all(len(v) == 6 for v in logged.values()), logged  # every step (log_every=1)
  # CV^2 of 4 experts' shares lies in [0, 3]; 0.005-weighted sum of both; capacity
  # factor 1 with noisy top-2 drops some choices but never most.
  for name in ("importance_loss", "load_loss"):
    assert all(0 < v <= 3 for v in logged[name]), (name, logged[name])
  np.testing.assert_allclose(
      logged["aux_loss"],
      0.005 * (np.array(logged["importance_loss"]) + logged["load_loss"]), rtol=1e-5)
  assert all(0 <= v < 0.5 for v in logged["dropped_fraction"]), logged
  assert max(logged["dropped_fraction"]) > 0


def test_expert_parallel_meshes_equal_one_device(expert_parallel_run):
  """expert=8 and data=2 x expert=4 against one device: loss and every gradient within
  1e-5, expert parameters split by the expert-axis size, tokens moved by all-to-all;
  for top-2 with either dispatch (moe.dispatch="all_to_all": an explicit all-to-all
  in the lowered program, where the einsum path leaves it to XLA's partitioner)."""
  proc, out = expert_parallel_run
  _, stderr = proc.communicate(timeout=900)
  assert proc.returncode == 0, stderr[-3000:]
  with open(out) as f:
    results = json.load(f)
  assert sorted(results) == ["soft/data2_expert4", "top2/data2_expert4",
                             "top2/data2_expert4/all_to_all", "top2/expert8",
                             "top2/expert8/all_to_all"]
  for name, result in results.items():
    assert result["loss_diff"] <= 1e-5 and result["grad_diff"] <= 1e-5, (name, result)
    assert result["grad_norm"] > 0.1  # the gradients compared are not trivially zero
    expert_axis = 8 if "expert8" in name else 4
    assert (result["expert_bytes_per_device"] * expert_axis
            == result["expert_bytes_single"]), (name, result)
    assert result["expert_spec"] == "P('expert', None, None)"
    assert result["all_to_all"] > 0, name
    # Two exchanges per MoE layer forward (dispatch, return), two more in the backward.
    explicit = name.endswith("/all_to_all")
    assert (result["lowered_all_to_all"] >= 4 if explicit
            else result["lowered_all_to_all"] == 0), (name, result)
