"""PTQ through qwix: int8 arithmetic in the compiled program, checkpoint size, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from vit_jax import models, quantization


@pytest.fixture(scope="module")
def vit():
  """A one-block ViT whose weights dominate its checkpoint (~0.8M parameters)."""
  model = models.create("vit_tiny_patch16_224", num_classes=10, image_size=16,
                        patch_size=4, hidden_size=256, num_layers=1, num_heads=4,
                        mlp_dim=1024)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  variables = model.init(jax.random.key(0), images, train=False)
  # A non-zero head, so that logits are not trivially equal.
  variables = jax.tree.map(
      lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape), variables)
  return model, variables, images


def _operand_types(hlo: str, opcode: str) -> list[tuple[str, ...]]:
  """Element types of the operands of every ``opcode`` instruction in compiled HLO."""
  types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", hlo))
  found = []
  for operands in re.findall(rf"= \w+\[[^\]]*\][^ ]* {opcode}\(([^)]*)\)", hlo):
    names = re.findall(r"%[\w.\-]+", operands)
    found.append(tuple(types[name] for name in names))
  return found


def test_int8_program_computes_in_int8(vit):
  model, variables, images = vit
  qmodel, qvariables = quantization.ptq(model, variables, "int8", images)
  predict = jax.jit(lambda v, x: qmodel.apply(v, x, train=False))
  hlo = predict.lower(qvariables, images).compile().as_text()
  dots, convs = _operand_types(hlo, "dot"), _operand_types(hlo, "convolution")
  # q, k, v, out, q.k, attn.v, 2 MLP, head; the patch embedding conv.
  assert len(dots) == 9 and len(convs) == 1, (dots, convs)
  assert all(t == ("s8", "s8") for t in dots + convs), (dots, convs)
  float_hlo = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, images).compile().as_text()
  assert all(t == ("f32", "f32") for t in _operand_types(float_hlo, "dot"))
  logits = predict(qvariables, images)
  expected = model.apply(variables, images, train=False)
  relative = jnp.abs(logits - expected).max() / jnp.abs(expected).max()
  assert 0 < relative < 0.05, relative


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_checkpoint_round_trip_and_size(vit, mode, tmp_path):
  model, variables, images = vit
  qmodel, qvariables = quantization.ptq(model, variables, mode, images)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "q", quantization.to_storage(qvariables))
    checkpointer.save(tmp_path / "f", variables)
    checkpointer.wait_until_finished()
    stored = checkpointer.restore(tmp_path / "q")
  ratio = (quantization.directory_bytes(tmp_path / "q")
           / quantization.directory_bytes(tmp_path / "f"))
  assert ratio <= {"int8": 0.3, "int4": 0.2}[mode], ratio
  abstract = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), images, train=False))
  restored = quantization.from_storage(stored, abstract)
  is_q = lambda x: isinstance(x, quantization.qwix.QArray)
  pairs = zip(jax.tree.leaves(qvariables, is_leaf=is_q),
              jax.tree.leaves(restored, is_leaf=is_q))
  for a, b in pairs:
    a, b = (a.qvalue, b.qvalue) if is_q(a) else (a, b)
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                  np.asarray(b.astype(jnp.float32)))


def test_unreachable_family_and_bad_mode_are_named():

  class MatmulOnly(nn.Module):  # jnp.matmul: no call qwix intercepts

    @nn.compact
    def __call__(self, x, train=False):
      return x @ self.param("w", nn.initializers.ones, (x.shape[-1], 2))

  x = jnp.ones((1, 3))
  variables = MatmulOnly().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="no weight of MatmulOnly is reached"):
    quantization.ptq(MatmulOnly(), variables, "int8", x)
  with pytest.raises(ValueError, match="quantization.mode='int3'"):
    quantization.rules(quantization.Settings(mode="int3"))
