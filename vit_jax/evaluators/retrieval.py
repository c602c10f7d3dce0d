r"""Image<->text retrieval: recall@1/5/10 in both directions over image-text pairs.

Every image and caption of a held-out set of shards is embedded; for each image, the
captions are ranked by cosine similarity (image->text), and for each caption the
images (text->image). Recall@k is the fraction of queries whose own partner is among
the k best. A candidate counts as better only if it scores strictly higher, so
identical captions of different images (common in the offline pool) tie in the
query's favour.

During training (``config.evals.retrieval``) and stand-alone on a trained workdir
(``python -m vit_jax.tools.retrieval``).
"""

import runpy
from typing import Callable, Sequence

import jax
import numpy as np

from vit_jax.data import image_text
from vit_jax.evaluators import common

KS = (1, 5, 10)


def recall_at_k(zimg: np.ndarray, ztxt: np.ndarray, ks: Sequence[int] = KS,
                block: int = 1024) -> dict[str, float]:
  """Recall@k both ways for paired rows of L2-normalised embeddings."""
  n = len(zimg)
  if n == 0:
    raise ValueError("no pairs to evaluate retrieval on")
  diagonal = np.sum(zimg * ztxt, axis=1)
  i2t_rank = np.empty(n, np.int64)
  t2i_rank = np.empty(n, np.int64)
  for start in range(0, n, block):  # blocks of queries bound the memory to block x n
    rows = slice(start, start + block)
    i2t_rank[rows] = np.sum(zimg[rows] @ ztxt.T > diagonal[rows, None], axis=1)
    t2i_rank[rows] = np.sum(ztxt[rows] @ zimg.T > diagonal[rows, None], axis=1)
  result = {}
  for k in ks:
    result[f"i2t_recall@{k}"] = float(np.mean(i2t_rank < k))
    result[f"t2i_recall@{k}"] = float(np.mean(t2i_rank < k))
  result["count"] = n
  return result


class RetrievalEvaluator:
  """Recall@1/5/10 of ``model`` over the pairs that ``batches`` yields.

  ``batches`` is a factory of numpy batches ``{"image", "text", "_mask"}`` (this
  process's part of the global batch), e.g. ``common.shard_eval_batches`` with the
  tokenizer.
  """

  def __init__(self, model, *, batches: Callable, sharding):
    self._batches = batches
    self._sharding = sharding
    encode_images, encode_texts = common.embedding_fns(model)
    self._embed = jax.jit(lambda v, images, texts: (encode_images(v, images),
                                                    encode_texts(v, texts)))

  def run(self, variables) -> dict[str, float]:
    images, texts = [], []
    for batch in self._batches():
      put = lambda x: jax.make_array_from_process_local_data(self._sharding, x)
      inputs = jax.tree.map(put, image_text.model_images(batch))
      zimg, ztxt = self._embed(variables, inputs, put(batch["text"]))
      mask = common.to_host(put(batch["_mask"])).astype(bool)
      images.append(common.to_host(zimg)[mask])
      texts.append(common.to_host(ztxt)[mask])
    if not images:
      raise ValueError("the retrieval evaluation set is empty")
    return recall_at_k(np.concatenate(images), np.concatenate(texts))


def from_config(eval_config, model, tokenizer, *, sharding,
                batch_size: int) -> RetrievalEvaluator:
  """An evaluator from ``config.evals.retrieval.<name>``: ``shards``, ``pp``."""
  from vit_jax.data import image_text, preprocess  # pylint: disable=g-import-not-at-top
  batches = common.shard_eval_batches(
      image_text.expand_shards(eval_config.shards),
      preprocess_fn=preprocess.parse(eval_config.pp),
      global_batch=eval_config.get("batch_size") or batch_size, tokenizer=tokenizer)
  if eval_config.get("cache", False):
    batches = common.cached(batches)
  return RetrievalEvaluator(model, batches=batches, sharding=sharding)


if __name__ == "__main__":  # the command line lives in vit_jax/tools
  runpy.run_module("vit_jax.tools.retrieval", run_name="__main__", alter_sys=True)
