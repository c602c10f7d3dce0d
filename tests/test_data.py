"""Preprocessing ops and the TFDS input pipeline: determinism, resume, eval padding."""

import numpy as np
import pytest
import tensorflow as tf

from vit_jax.data import digits, input_pipeline, preprocess

PP_TRAIN = "decode|resize(16)|random_crop(16, pad=2)|value_range(-1, 1)"
PP_EVAL = "decode|resize(16)|value_range(-1, 1)"


def example(seed=(0, 0), size=(20, 30)):
  image = tf.cast(tf.reshape(tf.range(size[0] * size[1] * 3) % 256, size + (3,)), tf.uint8)
  return {"image": image, "label": tf.constant(3), "_rng": tf.constant(seed, tf.int64)}


def test_pp_ops_shapes_and_ranges():
  out = preprocess.parse("decode|random_resized_crop(24, scale=(0.5, 1.0))|flip_lr|"
                         "value_range(-1, 1)")(example())
  assert out["image"].shape == (24, 24, 3) and out["image"].dtype == tf.float32
  assert -1.0 <= float(tf.reduce_min(out["image"])) <= float(tf.reduce_max(out["image"])) <= 1
  assert "_rng" not in out and int(out["label"]) == 3
  out = preprocess.parse("resize_small(10)|central_crop(10)|normalize('imagenet')")(example())
  assert out["image"].shape == (10, 10, 3)
  mean = np.mean(example()["image"].numpy()[..., 0] / 255.0)
  assert abs(float(tf.reduce_mean(out["image"][..., 0])) - (mean - 0.485) / 0.229) < 0.2
  gray = {"image": tf.zeros((8, 8, 1), tf.uint8)}
  assert preprocess.parse("decode")(gray)["image"].shape == (8, 8, 3)


def test_pp_randomness_is_keyed_by_the_example_seed():
  pp = preprocess.parse("decode|random_resized_crop(12)|flip_lr")
  a, b = pp(example((1, 5)))["image"], pp(example((1, 5)))["image"]
  c = pp(example((1, 6)))["image"]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_pp_parse_errors():
  with pytest.raises(ValueError, match="unknown preprocessing op 'fliplr'. Did you mean flip_lr"):
    preprocess.parse("decode|fliplr")
  with pytest.raises(ValueError, match="arguments must be literals"):
    preprocess.parse("resize(size)")
  with pytest.raises(ValueError, match="needs the input pipeline's per-example seed"):
    preprocess.parse("flip_lr")({"image": tf.zeros((4, 4, 3))})


def test_train_stream_is_deterministic_and_resumes_exactly(tfds_dir):
  builder = input_pipeline.get_builder("digits", data_dir=tfds_dir)
  assert builder.info.splits["train"].num_examples == 1437
  assert builder.info.splits["test"].num_examples == 360
  pp = preprocess.parse(PP_TRAIN)
  make = lambda start, seed=0: iter(input_pipeline.make_train_dataset(
      builder, "train", preprocess_fn=pp, batch_size=32, seed=seed,
      start_position=start, shuffle_buffer=500).as_numpy_iterator())
  stream = make(0)
  batches = [next(stream) for _ in range(50)]  # 1600 examples: crosses an epoch
  again = make(0)
  for b in batches[:3]:
    np.testing.assert_array_equal(b["image"], next(again)["image"])
  for resume_at in (7, 46):  # inside the first epoch, and after the epoch boundary
    resumed = next(make(32 * resume_at))
    np.testing.assert_array_equal(resumed["image"], batches[resume_at]["image"])
    np.testing.assert_array_equal(resumed["label"], batches[resume_at]["label"])
  assert not np.array_equal(next(make(0, seed=1))["label"], batches[0]["label"])
  serial = iter(input_pipeline.make_train_dataset(
      builder, "train", preprocess_fn=pp, batch_size=32, seed=0, threads=1
  ).as_numpy_iterator())
  for b in batches[:3]:  # the thread count does not change the stream
    np.testing.assert_array_equal(b["image"], next(serial)["image"])
  # Every example once per epoch: the first 1437 labels are the split's labels.
  labels = np.concatenate([b["label"] for b in batches])
  split_labels = np.sort([x["label"] for x in builder.as_data_source("train")])
  np.testing.assert_array_equal(np.sort(labels[:1437]), split_labels)


def test_resume_reads_only_the_records_it_uses(tfds_dir, monkeypatch):
  """ArrayRecord files are read by index: a resume deep into an epoch (986 records in,
  at batch 10,000) reads a batch and some read-ahead before its first batch, like one
  at batch 10, not the 986 records before its position."""
  builder = input_pipeline.get_builder("digits", data_dir=tfds_dir)
  read = input_pipeline._read
  counts = []
  monkeypatch.setattr(input_pipeline, "CHUNK", 16)
  monkeypatch.setattr(input_pipeline, "_read",
                      lambda source, indices: counts.append(len(indices)) or read(
                          source, indices))
  first_read = {}
  for batches in (10, 10_000):
    counts.clear()
    ds = input_pipeline.make_train_dataset(
        builder, "train", preprocess_fn=preprocess.parse(PP_TRAIN), batch_size=32, seed=0,
        start_position=32 * batches)
    next(iter(ds.as_numpy_iterator()))
    first_read[batches] = sum(counts)
  assert (32 * 10_000) % 1437 == 986
  # One batch plus read-ahead, which varies with thread timing (48 or 64 records seen
  # with 16-record chunks), and far from the 986 records before the position.
  for batches, records in first_read.items():
    assert 32 <= records <= 32 + 6 * 16, (batches, first_read)


def test_tfrecord_datasets_stream_and_resume_exactly(tmp_path, caplog):
  """Without ArrayRecord files: a shuffle buffer, and a resume that skips (and says so)."""
  builder = digits.Digits(data_dir=str(tmp_path))
  builder.download_and_prepare()  # TFDS's default format, TFRecord
  assert input_pipeline.record_source(builder, "train") is None
  pp = preprocess.parse(PP_TRAIN)
  make = lambda start: iter(input_pipeline.make_train_dataset(
      builder, "train", preprocess_fn=pp, batch_size=32, seed=0, start_position=start,
      shuffle_buffer=500).as_numpy_iterator())
  stream = make(0)
  batches = [next(stream) for _ in range(47)]
  with caplog.at_level("WARNING"):
    resumed = next(make(32 * 46))
  np.testing.assert_array_equal(resumed["image"], batches[46]["image"])
  assert "resuming re-reads 35 records" in caplog.text  # 46 * 32 - 1437
  assert "tfds build digits --file_format=array_record" in caplog.text
  ds, num_batches = input_pipeline.make_eval_dataset(
      builder, "test", preprocess_fn=preprocess.parse(PP_EVAL), batch_size=64)
  assert num_batches == 6 and sum(b["_mask"].sum() for b in ds.as_numpy_iterator()) == 360


def test_class_subset_is_relabelled_and_complete(tfds_dir):
  builder = input_pipeline.get_builder("digits", data_dir=tfds_dir)
  labels = np.array([x["label"] for x in builder.as_data_source("train")])
  kept = np.flatnonzero(np.isin(labels, [7, 2]))
  ds = input_pipeline.make_train_dataset(
      builder, "train", preprocess_fn=preprocess.parse(PP_EVAL), batch_size=len(kept),
      seed=0, keep_labels=[7, 2])
  epoch = next(iter(ds.as_numpy_iterator()))["label"]  # exactly one epoch
  np.testing.assert_array_equal(np.sort(epoch), np.sort(np.where(labels[kept] == 7, 0, 1)))


def test_eval_pads_and_masks_every_example_once(tfds_dir):
  builder = input_pipeline.get_builder("digits", data_dir=tfds_dir)
  ds, num_batches = input_pipeline.make_eval_dataset(
      builder, "test", preprocess_fn=preprocess.parse(PP_EVAL), batch_size=64)
  batches = list(ds.as_numpy_iterator())
  assert num_batches == len(batches) == 6
  masks = np.concatenate([b["_mask"] for b in batches])
  assert masks.sum() == 360 and not masks[360:].any()


def test_dataset_errors(tfds_dir):
  with pytest.raises(input_pipeline.DatasetError, match="unknown dataset 'digitz'.*digits"):
    input_pipeline.get_builder("digitz", data_dir=tfds_dir)
  with pytest.raises(input_pipeline.DatasetError,
                     match="'mnist' is not prepared.*tfds build mnist"):
    input_pipeline.get_builder("mnist", data_dir=tfds_dir)
  builder = input_pipeline.get_builder("digits", data_dir=tfds_dir)
  with pytest.raises(input_pipeline.DatasetError, match="no split 'validation'"):
    input_pipeline.train_split_size(builder, "validation")
