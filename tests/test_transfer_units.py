"""LoRA merging, layer-wise lr decay, EMA and mixup/cutmix, in isolation."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import finetune, lora, models

TINY = dict(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=4,
            mlp_dim=64, num_classes=5, head_zeroinit=False)


@pytest.fixture(scope="module")
def lora_model():
  base = models.create("vit_tiny_patch16_224", **TINY)
  model = lora.LoRA(base=base, rank=4, alpha=8.0)
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  params = model.init(jax.random.key(1), images)["params"]
  # Trained-looking adapters: B is zero at init, which would hide any merge error.
  rng = np.random.RandomState(0)  # numpy: no per-shape compiles of eager JAX ops
  params = {k: (v + 0.2 * rng.randn(*v.shape).astype(np.float32)
                if k.startswith("lora__") else v) for k, v in params.items()}
  return base, model, params, images


def test_fresh_lora_is_the_base(lora_model):
  base, model, _, images = lora_model
  params = model.init(jax.random.key(1), images)["params"]
  np.testing.assert_array_equal(model.apply({"params": params}, images),
                                base.apply({"params": lora.base_params(params)}, images))


def test_lora_merge_gives_the_adapter_outputs(lora_model):
  base, model, params, images = lora_model
  with_adapters = model.apply({"params": params}, images)
  without = base.apply({"params": lora.base_params(params)}, images)
  assert np.abs(with_adapters - without).max() > 0.1  # the adapters matter
  merged = lora.merge(params, model)
  assert not any(k.startswith("lora__") for k in merged)
  np.testing.assert_allclose(base.apply({"params": merged}, images), with_adapters,
                             atol=1e-5, rtol=0)


def test_lora_targets_and_fraction(lora_model):
  _, _, params, _ = lora_model
  names = sorted(lora.adapters(params))
  assert len(names) == 2 * 6 and names[0] == "Transformer/encoderblock_0/MlpBlock_3/Dense_0"
  mask = finetune.trainable_mask(params, train_only=r"^lora__|^head/")
  trained, total = lora.trainable_fraction(params, mask)
  assert trained == 2 * 4 * (4 * 64 + 96 + 96) + 32 * 5 + 5
  assert total == sum(v.size for v in jax.tree.leaves(params))
  base = models.create("vit_tiny_patch16_224", **TINY)
  with pytest.raises(ValueError, match="match no dense layer"):
    lora.LoRA(base=base, targets="nothing$").init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_layer_decay_scales():
  params = {"embedding": {"kernel": 0}, "cls": 0,
            "Transformer": {"posembed_input": {"pos_embedding": 0},
                            "encoderblock_0": {"a": 0}, "encoderblock_1": {"a": 0},
                            "encoder_norm": {"scale": 0}},
            "head": {"kernel": 0}, "lora__Transformer__encoderblock_1__x__a": 0}
  s = finetune.layer_decay_scales(params, 0.5)
  assert s["embedding"]["kernel"] == s["cls"] == 0.125
  assert s["Transformer"]["posembed_input"]["pos_embedding"] == 0.125
  assert s["Transformer"]["encoderblock_0"]["a"] == 0.25
  assert s["Transformer"]["encoderblock_1"]["a"] == 0.5
  assert s["lora__Transformer__encoderblock_1__x__a"] == 0.5
  assert s["head"]["kernel"] == s["Transformer"]["encoder_norm"]["scale"] == 1.0


def test_freeze_layer_decay_and_ema_together():
  params = {"Transformer": {"encoderblock_0": {"w": jnp.ones(3)},
                            "encoderblock_1": {"w": jnp.ones(3)}},
            "head": {"w": jnp.ones(3)}}
  tx = finetune.wrap_optimizer(optax.sgd(1.0), params, layer_decay=0.5,
                               freeze=r"encoderblock_0", ema_decay=0.9)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates["Transformer"]["encoderblock_0"]["w"], 0.0)
  np.testing.assert_allclose(updates["Transformer"]["encoderblock_1"]["w"], -0.5)
  np.testing.assert_allclose(updates["head"]["w"], -1.0)
  new = optax.apply_updates(params, updates)
  ema = finetune.ema_params(state, params)
  d = min(0.9, 1 / 10)  # warm-up decay at the first step
  np.testing.assert_allclose(ema["head"]["w"], d * 1.0 + (1 - d) * new["head"]["w"],
                             rtol=1e-6)


def test_mixup_and_cutmix_targets():
  images = jnp.stack([jnp.zeros((8, 8, 3)), jnp.ones((8, 8, 3))])
  labels = jnp.array([0, 1])
  for kw in (dict(mixup_alpha=0.4), dict(cutmix_alpha=1.0)):
    mix = jax.jit(functools.partial(finetune.mix, num_classes=2, **kw))
    mixed, targets = mix(jax.random.key(3), images, labels)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    # The target weight of the other image equals its share of the pixels.
    share = float(mixed[0].mean())
    np.testing.assert_allclose(targets[0, 1], share, atol=1e-6)
  mixed, targets = finetune.mix(jax.random.key(3), images, labels, 2)
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_array_equal(targets, jax.nn.one_hot(labels, 2))
