r"""DataComp-style filtering: turn a pool of image-text shards into a filtered subset.

  python -m vit_jax.tools.filter_pool --shards=workdirs/noisy_pool/train \
      --output_dir=workdirs/noisy_pool_filtered \
      --min_caption_words=1 --clip_workdir=workdirs/clip_noisy --keep_fraction=0.6

Filters, applied in this order (DataComp's baselines):

  basic     caption length in words (``--min_caption_words``), image size
            (``--min_image_size``: the shorter side, in pixels) and aspect ratio
            (``--max_aspect_ratio``: longer side over shorter side)
  CLIP score  cosine similarity of the image and caption embeddings under a trained
            two-tower model (``--clip_workdir``, any contrastive training workdir);
            keep the top ``--keep_fraction`` of the samples that passed the basic
            filters, or those scoring at least ``--clip_threshold``

Writes to ``--output_dir``:

  kept_ids.txt        the kept samples' keys, in pool order
  scores.tsv          key, CLIP score (if computed), kept (0/1) for every sample
  shards/filtered-00000.tar ...   the kept samples, re-sharded (all their files)
  score_histogram.png  (with CLIP scores) the scores' histogram, the kept threshold
                      as a red line; with ``--ground_truth_key``, bad pairs in orange
  summary.json        counts per filter, the threshold used, and, with
                      ``--ground_truth_key`` (a JSON field that is true for bad pairs,
                      such as the offline pool's "mismatched"), precision and recall
                      of the kept set, of the top 30%, 40%, ... 80% by score, and
                      the precision where the score's recall reaches 0.8

Samples that cannot be used at all (corrupt image, no caption) are dropped and
counted like the trainer does; so are samples whose member names could escape a
directory (``../``, absolute paths): they are never copied. Samples are told apart by
shard and key: a key found in several shards is written as ``<shard name>/<key>``.

Nothing is written into ``--output_dir`` until the end: the output is built in a fresh
directory beside it and swapped in whole, so a failed run leaves the previous output
as it was, and a rerun leaves no extra shards behind. An output directory that holds
one of the input shards is refused.
"""

import contextlib
import io
import json
import math
import os
import sys
import tarfile
import uuid
from typing import Any, Optional, Sequence

import numpy as np
from absl import app, flags
from etils import epath

# vit_jax.data (TensorFlow) is imported where it is used: --help answers without it.
FLAGS = flags.FLAGS


def basic_filter(sample: dict, *, min_caption_words: int, min_image_size: int,
                 max_aspect_ratio: float) -> Optional[str]:
  """The reason a sample fails the basic filters, or None if it passes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if len(sample["caption"].split()) < min_caption_words:
    return "caption_too_short"
  if min_image_size or max_aspect_ratio:
    try:
      with Image.open(io.BytesIO(sample["image_bytes"])) as image:  # header only
        width, height = image.size
    except Exception:  # pylint: disable=broad-except
      return "corrupt_image"
    if min(width, height) < min_image_size:
      return "image_too_small"
    if max_aspect_ratio and max(width, height) / max(min(width, height), 1) > max_aspect_ratio:
      return "aspect_ratio"
  return None


def _ranked_good(scores: dict[str, float], bad_pairs: dict[str, bool]
                 ) -> tuple[list[str], np.ndarray]:
  """Keys by falling score, and how many good pairs are among the top 1, 2, ... n."""
  ranked = sorted(scores, key=lambda k: -scores[k])
  return ranked, np.cumsum([not bad_pairs[k] for k in ranked])


def precision_recall_by_fraction(scores: dict[str, float], bad_pairs: dict[str, bool],
                                 fractions: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7,
                                                               0.8)) -> list[dict]:
  """Precision and recall of keeping the top ``f`` of the scored pairs, per fraction.

  The trade-off of the score alone (basic filters aside): a good pair is one that
  ``bad_pairs`` does not mark; recall is over the good pairs that have a score.
  """
  ranked, good = _ranked_good(scores, bad_pairs)
  curve = []
  for fraction in fractions:
    kept = math.ceil(fraction * len(ranked))
    good_kept = int(good[kept - 1]) if kept else 0
    curve.append({"keep_fraction": fraction, "kept": kept,
                  "precision": good_kept / max(kept, 1),
                  "recall": good_kept / max(int(good[-1]), 1)})
  return curve


def precision_at_recall(scores: dict[str, float], bad_pairs: dict[str, bool],
                        recall: float) -> Optional[dict]:
  """The precision of the smallest top-by-score set whose recall reaches ``recall``.

  One point of the precision-recall curve: the operating point a threshold on the
  score would pick for that recall. None when no scored pair is good.
  """
  ranked, good = _ranked_good(scores, bad_pairs)
  if not len(ranked) or not good[-1]:
    return None
  kept = int(np.searchsorted(good, recall * good[-1])) + 1  # first prefix reaching it
  good_kept = int(good[kept - 1])
  return {"recall": good_kept / int(good[-1]), "precision": good_kept / kept,
          "keep_fraction": kept / len(ranked), "threshold": scores[ranked[kept - 1]]}


def clip_scores(shards: Sequence[str], workdir: str, *, batch_size: int,
                stats: Any) -> dict[tuple[int, str], float]:
  """Image-caption cosine similarity of every usable sample, by (shard index, key)
  (``stats``: the ``image_text.SkipStats`` that count the samples that cannot be
  used)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.data import image_text, preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import common  # pylint: disable=g-import-not-at-top
  trained = workdir_lib.load_trained(workdir)
  mesh = sharding.make_mesh({"data": -1})
  batch_sharding = sharding.batch_sharding(mesh)
  encode_images, encode_texts = common.embedding_fns(trained.model)
  score = jax.jit(lambda v, images, texts: jax.numpy.sum(
      encode_images(v, images) * encode_texts(v, texts), axis=-1))
  pp = preprocess.parse(trained.pp_eval)
  scores = {}
  with jax.set_mesh(mesh):
    for index, shard in enumerate(shards):  # one shard at a time: keys are per shard
      # Closed on any error: a live input stream keeps the process from exiting.
      with contextlib.closing(image_text.make_eval_batches(
          [shard], preprocess_fn=pp, batch_size=batch_size, tokenizer=trained.tokenizer,
          stats=stats)) as batches:
        for batch in batches:
          put = lambda x: jax.device_put(x, batch_sharding)
          images = jax.tree.map(put, image_text.model_images(batch))
          values = np.asarray(score(trained.variables, images, put(batch["text"])))
          for key, value, real in zip(batch["_key"], values, batch["_mask"]):
            if real:
              scores[(index, key.decode())] = float(value)
  return scores


def score_histogram_png(scores: Sequence[float], bad_scores: Sequence[float],
                        threshold: Optional[float], *, bins: int = 40,
                        size: tuple[int, int] = (640, 320)) -> bytes:
  """A PNG (drawn with PIL: no plotting library is a dependency): stacked bars of
  ``scores`` (blue) and ``bad_scores`` (orange), the threshold as a red line, the
  score range and counts written on the axes."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  everything = np.asarray(list(scores) + list(bad_scores), np.float64)
  low, high = float(everything.min()), float(everything.max())
  if threshold is not None and np.isfinite(threshold):
    low, high = min(low, threshold), max(high, threshold)
  high = high if high > low else low + 1e-6
  edges = np.linspace(low, high, bins + 1)
  good_counts = np.histogram(np.asarray(scores, np.float64), edges)[0]
  bad_counts = np.histogram(np.asarray(bad_scores, np.float64), edges)[0]
  width, height = size
  left, right, top, bottom = 40, 10, 20, 30
  plot_w, plot_h = width - left - right, height - top - bottom
  tallest = max(int((good_counts + bad_counts).max()), 1)
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  x_of = lambda v: left + (v - low) / (high - low) * plot_w
  for i, (g, b) in enumerate(zip(good_counts, bad_counts)):
    x0, x1 = left + i * plot_w / bins, left + (i + 1) * plot_w / bins - 1
    y_good = top + plot_h - g / tallest * plot_h
    y_bad = y_good - b / tallest * plot_h
    if g:
      draw.rectangle([x0, y_good, x1, top + plot_h], fill=(70, 110, 200))
    if b:
      draw.rectangle([x0, y_bad, x1, y_good], fill=(240, 150, 40))
  draw.line([left, top + plot_h, left + plot_w, top + plot_h], fill="black")
  draw.line([left, top, left, top + plot_h], fill="black")
  draw.text((2, top - 15), f"{tallest}", fill="black")
  draw.text((left, height - 20), f"{low:.3f}", fill="black")
  draw.text((left + plot_w - 40, height - 20), f"{high:.3f}", fill="black")
  title = f"CLIP scores of {len(everything)} samples"
  if threshold is not None and np.isfinite(threshold):
    x = x_of(threshold)
    draw.line([x, top, x, top + plot_h], fill=(220, 0, 0), width=2)
    title += f"; kept >= {threshold:.4f} (red)"
  draw.text((left + 10, 3), title, fill="black")
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _unsafe(key: str) -> bool:
  """Whether a member name could land outside the directory it is extracted to."""
  return (key.startswith(("/", "\\")) or os.path.isabs(key)
          or ".." in key.replace("\\", "/").split("/"))


def _real(path: str) -> str:
  """Local paths with links resolved; remote ones (gs://...) as given."""
  return path.rstrip("/") if "://" in path else os.path.realpath(path)


def _check_paths(shards: Sequence[str], output_dir: str) -> None:
  """ValueError for a non-tar shard, or an output directory holding an input shard."""
  output = _real(output_dir)
  for shard in shards:
    real = _real(shard)
    if real == output or real.startswith(output + "/"):
      raise ValueError(f"--output_dir={output_dir} holds the input shard {shard}: the "
                       "output replaces that directory whole; choose another one")
    if not _is_tar(shard):
      raise ValueError(f"{shard} (matched by the shard spec) is not a tar file; give "
                       ".tar shards only")


def _is_tar(shard: str) -> bool:
  """Whether ``shard`` (local or remote) opens as a tar archive; an empty file does
  (the reader counts it as an empty shard)."""
  try:
    with epath.Path(shard).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
      tar.next()
  except tarfile.ReadError as e:
    return str(e) == "empty file"
  except (tarfile.TarError, OSError, EOFError):
    return False
  return True


def _swap_in(built: epath.Path, output_dir: epath.Path) -> None:
  """Replaces ``output_dir`` by the finished directory ``built`` (through etils.epath:
  a rename locally; on gs://, where renaming a directory copies its objects, the old
  output stays whole until the new one is in place)."""
  if output_dir.exists():
    old = built.parent / f".old-{uuid.uuid4().hex[:8]}"
    output_dir.rename(old)
    built.rename(output_dir)
    old.rmtree()
  else:
    built.rename(output_dir)


def filter_pool(shards: Sequence[str], output_dir: str, *, min_caption_words: int = 0,
                min_image_size: int = 0, max_aspect_ratio: float = 0.0,
                clip_workdir: Optional[str] = None, keep_fraction: Optional[float] = None,
                clip_threshold: Optional[float] = None, samples_per_shard: int = 1000,
                ground_truth_key: Optional[str] = None, batch_size: int = 256) -> dict:
  from vit_jax.data import image_text  # pylint: disable=g-import-not-at-top
  if clip_workdir and (keep_fraction is None) == (clip_threshold is None):
    raise ValueError("CLIP-score filtering needs exactly one of keep_fraction and "
                     "clip_threshold")
  if not clip_workdir and (keep_fraction is not None or clip_threshold is not None):
    raise ValueError("keep_fraction/clip_threshold need clip_workdir (the model that "
                     "scores the pairs)")
  if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1]")
  output_dir = output_dir if "://" in output_dir else os.path.abspath(output_dir)
  _check_paths(shards, output_dir)
  stats = image_text.SkipStats()

  # Pass 1: basic filters from captions and image headers (no decoding). A sample is
  # (shard index, key): the same key in two shards is two samples.
  order, rejected, bad_pairs = [], {}, {}
  for index, shard in enumerate(shards):
    for sample in image_text.iterate_samples([shard], stats=stats, decode_image=False):
      sample_id = (index, sample["key"])
      order.append(sample_id)
      if ground_truth_key is not None:
        meta = sample["meta"]  # any JSON value; only an object can mark a pair
        bad_pairs[sample_id] = bool(isinstance(meta, dict)
                                    and meta.get(ground_truth_key, False))
      reason = ("unsafe_name" if _unsafe(sample["key"]) else basic_filter(
          sample, min_caption_words=min_caption_words, min_image_size=min_image_size,
          max_aspect_ratio=max_aspect_ratio))
      if reason:
        rejected[sample_id] = reason
  if not order:
    raise image_text.DataError(f"no usable sample in the {len(shards)} shard(s) given "
                               f"({stats.summary()})")
  counts = {}
  for _, key in order:
    counts[key] = counts.get(key, 0) + 1
  # What kept_ids.txt, scores.tsv and the output shards call each sample.
  name = lambda i: (i[1] if counts[i[1]] == 1 else
                    f"{os.path.basename(shards[i[0]]).split('.')[0]}/{i[1]}")
  candidates = [k for k in order if k not in rejected]

  # Pass 2: CLIP scores, then the top fraction or a threshold.
  scores, threshold = {}, None
  if clip_workdir:
    try:
      scores = clip_scores(shards, clip_workdir, batch_size=batch_size, stats=stats)
    except Exception as e:  # pylint: disable=broad-except
      from vit_jax.checkpoint import first_line  # pylint: disable=g-import-not-at-top
      raise ValueError(f"scoring with --clip_workdir={clip_workdir} failed: "
                       f"{first_line(e)}") from e
    for key in candidates:
      if key not in scores:  # its image did not decode
        rejected[key] = "corrupt_image"
    candidates = [k for k in candidates if k in scores]
    if keep_fraction is not None:
      count = math.ceil(keep_fraction * len(candidates))
      ranked = sorted(candidates, key=lambda k: -scores[k])
      threshold = scores[ranked[count - 1]] if count else float("inf")
      kept_set = set(ranked[:count])
    else:
      threshold = clip_threshold
      kept_set = {k for k in candidates if scores[k] >= threshold}
    for key in candidates:
      if key not in kept_set:
        rejected[key] = "clip_score"
  kept = [k for k in order if k not in rejected]

  # Pass 3: re-shard the kept samples with all their files, into a fresh directory
  # that replaces output_dir once everything is written.
  kept_set = set(kept)
  output = epath.Path(output_dir)
  output.parent.mkdir(parents=True, exist_ok=True)
  built = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
  built.mkdir()
  try:
    pattern = str(built / "shards" / "filtered-{:05d}.tar")
    with image_text.ShardWriter(pattern, samples_per_shard) as writer:
      for index, shard in enumerate(shards):
        for raw in image_text.read_shard(shard):
          if (index, raw.key) in kept_set:
            writer.write(name((index, raw.key)), raw.files)
    (built / "kept_ids.txt").write_text("".join(name(k) + "\n" for k in kept))
    lines = ["key\tclip_score\tkept\n"]
    for sample_id in order:
      value = f"{scores[sample_id]:.6f}" if sample_id in scores else ""
      lines.append(f"{name(sample_id)}\t{value}\t{int(sample_id in kept_set)}\n")
    (built / "scores.tsv").write_text("".join(lines))
    if scores:
      bad = [scores[k] for k in order if k in scores and bad_pairs.get(k)]
      good = [scores[k] for k in order if k in scores and not bad_pairs.get(k)]
      (built / "score_histogram.png").write_bytes(
          score_histogram_png(good, bad, threshold))
    summary = _summary(order, kept, rejected, stats, threshold, scores, bad_pairs,
                       ground_truth_key)
    summary["shards"] = [str(output / os.path.relpath(str(p), str(built)))
                         for p in writer.paths]
    (built / "summary.json").write_text(json.dumps(summary, indent=2))
    _swap_in(built, output)
  finally:
    if built.exists():
      built.rmtree()
  return summary


def _summary(order, kept, rejected, stats, threshold, scores, bad_pairs,
             ground_truth_key) -> dict:
  """summary.json's counts (``shards`` is added by the caller)."""
  kept_set = set(kept)
  reasons = {}
  for reason in rejected.values():
    reasons[reason] = reasons.get(reason, 0) + 1
  summary = {"pool_samples": len(order), "kept": len(kept),
             "kept_fraction": len(kept) / max(len(order), 1), "rejected": reasons,
             "unusable": stats.as_dict(), "clip_threshold": threshold}
  if ground_truth_key is not None:
    # Pairs whose image does not decode are no one's to keep: they count nowhere.
    good = {k for k in order if not bad_pairs[k] and rejected.get(k) != "corrupt_image"}
    true_kept = len(good & kept_set)
    summary["ground_truth"] = {
        "key": ground_truth_key, "good_pairs": len(good),
        "precision": true_kept / max(len(kept), 1),
        "recall": true_kept / max(len(good), 1)}
    if scores:
      summary["ground_truth"]["by_keep_fraction"] = precision_recall_by_fraction(
          scores, bad_pairs)
      summary["ground_truth"]["at_recall_0.8"] = precision_at_recall(scores, bad_pairs,
                                                                     0.8)
  return summary


def define_flags() -> None:
  flags.DEFINE_string("shards", None, "Pool shards: glob, brace range, directory or "
                      "comma list.", required=True)
  flags.DEFINE_string("output_dir", None, "Where the filtered pool is written.",
                      required=True)
  flags.DEFINE_integer("min_caption_words", 0, "Shortest caption kept, in words.")
  flags.DEFINE_integer("min_image_size", 0, "Shortest image side kept, in pixels.")
  flags.DEFINE_float("max_aspect_ratio", 0.0, "Longest over shortest side (0: any).")
  flags.DEFINE_string("clip_workdir", None, "Contrastive training workdir that scores "
                      "the pairs.")
  flags.DEFINE_float("keep_fraction", None, "Keep this top fraction by CLIP score.")
  flags.DEFINE_float("clip_threshold", None, "Or keep the scores at least this high.")
  flags.DEFINE_integer("samples_per_shard", 1000, "Samples per output shard.")
  flags.DEFINE_string("ground_truth_key", None, "JSON field marking bad pairs (reports "
                      "precision/recall).")
  flags.DEFINE_integer("batch_size", 256, "Pairs scored per step.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from vit_jax.data import image_text  # pylint: disable=g-import-not-at-top
  try:
    summary = filter_pool(
        image_text.expand_shards(FLAGS.shards), FLAGS.output_dir,
        min_caption_words=FLAGS.min_caption_words, min_image_size=FLAGS.min_image_size,
        max_aspect_ratio=FLAGS.max_aspect_ratio, clip_workdir=FLAGS.clip_workdir,
        keep_fraction=FLAGS.keep_fraction, clip_threshold=FLAGS.clip_threshold,
        samples_per_shard=FLAGS.samples_per_shard,
        ground_truth_key=FLAGS.ground_truth_key, batch_size=FLAGS.batch_size)
  except (ValueError, OSError) as e:  # DataError is a ValueError
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  line = (f"kept {summary['kept']} of {summary['pool_samples']} samples "
          f"({100 * summary['kept_fraction']:.1f}%) in {len(summary['shards'])} shards "
          f"under {FLAGS.output_dir}/shards; rejected: {summary['rejected']}")
  if "ground_truth" in summary:
    truth = summary["ground_truth"]
    line += (f"; against {truth['key']!r}: precision {truth['precision']:.3f}, "
             f"recall {truth['recall']:.3f}")
  print(line)


if __name__ == "__main__":
  define_flags()
  app.run(main)
