r"""Zero-shot classification with a two-tower model: class names x prompt templates.

Each class gets the text embedding of every template filled with its name; those are
averaged and re-normalised into one classifier row, and an image is assigned the class
whose row is most similar (CLIP's recipe). Images come from labelled image-text shards
(a ``label`` in each sample's JSON) or from a TFDS classification dataset.

During training (``config.evals.zero_shot``) and stand-alone on a trained workdir
(``python -m vit_jax.tools.zero_shot``). Class names and templates are a named set
below or a file (one entry per line, or a JSON list); templates contain ``{}`` where
the class name goes.
"""

import json
import runpy
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vit_jax.data import image_text
from vit_jax.evaluators import common
from vit_jax.models.two_tower import l2_normalize

CLASSNAMES = {
    "digits": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine"),
}
TEMPLATES = {
    # None of these phrasings is a caption template of the offline pool
    # (vit_jax/data/digit_pool.py): they test whether the text tower generalises.
    "digits_heldout": (
        "a picture of the number {}.",
        "an image showing a {}.",
        "this is a {}.",
        "a scan of the digit {}.",
        "a photograph of a {}.",
        "look, a {}!",
        "the symbol for {}.",
        "a close-up picture of a {}.",
    ),
    "name_only": ("{}",),
    "photo": ("a photo of a {}.",),
}


def load_entries(spec: Any, named: dict, what: str) -> list[str]:
  """A named set, a file (lines or a JSON list), or a list given directly."""
  if isinstance(spec, (list, tuple)):
    return [str(x) for x in spec]
  if spec in named:
    return list(named[spec])
  path = epath.Path(str(spec))  # gs:// too
  if not path.exists():
    raise ValueError(f"{what} {spec!r} is neither a named set ({', '.join(named)}) nor "
                     "a file")
  text = path.read_text(encoding="utf-8")
  entries = json.loads(text) if text.lstrip().startswith("[") else [
      line.strip() for line in text.splitlines() if line.strip()]
  if not entries:
    raise ValueError(f"{what} file {spec} is empty")
  return [str(x) for x in entries]


class ZeroShotEvaluator:
  """Top-1/top-5 zero-shot accuracy of ``model`` over labelled images.

  Args:
    model: a ``TwoTower``.
    tokenizer: the ``Tokenizer`` the model was trained with.
    classnames, templates: lists (see ``load_entries``); every template has ``{}``.
    batches: a factory of batches ``{"image", "label", "_mask"}`` (numpy, this
      process's part of the global batch), e.g. ``common.shard_eval_batches``.
    sharding: of the global batch.
    text_batch_size: prompts embedded per step.
  """

  def __init__(self, model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
               *, batches: Callable, sharding, text_batch_size: int = 256):
    bad = [t for t in templates if "{}" not in t]
    if bad:
      raise ValueError(f"prompt templates need a '{{}}' for the class name: {bad}")
    if len(classnames) < 2:
      raise ValueError(f"zero-shot classification needs at least 2 classes, got "
                       f"{len(classnames)}")
    self.classnames, self.templates = list(classnames), list(templates)
    self._tokenizer = tokenizer
    self._batches = batches
    self._sharding = sharding
    self._text_batch_size = text_batch_size
    self._encode_images, self._encode_texts = common.embedding_fns(model)

    @jax.jit
    def scores(variables, classifier, images, labels, mask):
      logits = self._encode_images(variables, images) @ classifier.T
      k = min(5, classifier.shape[0])
      top = jax.lax.top_k(logits, k)[1]
      mask = mask.astype(jnp.float32)
      return {"top1": jnp.sum((top[:, 0] == labels) * mask),
              "top5": jnp.sum(jnp.any(top == labels[:, None], axis=1) * mask),
              "count": jnp.sum(mask)}

    self._scores = scores

  def classifier(self, variables) -> jax.Array:
    """``[num_classes, dim]``: per class, the re-normalised mean prompt embedding."""
    prompts = [t.format(c) for c in self.classnames for t in self.templates]
    tokens = self._tokenizer.encode(prompts)
    chunks = []
    for start in range(0, len(tokens), self._text_batch_size):
      chunks.append(np.asarray(self._encode_texts(
          variables, tokens[start:start + self._text_batch_size])))
    embeddings = np.concatenate(chunks).reshape(len(self.classnames),
                                                len(self.templates), -1)
    return l2_normalize(jnp.asarray(embeddings.mean(axis=1)))

  def run(self, variables) -> dict[str, float]:
    classifier = self.classifier(variables)
    totals = None
    for batch in self._batches():
      put = lambda x: jax.make_array_from_process_local_data(self._sharding, x)
      images = jax.tree.map(put, image_text.model_images(batch))
      sums = self._scores(variables, classifier, images, put(batch["label"]),
                          put(batch["_mask"]))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
      raise ValueError("the zero-shot evaluation set is empty")
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    count = max(totals["count"], 1.0)
    return {"top1": totals["top1"] / count, "top5": totals["top5"] / count,
            "count": int(totals["count"])}


def from_config(eval_config, model, tokenizer, *, sharding,
                batch_size: int) -> Optional[ZeroShotEvaluator]:
  """An evaluator from a ``config.evals.zero_shot.<name>`` entry.

  The entry has ``classnames``, ``templates``, ``pp`` and either ``shards`` (with
  ``label_key``, default "label") or ``dataset``/``split``/``data_dir`` (TFDS).
  """
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.data import image_text  # pylint: disable=g-import-not-at-top
  get = lambda key, default=None: eval_config.get(key, default)
  classnames = load_entries(get("classnames"), CLASSNAMES, "classnames")
  templates = load_entries(get("templates"), TEMPLATES, "templates")
  pp = preprocess.parse(get("pp"))
  batch_size = get("batch_size") or batch_size
  if get("shards"):
    batches = common.shard_eval_batches(
        image_text.expand_shards(get("shards")), preprocess_fn=pp, global_batch=batch_size,
        label_key=get("label_key", "label"))
  elif get("dataset"):
    builder = input_pipeline.get_builder(get("dataset"), get("data_dir"))
    dataset, _ = input_pipeline.make_eval_dataset(
        builder, get("split", "test"), preprocess_fn=pp,
        batch_size=input_pipeline.local_batch_size(batch_size), cache=False)
    batches = lambda: input_pipeline.numpy_batches(dataset)
  else:
    raise ValueError("a zero-shot evaluation needs `shards` (labelled image-text shards) "
                     "or `dataset` (a TFDS classification dataset)")
  if get("cache", False):
    batches = common.cached(batches)
  return ZeroShotEvaluator(model, tokenizer, classnames, templates, batches=batches,
                           sharding=sharding)


if __name__ == "__main__":  # the command line lives in vit_jax/tools
  runpy.run_module("vit_jax.tools.zero_shot", run_name="__main__", alter_sys=True)
