"""Image-text shards: reading, bad samples, per-process assignment, exact resume; the
tokenizer; the offline pool generator; the filtering command's basic filters.

Everything here is plain Python over small shards written by the tests (no model).
"""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers import run_command
from vit_jax.data import image_text, preprocess, tokenizer
from vit_jax.data import digit_pool
from vit_jax.tools import filter_pool, make_pool


def png(size=(8, 8), color=(200, 30, 30)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, color).save(buffer, format="PNG")
  return buffer.getvalue()


def write_shards(directory, num_shards, per_shard, prefix="s"):
  """Shards of valid samples whose caption names their key."""
  paths = []
  for s in range(num_shards):
    path = os.path.join(directory, f"{prefix}-{s:03d}.tar")
    with image_text.ShardWriter(path, per_shard) as writer:  # one shard: no "{}"
      for i in range(per_shard):
        key = f"{prefix}{s:03d}_{i:03d}"
        writer.write(key, {"png": png(color=(i % 256, s % 256, 7)),
                           "txt": f"caption of {key}", "json": json.dumps({"label": i % 3})})
    paths.append(path)
  return paths


TOKENIZER = tokenizer.train_bpe(["one two three four caption of", "broken"] * 4,
                                vocab_size=40, context_length=8)


def keys_of(stream, n):
  iterator = iter(stream)
  out = []
  for _ in range(n):
    sample, position = next(iterator)
    out.append((sample["key"], position))
  return out


# ---------------------------------------------------------------- shard lists

def test_expand_shards_globs_braces_directories_and_errors(tmp_path):
  paths = write_shards(tmp_path, 3, 2)
  assert image_text.expand_shards(str(tmp_path)) == paths
  assert image_text.expand_shards(str(tmp_path / "s-*.tar")) == paths
  assert image_text.expand_shards(str(tmp_path / "s-{000..001}.tar")) == paths[:2]
  assert image_text.expand_shards(f"{paths[2]},{paths[0]}") == [paths[2], paths[0]]
  with pytest.raises(image_text.DataError, match=r"no shards match '.*/nothing-\*\.tar'"):
    image_text.expand_shards(str(tmp_path / "nothing-*.tar"))
  with pytest.raises(image_text.DataError, match="does not exist"):
    image_text.expand_shards(str(tmp_path / "missing.tar"))
  with pytest.raises(image_text.DataError, match="empty"):
    image_text.ImageTextStream([], seed=0)


# ---------------------------------------------------------------- bad samples

def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
  path = str(tmp_path / "bad.tar")
  with image_text.ShardWriter(path, 100) as writer:
    writer.write("good1", {"jpg": png(), "txt": "a red square"})
    writer.write("corrupt", {"jpg": b"\xff\xd8 this is not a jpeg", "txt": "broken"})
    writer.write("nocaption", {"png": png()})
    writer.write("emptycaption", {"png": png(), "txt": "  "})
    writer.write("noimage", {"txt": "a caption alone"})
    writer.write("badjson", {"png": png(), "txt": "ok", "json": "{not json"})
    writer.write("good2", {"png": png((6, 4)), "txt": "a wide one",
                           "json": '{"label": 1}'})
  stats = image_text.SkipStats()
  with caplog.at_level("WARNING"):
    samples = list(image_text.iterate_samples([path], stats=stats))
  assert [s["key"] for s in samples] == ["good1", "good2"]
  assert samples[1]["image"].shape == (4, 6, 3) and samples[1]["meta"] == {"label": 1}
  assert stats.as_dict() == {"corrupt_image": 1, "missing_caption": 2,
                             "missing_image": 1, "bad_json": 1}
  assert stats.summary() == ("5 samples skipped (1 bad json, 1 corrupt image, "
                             "2 missing caption, 1 missing image)")
  assert "skipped sample 'corrupt'" in caplog.text and "corrupt image" in caplog.text

  # The stream leaves the images to the decoding threads; it skips everything else.
  stream = image_text.ImageTextStream([path], seed=0, stats=image_text.SkipStats())
  assert sorted(k for k, _ in keys_of(stream, 3)) == ["corrupt", "good1", "good2"]


def test_truncated_shard_yields_what_precedes_the_damage(tmp_path):
  [path] = write_shards(tmp_path, 1, 20)
  with tarfile.open(path) as tar:
    middle = tar.getmembers()[30]  # s000_010.png
  data = open(path, "rb").read()
  cut = str(tmp_path / "cut.tar")
  with open(cut, "wb") as f:  # end inside that member's data
    f.write(data[:middle.offset_data + 10])
  stats = image_text.SkipStats()
  samples = list(image_text.iterate_samples([cut], stats=stats))
  assert [s["key"] for s in samples] == [f"s000_{i:03d}" for i in range(10)]
  assert stats.as_dict().get("truncated_shard") == 1


def test_a_stream_without_usable_samples_is_an_error(tmp_path):
  path = str(tmp_path / "useless.tar")
  with image_text.ShardWriter(path, 10) as writer:
    writer.write("a", {"txt": "no image"})
  with pytest.raises(image_text.DataError, match="no usable samples"):
    next(iter(image_text.ImageTextStream([path], seed=0)))


# ---------------------------------------------------------------- tf.data pipeline

PP = "decode|random_crop(6)|value_range(0, 1)"


def train_batches(paths, n, *, batch_size=4, threads=None, position=None, **stream_kwargs):
  stream_kwargs = {"seed": 0, "shards_per_window": 2, **stream_kwargs}
  stream = image_text.ImageTextStream(paths, position=position, **stream_kwargs)
  data = image_text.TrainData(stream, tokenizer=TOKENIZER, batch_size=batch_size,
                              preprocess_fn=preprocess.parse(PP), threads=threads)
  iterator = iter(data)
  return [next(iterator) for _ in range(n)], stream.stats


def bad_pool(tmp_path):
  """A shard with undecodable and otherwise bad samples, a truncated and a 0-byte one."""
  path = str(tmp_path / "bad.tar")
  with image_text.ShardWriter(path, 100) as writer:
    for key, files in (("good1", {"png": png(), "txt": "one"}),
                       ("corrupt", {"jpg": b"\xff\xd8 not a jpeg", "txt": "broken"}),
                       ("good2", {"png": png(), "txt": "two"}),
                       ("latin1", {"png": png(), "txt": "caf\xe9".encode("latin-1")}),
                       ("zerobyte", {"png": b"", "txt": "an empty image file"}),
                       ("good3", {"png": png(), "txt": "three", "json": "{not json"}),
                       ("good4", {"png": png(), "txt": "four"})):
      writer.write(key, files)
  [whole] = write_shards(tmp_path, 1, 6, prefix="t")
  with tarfile.open(whole) as tar:
    cut_at = tar.getmembers()[9].offset_data + 10  # inside t000_003.png
  truncated = str(tmp_path / "truncated.tar")
  with open(whole, "rb") as src, open(truncated, "wb") as dst:
    dst.write(src.read()[:cut_at])
  empty = str(tmp_path / "empty.tar")
  open(empty, "wb").close()
  return [path, truncated, empty]


def test_training_and_eval_pipelines_skip_and_count_bad_data(tmp_path, caplog):
  paths = bad_pool(tmp_path)
  good = ["good1", "good2", "good4", "t000_000", "t000_001", "t000_002"]
  with caplog.at_level("WARNING"):
    batches, stats = train_batches(paths, 6, shards_per_window=3)  # 4 epochs of 6
  keys = [k.decode() for b in batches for k in b["_key"]]
  for epoch in range(4):
    assert sorted(keys[6 * epoch:6 * epoch + 6]) == sorted(good)
  # Undecodable images are counted when a later sample comes out: exactly those the
  # stream put before the last sample consumed.
  stream = iter(image_text.ImageTextStream(paths, seed=0, shards_per_window=3))
  raw_keys = [next(stream)[0]["key"] for _ in range(4 * 8)]
  before_last = raw_keys[:len(raw_keys) - raw_keys[::-1].index(keys[-1])]
  counts = stats.as_dict()
  assert counts["corrupt_image"] == sum(k in ("corrupt", "zerobyte") for k in before_last)
  for reason in ("bad_caption", "bad_json", "truncated_shard", "empty_shard"):
    assert counts[reason] >= 4, reason  # once per epoch read (the reader reads ahead)
  assert "skipped sample 'corrupt' of " + paths[0] in caplog.text
  assert "the image does not decode" in caplog.text
  assert batches[0]["image"].shape == (4, 6, 6, 3) and batches[0]["text"].shape == (4, 8)

  eval_stats = image_text.SkipStats()
  evaluated = list(image_text.make_eval_batches(
      paths, preprocess_fn=preprocess.parse("decode|resize(6)"), batch_size=4,
      tokenizer=TOKENIZER, stats=eval_stats))
  assert [k.decode() for b in evaluated for k, m in zip(b["_key"], b["_mask"]) if m] == [
      "good1", "good2", "good4", "t000_000", "t000_001", "t000_002"]
  assert eval_stats.as_dict() == {"corrupt_image": 2, "bad_caption": 1, "bad_json": 1,
                                  "truncated_shard": 1, "empty_shard": 1}


def test_a_pool_whose_images_never_decode_is_an_error(tmp_path, monkeypatch):
  path = str(tmp_path / "garbage.tar")
  with image_text.ShardWriter(path, 10) as writer:
    for i in range(5):
      writer.write(f"g{i}", {"jpg": b"garbage", "txt": "a caption"})
  monkeypatch.setattr(image_text, "MAX_UNDECODED_RUN", 50)
  with pytest.raises(Exception, match="none of the last 64 images decoded"):
    train_batches([path], 1, batch_size=1)


def test_training_pipeline_resumes_exactly_for_each_process(tmp_path):
  """Stopped after any batch and restarted from its last position, each of 2 processes
  continues with the same batches (keys, pixels, tokens), whatever the thread count;
  windows are read in parts of 2 samples per shard."""
  paths = write_shards(tmp_path, 5, 6)
  with tarfile.open(paths[2], "a") as tar:  # an undecodable image inside a window
    for name, data in (("zz.jpg", b"\xff\xd8 broken"), ("zz.txt", b"broken")):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  for process in range(2):
    kwargs = {"process_index": process, "process_count": 2, "window_bytes": 500}
    reference, _ = train_batches(paths, 8, threads=2, **kwargs)  # ~2 epochs
    serial, _ = train_batches(paths, 8, threads=1, **kwargs)
    for a, b in zip(reference, serial):
      assert_same_batch(a, b)
    for stop in (0, 3, 5):
      position = image_text.StreamPosition.from_list(reference[stop]["_position"][-1])
      resumed, _ = train_batches(paths, 7 - stop, position=position, **kwargs)
      for a, b in zip(resumed, reference[stop + 1:]):
        assert_same_batch(a, b)
    assert any(b["_position"][:, 3].any() for b in reference)  # parts after the first
    keys = {k for b in reference for k in b["_key"]}
    assert {k.decode()[:4] for k in keys} == {f"s{s:03d}" for s in range(process, 5, 2)}


def assert_same_batch(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---------------------------------------------------------------- stream

def test_processes_read_disjoint_shards_covering_the_pool(tmp_path):
  paths = write_shards(tmp_path, 5, 4)
  seen = []
  for p in range(2):
    stream = image_text.ImageTextStream(paths, seed=1, process_index=p, process_count=2,
                                        shards_per_window=2)
    assert stream.shards == paths[p::2]
    # One epoch of this process: every sample of its shards exactly once.
    keys = [k for k, _ in keys_of(stream, 4 * len(stream.shards))]
    assert len(set(keys)) == len(keys)
    seen += keys
  assert sorted(seen) == sorted(f"s{s:03d}_{i:03d}" for s in range(5) for i in range(4))
  with pytest.raises(image_text.DataError, match="3 shards cannot feed 4 processes"):
    image_text.ImageTextStream(paths[:3], seed=0, process_index=0, process_count=4)


def test_stream_shuffles_per_epoch_and_resumes_without_repeats_or_gaps(tmp_path):
  paths = write_shards(tmp_path, 4, 5)
  stream = image_text.ImageTextStream(paths, seed=3, shards_per_window=2)
  reference = keys_of(stream, 50)  # 2.5 epochs of 20 samples
  epoch0 = [k for k, _ in reference[:20]]
  epoch1 = [k for k, _ in reference[20:40]]
  assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
  assert epoch0 != sorted(epoch0)  # shuffled within windows
  # Another seed gives another order.
  other = image_text.ImageTextStream(paths, seed=4, shards_per_window=2)
  assert [k for k, _ in keys_of(other, 20)] != epoch0
  # Resume from the position after sample n: the continuation is exactly the rest.
  for n in (1, 7, 9, 10, 19, 20, 33):
    position = reference[n - 1][1]
    resumed = image_text.ImageTextStream(paths, seed=3, shards_per_window=2,
                                         position=position)
    assert keys_of(resumed, 50 - n) == reference[n:], n
  # Positions round-trip through the checkpoint's JSON lists.
  position = reference[12][1]
  assert image_text.StreamPosition.from_list(
      json.loads(json.dumps(position.to_list()))) == position


def test_windows_of_a_large_shard_hold_at_most_two_parts(tmp_path, monkeypatch):
  """A shard 12x bigger than the window budget is read in parts: the stream never holds
  more than two parts' bytes, gives every sample once per epoch, and resumes anywhere
  (mid-part, at a part's end, across epochs) by seeking to the recorded offsets."""
  [big] = write_shards(tmp_path, 1, 60, prefix="big")
  paths = [big] + write_shards(tmp_path, 2, 4)
  sample_bytes = {raw.key: sum(map(len, raw.files.values()))
                  for path in paths for raw in image_text.read_shard(path)}
  budget = 5 * max(sample_bytes.values())
  assert sum(v for k, v in sample_bytes.items() if k.startswith("big")) >= 12 * budget
  kwargs = {"seed": 2, "shards_per_window": 3, "window_bytes": budget}
  stream = image_text.ImageTextStream(paths, **kwargs)
  reference = keys_of(stream, 68 * 2 + 5)
  for epoch in (reference[:68], reference[68:136]):
    assert sorted(k for k, _ in epoch) == sorted(sample_bytes)
  # Two parts, and the sample each of the 3 reading threads has just read.
  bound = 2 * budget + 3 * max(sample_bytes.values())
  assert 0 < stream.max_held_bytes <= bound
  assert len({p.part for _, p in reference}) > 10
  # A part takes its share of every shard of the window that is not done.
  first_part = {k[:4] for k, p in reference[:68] if p.part == 0}
  assert first_part == {"big0", "s000", "s001"}

  starts = []
  read_block = image_text._read_block
  monkeypatch.setattr(image_text, "_read_block",
                      lambda path, start, *a: starts.append(start) or read_block(path, start, *a))
  for n in (1, 9, 30, 31, 67, 68, 100):
    position = image_text.StreamPosition.from_list(
        json.loads(json.dumps(reference[n - 1][1].to_list())))
    starts.clear()
    resumed = image_text.ImageTextStream(paths, position=position, **kwargs)
    assert keys_of(resumed, len(reference) - n) == reference[n:], n
    assert resumed.max_held_bytes <= bound
    # The first read seeks to the part's recorded offsets: no re-reading from byte 0.
    live = sorted(s for s in position.starts if s >= 0)
    assert sorted(starts[:len(live)]) == live, n
  # Another budget on resume starts with the next window (the next epoch here): the
  # window in progress finishes in the parts it was cut into.
  late = reference[40][1]
  smaller = image_text.ImageTextStream(paths, position=late,
                                       **{**kwargs, "window_bytes": budget // 3})
  rest = keys_of(smaller, 27 + 68)
  assert [k for k, _ in rest[:27]] == [k for k, _ in reference[41:68]]
  assert sorted(k for k, _ in rest[27:]) == sorted(sample_bytes)
  assert rest[-1][1].window_bytes == budget // 3
  # A compressed shard cannot be entered by seeking: it is decompressed up to the start.
  gz = str(tmp_path / "big.tar.gz")
  with open(big, "rb") as src, gzip.open(gz, "wb") as dst:
    dst.write(src.read())
  start = max(late.starts)  # the big shard
  assert start > 0
  plain = [(r.key, b) for r, b in image_text._read_tar(big, start, None)]
  assert [(r.key, b) for r, b in image_text._read_tar(gz, start, None)] == plain
  # A position of a run from before window parts ([epoch, window, offset], whole
  # shards) finishes its window whole, then takes the budget.
  whole = keys_of(image_text.ImageTextStream(paths, **{**kwargs, "window_bytes": None}),
                  68)
  position = image_text.StreamPosition.from_list(whole[9][1].to_list()[:3])
  resumed = keys_of(image_text.ImageTextStream(paths, position=position, **kwargs), 58 + 68)
  assert [k for k, _ in resumed[:58]] == [k for k, _ in whole[10:]]
  assert [k for k, _ in resumed[58:]] == [k for k, _ in reference[68:136]]


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_trains_saves_loads_and_encodes(tmp_path):
  captions = ["a red seven on a black background", "the digit seven", "a blue two",
              "a small red two in the top left corner"] * 20
  tok = tokenizer.train_bpe(captions, vocab_size=120, context_length=8)
  path = str(tmp_path / "tok.json")
  tok.save(path)
  loaded = tokenizer.Tokenizer.load(path, context_length=8)
  assert loaded.vocab_size == tok.vocab_size <= 120
  assert (loaded.pad_id, loaded.sot_id, loaded.eot_id) == (0, 2, 3)
  ids = loaded.encode(["A Red Seven", "a small red two in the top left corner"])
  assert ids.dtype == np.int32 and ids.shape == (2, 8)
  assert ids[0, 0] == loaded.sot_id
  assert list(ids[0]).index(loaded.eot_id) == 4 and (ids[0, 5:] == 0).all()
  assert loaded.decode(ids[0]) == "a red seven"  # lower-cased, spaces restored
  # Too long: truncated, still ending with the end-of-text token.
  assert ids[1, -1] == loaded.eot_id and loaded.pad_id not in ids[1]
  assert np.array_equal(loaded.encode(["a red seven"]), tok.encode(["a red seven"]))
  with pytest.raises(FileNotFoundError, match="no tokenizer file"):
    tokenizer.Tokenizer.load(str(tmp_path / "missing.json"), context_length=8)
  with pytest.raises(TypeError):
    loaded.encode("a single string")


def test_tokenizer_command_trains_on_shard_captions(tmp_path):
  paths = write_shards(tmp_path, 2, 10)
  out = str(tmp_path / "vocab" / "tokenizer.json")
  code, printed = run_command("vit_jax.tools.train_tokenizer", f"--shards={tmp_path}",
                              f"--output={out}", "--vocab_size=60")
  assert code == 0 and "vocabulary of" in printed, printed
  tok = tokenizer.Tokenizer.load(out, context_length=16)
  assert len(paths) == 2
  ids = tok.encode(["caption of s001_003"])[0]
  assert tok.decode(ids) == "caption of s001_003"
  # "caption" is in every training caption: BPE merged it into one token.
  assert tok.backend.encode("caption", add_special_tokens=False).tokens == ["\u2581caption"]


def test_tokenizer_training_gives_the_same_file_in_every_process(tmp_path):
  """The Rust trainer's hash maps are seeded per process; the vocabulary must not be."""
  path = os.path.join(os.path.dirname(tokenizer.__file__), "tokenizer.py")
  script = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('tok', {path!r})\n"
            "tok = importlib.util.module_from_spec(spec); spec.loader.exec_module(tok)\n"
            "captions = ['ab cd ef gh ij kl', 'ba dc fe hg ji lk', 'ab ba cd, dc! ef-fe'] * 3\n"
            "tok.train_bpe(captions, vocab_size=60, context_length=8).save(sys.argv[1])\n")
  outputs = [str(tmp_path / f"tok{i}.json") for i in range(3)]
  procs = [subprocess.Popen([sys.executable, "-c", script, out]) for out in outputs]
  assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
  files = [open(out, "rb").read() for out in outputs]
  assert files[0] == files[1] == files[2]


# ---------------------------------------------------------------- offline pool

def test_make_pool_is_deterministic_and_marks_mismatches(tmp_path):
  clean = make_pool.make_pool(str(tmp_path / "clean"), num_samples=60, samples_per_shard=25,
                              eval_renders=1, mismatch_fraction=0.0)
  noisy = make_pool.make_pool(str(tmp_path / "noisy"), num_samples=60, samples_per_shard=25,
                              eval_renders=1, mismatch_fraction=0.5)
  assert clean["train"]["shards"] == 3 and clean["eval"]["samples"] == 360
  assert clean["train"]["mismatched"] == 0 and 15 < noisy["train"]["mismatched"] < 45
  read = lambda d: list(image_text.iterate_samples(image_text.expand_shards(d)))
  clean_samples, noisy_samples = read(tmp_path / "clean" / "train"), read(
      tmp_path / "noisy" / "train")
  assert len(clean_samples) == len(noisy_samples) == 60
  for a, b in zip(clean_samples, noisy_samples):
    assert a["key"] == b["key"]
    np.testing.assert_array_equal(a["image"], b["image"])  # same scenes
    assert a["image"].shape == (32, 32, 3)
    name = digit_pool.CLASS_NAMES[a["meta"]["label"]]
    assert name in a["caption"] or str(a["meta"]["label"]) in a["caption"]
    if b["meta"]["mismatched"]:  # a caption about another digit
      assert b["caption"] != a["caption"]
      assert name not in b["caption"].split() and str(a["meta"]["label"]) not in b["caption"]
    else:
      assert b["caption"] == a["caption"]
  held_out = read(tmp_path / "clean" / "eval")
  assert sorted({s["meta"]["label"] for s in held_out}) == list(range(10))
  assert not any(s["meta"]["mismatched"] for s in held_out)
  tok = tokenizer.Tokenizer.load(str(tmp_path / "clean" / "tokenizer.json"),
                                 context_length=24)
  assert tok.vocab_size > 50


def test_make_pool_attribute_fraction_sets_which_captions_name_attributes(tmp_path):
  def captions(fraction, split):
    directory = tmp_path / str(fraction)
    if not directory.exists():
      make_pool.make_pool(str(directory), num_samples=40, eval_renders=1,
                          attribute_fraction=fraction)
    return [s["caption"] for s in image_text.iterate_samples(
        image_text.expand_shards(directory / split), decode_image=False)]

  words = {w for name in (*digit_pool.FOREGROUNDS, *digit_pool.BACKGROUNDS)
           for w in name.split()} | {"small", "large", "corner", "middle"}
  names_attribute = lambda text: bool(words & set(text.replace(",", " ").split()))
  assert not any(names_attribute(c) for c in captions(0.0, "train"))
  assert all(names_attribute(c) for c in captions(1.0, "train"))
  # Held-out captions always name attributes: retrieval has to find the scene.
  assert all(names_attribute(c) for c in captions(0.0, "eval"))
  with pytest.raises(ValueError, match="attribute_fraction"):
    make_pool.make_pool(str(tmp_path / "bad"), num_samples=4, attribute_fraction=1.5)


def test_precision_recall_by_fraction_ranks_by_score():
  scores = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.2, "e": 0.1}
  bad = {"a": False, "b": True, "c": False, "d": False, "e": True}
  curve = filter_pool.precision_recall_by_fraction(scores, bad, fractions=(0.2, 0.6, 1.0))
  assert [row["kept"] for row in curve] == [1, 3, 5]
  assert [row["precision"] for row in curve] == pytest.approx([1.0, 2 / 3, 3 / 5])
  assert [row["recall"] for row in curve] == pytest.approx([1 / 3, 2 / 3, 1.0])
  point = filter_pool.precision_at_recall(scores, bad, 0.6)  # needs 2 of the 3 good
  assert point["precision"] == pytest.approx(2 / 3) and point["threshold"] == 0.7
  assert point["keep_fraction"] == pytest.approx(3 / 5)
  assert filter_pool.precision_at_recall({"b": 0.8}, {"b": True}, 0.8) is None  # no good pair


def test_filter_basic_filters_and_resharding(tmp_path):
  path = str(tmp_path / "pool.tar")
  with image_text.ShardWriter(path, 100) as writer:
    writer.write("ok", {"png": png((10, 10)), "txt": "two words", "json": '{"bad": false}'})
    writer.write("short", {"png": png((10, 10)), "txt": "one", "json": '{"bad": false}'})
    writer.write("small", {"png": png((4, 10)), "txt": "two words", "json": '{"bad": true}'})
    writer.write("wide", {"png": png((40, 10)), "txt": "two words", "json": '{"bad": true}'})
    writer.write("fine", {"png": png((12, 9)), "txt": "three words here",
                          "json": '{"bad": false}'})
    writer.write("nocaption", {"png": png((12, 9))})
  out = str(tmp_path / "filtered")
  summary = filter_pool.filter_pool([path], out, min_caption_words=2, min_image_size=5,
                                    max_aspect_ratio=3.0, samples_per_shard=1,
                                    ground_truth_key="bad")
  assert open(os.path.join(out, "kept_ids.txt")).read().split() == ["ok", "fine"]
  assert summary["rejected"] == {"caption_too_short": 1, "image_too_small": 1,
                                 "aspect_ratio": 1}
  assert summary["unusable"] == {"missing_caption": 1}
  assert summary["ground_truth"]["precision"] == 1.0
  assert summary["ground_truth"]["recall"] == pytest.approx(2 / 3)
  resharded = image_text.expand_shards(os.path.join(out, "shards"))
  assert len(resharded) == 2
  with tarfile.open(resharded[1]) as tar:
    assert sorted(tar.getnames()) == ["fine.json", "fine.png", "fine.txt"]
  with pytest.raises(ValueError, match="need clip_workdir"):
    filter_pool.filter_pool([path], out, keep_fraction=0.5)
