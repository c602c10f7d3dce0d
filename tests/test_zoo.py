"""The surface every registered family offers, tested in one place (as timm's
``tests/test_models.py``): one small configuration per family, tiny inputs.

- the forward pass: float32 logits, ``forward_intermediates`` (per-stage or per-block
  features and ``features``, the head's input), and the headless model
  (``num_classes=0``) returning exactly those features;
- training mode: drop path draws its rates only in training (traced, not run: the
  rates DropPath draws, up to ``drop_path_rate``), and two dropout keys give two
  outputs; BatchNorm statistics move;
- dtypes: bfloat16 compute keeps float32 parameters and logits, ``param_dtype`` sets
  the storage (abstract: nothing compiled);
- bad settings: an unknown setting names the close match, a per-stage setting of the
  wrong length names itself, non-NHWC input and an unknown attention backend are
  clear errors.

Family test files keep what is specific to a family (parity with the reference,
exact parameter counts, converters, its own geometry). The compiled checks take one
``jax.jit`` per family (eval, headless and two training passes together) on random
variables (``random_variables``: no compiled ``init``).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from random_variables import random_variables
from zoo_models import TWO_TOWER, ZOO
from vit_jax import models
from vit_jax.models import registry

FAMILIES = sorted(ZOO)
NUM_CLASSES = 10
DROP_PATH_RATE = 0.5


def create(family, **overrides):
  name, settings, _, _ = ZOO[family]
  return models.create(name, **{**settings, "num_classes": NUM_CLASSES, **overrides})


def images_of(family, batch=2):
  side = ZOO[family][2]
  return jax.random.normal(jax.random.key(1), (batch, side, side, 3))


def two_tower_inputs(batch=2):
  images = jnp.zeros((batch, 16, 16, 3))
  return images, jnp.tile(jnp.arange(8, dtype=jnp.int32)[None], (batch, 1))


def test_the_zoo_covers_every_registered_family():
  families = {info.family for info in map(models.model_info, models.list_models())}
  assert families == set(ZOO) | {"two_tower"}
  for family, (name, _, _, _) in ZOO.items():
    assert models.model_info(name).family == family


def subtree(tree, like):
  """The entries of ``tree`` that the abstract tree ``like`` has."""
  if not isinstance(like, dict):
    return tree
  return {k: subtree(tree[k], v) for k, v in like.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def compiled(request):
  """One jit per family: eval with intermediates, headless, two training passes."""
  family = request.param
  model = create(family, drop_path_rate=DROP_PATH_RATE)
  headless = create(family, num_classes=0)
  images = images_of(family)
  variables = random_variables(model, images)
  headless_variables = subtree(variables, jax.eval_shape(headless.init, jax.random.key(0),
                                                         images))

  @jax.jit
  def run(variables, headless_variables, images):
    train = lambda seed: model.apply(variables, images, train=True,
                                     rngs={"dropout": jax.random.key(seed)},
                                     mutable=["batch_stats"])
    return (models.forward_intermediates(model, variables, images),
            headless.apply(headless_variables, images), train(0), train(1))

  return family, variables, run(variables, headless_variables, images)


def test_logits_intermediates_and_headless_features(compiled):
  family, _, ((logits, inter), features, _, _) = compiled
  assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.std(logits) > 0
  per_layer = [k for k in inter if re.search(r"(stage|block)_\d+", k)]
  assert per_layer, sorted(inter)
  assert all(inter[k].shape[0] == 2 for k in per_layer)
  assert features.dtype == jnp.float32 and features.ndim == 2, family
  np.testing.assert_allclose(features, inter["features"], atol=1e-5, err_msg=family)


def test_training_mode_draws_dropout_and_updates_batch_stats(compiled):
  family, variables, ((logits, _), _, (train_a, state), (train_b, _)) = compiled
  if isinstance(train_a, tuple):  # DeiT's two heads in training
    train_a, train_b = train_a[0], train_b[0]
  assert train_a.shape == logits.shape
  assert not np.allclose(train_a, train_b, atol=1e-5), family  # drop path draws
  if "batch_stats" in variables:
    moved = [not np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(state["batch_stats"]))]
    assert all(moved), family


@pytest.fixture
def drawn_rates(monkeypatch):
  """The drop rate of every DropPath draw while tracing (``bernoulli(key, 1 - rate)``)."""
  drawn = []
  bernoulli = jax.random.bernoulli

  def recording_bernoulli(key, p, shape):
    drawn.append(round(1.0 - float(p), 6))
    return bernoulli(key, p, shape)

  monkeypatch.setattr(jax.random, "bernoulli", recording_bernoulli)
  return drawn


@pytest.mark.parametrize("family", FAMILIES + ["two_tower"])
def test_drop_path_acts_only_in_training(family, drawn_rates):
  """Traced, not run: rates rise to ``drop_path_rate``; eval draws nothing."""
  if family == "two_tower":
    name, settings = TWO_TOWER
    model = models.create(name, **{**settings, **{
        tower: {**settings[tower], "drop_path_rate": DROP_PATH_RATE}
        for tower in ("image", "text")}})
    inputs = two_tower_inputs()
  else:
    model = create(family, drop_path_rate=DROP_PATH_RATE)
    inputs = (images_of(family),)
  variables = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  jax.eval_shape(lambda v: model.apply(v, *inputs, mutable=["batch_stats"]), variables)
  assert not drawn_rates, family
  jax.eval_shape(lambda v: model.apply(v, *inputs, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.key(0)}), variables)
  assert drawn_rates and max(drawn_rates) == DROP_PATH_RATE, (family, drawn_rates)
  assert min(drawn_rates) > 0, family  # a branch with rate 0 draws nothing


@pytest.mark.parametrize("family", FAMILIES + ["two_tower"])
def test_compute_and_param_dtypes(family):
  """bfloat16 compute: float32 parameters and outputs, bfloat16 features inside."""
  if family == "two_tower":
    name, settings = TWO_TOWER
    make = lambda **kw: models.create(name, **settings, **kw)
    images, texts = two_tower_inputs()
    inputs, kwargs = (images, texts), {"texts": texts}
  else:
    make = lambda **kw: create(family, **kw)
    images = images_of(family)
    inputs, kwargs = (images,), {}
  model = make(dtype="bfloat16")
  variables = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  out, inter = jax.eval_shape(
      lambda v: models.forward_intermediates(model, v, images, **kwargs), variables)
  assert {x.dtype for x in jax.tree.leaves(out)} == {jnp.dtype("float32")}, family
  inside = [x.dtype for k, x in inter.items() if k != "features"]
  assert inside and set(inside) == {jnp.dtype("bfloat16")}, (family, inter.keys())
  stored = jax.eval_shape(make(param_dtype="bfloat16").init, jax.random.key(0), *inputs)
  dtypes = {path_name(p): x.dtype for p, x in
            jax.tree_util.tree_flatten_with_path(stored["params"])[0]}
  # Only the two-tower temperature and bias are float32 by design (scalars).
  wide = sorted(k for k, d in dtypes.items() if d != jnp.bfloat16)
  assert wide == (["logit_scale"] if family == "two_tower" else []), wide


def path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


@pytest.mark.parametrize("family", FAMILIES + ["two_tower"])
def test_an_unknown_setting_names_the_close_match(family):
  name = TWO_TOWER[0] if family == "two_tower" else ZOO[family][0]
  with pytest.raises(ValueError, match=rf"model '{name}' has no setting 'dtpye' \(did "
                                       r"you mean dtype"):
    models.create(name, dtpye="bfloat16")
  fields = {f.name for f in dataclasses.fields(registry.model_info(name).factory())}
  assert "dtype" in fields and "param_dtype" in fields


@pytest.mark.parametrize("family", [f for f in FAMILIES if ZOO[f][3]])
def test_a_per_stage_setting_of_the_wrong_length_is_named(family):
  field, value = ZOO[family][3]
  model = create(family, **{field: value})
  with pytest.raises(ValueError, match=rf"\.{field}=\(.*\) has {len(value)} entries; "
                                       r"the model has \d+ stages"):
    jax.eval_shape(model.init, jax.random.key(0), images_of(family, 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_and_attention_backends_are_clear_errors(family):
  model = create(family)
  images = images_of(family, 1)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  with pytest.raises(ValueError, match="expected NHWC images"):
    jax.eval_shape(model.apply, variables, images[0])
  if "attention_impl" in {f.name for f in dataclasses.fields(model)}:
    bad = create(family, attention_impl="nope")
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'"):
      jax.eval_shape(bad.apply, variables, images)
