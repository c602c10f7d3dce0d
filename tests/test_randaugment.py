"""RandAugment preprocessing op: every operation, determinism, magnitudes."""

import numpy as np
import pytest
import tensorflow as tf

from vit_jax.data import preprocess, randaugment


def _image(seed=0, size=16):
  return tf.constant(np.random.RandomState(seed).randint(0, 256, (size, size, 3)),
                     tf.uint8)


@pytest.mark.parametrize("op", [op for op, _ in randaugment.OPS], ids=lambda op: op.__name__)
def test_each_operation_keeps_shape_and_range(op):
  image = tf.cast(_image(), tf.float32)
  out = op(image, tf.constant(0.7)).numpy()
  assert out.shape == (16, 16, 3)
  assert out.min() >= 0 and out.max() <= 255


def test_operations_do_what_they_say():
  image = tf.cast(_image(), tf.float32)
  np.testing.assert_array_equal(randaugment.solarize(image, 1.0), 255 - image)
  np.testing.assert_array_equal(randaugment.brightness(image, -1.0 / 0.9), 0 * image)
  shifted = randaugment.translate_x(image, 4 / (0.45 * 16)).numpy()
  np.testing.assert_array_equal(shifted[:, :12], image.numpy()[:, 4:])
  np.testing.assert_array_equal(shifted[:, 12:], 128)
  eq = randaugment.equalize(image, 0.0).numpy()
  assert eq.min() == 0 and eq.max() > 230
  # A rotation by 0 and a shear by 0 change nothing.
  np.testing.assert_array_equal(randaugment.rotate(image, 0.0), image)
  np.testing.assert_array_equal(randaugment.shear_x(image, 0.0), image)


def test_randaug_op_is_deterministic_per_seed():
  pp = preprocess.parse("randaug(2, 10)")
  run = lambda seed: pp({"image": _image(), "_rng": tf.constant([0, seed], tf.int64)}
                        )["image"].numpy()
  assert run(1).dtype == np.uint8 and run(1).shape == (16, 16, 3)
  np.testing.assert_array_equal(run(1), run(1))
  outs = [run(s) for s in range(8)]
  assert sum(not np.array_equal(o, _image().numpy()) for o in outs) >= 5
  assert len({o.tobytes() for o in outs}) >= 5
  with pytest.raises(ValueError, match="magnitude"):
    preprocess.parse("randaug(2, 11)")
