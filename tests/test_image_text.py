"""Image-text shards: reading, bad samples, per-process assignment, exact resume; the
tokenizer; the offline pool generator; the filtering command's basic filters.

Everything here is plain Python over small shards written by the tests (no model).
"""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers import run_command
from vit_jax.data import image_text, tokenizer
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
  with pytest.raises(image_text.DataError, match="no shards match"):
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

  # The training stream skips them too, and never stops on them.
  stream = image_text.ImageTextStream([path], seed=0, stats=image_text.SkipStats())
  assert sorted(k for k, _ in keys_of(stream, 6)) == ["good1", "good1", "good1",
                                                      "good2", "good2", "good2"]


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


def test_resume_skips_corrupt_samples_consistently(tmp_path):
  paths = write_shards(tmp_path, 2, 6)
  with image_text.ShardWriter(str(tmp_path / "z-{:03d}.tar"), 10) as writer:
    writer.write("broken", {"png": b"garbage", "txt": "x"})
    writer.write("fine", {"png": png(), "txt": "y"})
  paths.append(writer.paths[0])
  reference = keys_of(image_text.ImageTextStream(paths, seed=0, shards_per_window=3), 26)
  assert "broken" not in [k for k, _ in reference]
  for n in range(1, 14):
    resumed = image_text.ImageTextStream(paths, seed=0, shards_per_window=3,
                                         position=reference[n - 1][1])
    assert keys_of(resumed, 26 - n) == reference[n:]


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
  assert tok.backend.encode("caption", add_special_tokens=False).tokens == ["caption</w>"]


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
    name = make_pool.CLASS_NAMES[a["meta"]["label"]]
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

  words = {w for name in (*make_pool.FOREGROUNDS, *make_pool.BACKGROUNDS)
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
