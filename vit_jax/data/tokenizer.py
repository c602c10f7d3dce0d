r"""Text tokenizers for the text towers: BPE trained on your captions, or a file.

Train a byte-pair-encoding vocabulary on the captions of image-text shards and save it
as a Hugging Face ``tokenizers`` JSON file::

  python -m vit_jax.tools.train_tokenizer --shards='pool/train/*.tar' \
      --vocab_size=2000 --output=pool/tokenizer.json

Any ``tokenizer.json`` that the ``tokenizers`` library reads loads the same way, for
example the CLIP BPE tokenizer file distributed with OpenAI's and open_clip's models
(its ``<|startoftext|>``/``<|endoftext|>`` tokens are recognised)::

  tok = Tokenizer.load("tokenizer.json", context_length=77)
  tok.encode(["a photo of a cat"])  # int32 [1, 77]: SOT, tokens, EOT, padding

Every sequence is ``[SOT] tokens [EOT] pad ...``; a caption that does not fit is
truncated so that the EOT token still ends it (the text towers pool at the EOT).
Padding uses the ``[PAD]`` token when the vocabulary has one, else id 0 (open_clip's
convention).
"""

import runpy
from typing import Iterable, Optional, Sequence

import numpy as np
import tokenizers
from etils import epath
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK, SOT, EOT = "[PAD]", "[UNK]", "[SOT]", "[EOT]"
# Names other tokenizer files give the same special tokens (first match wins).
SOT_NAMES = (SOT, "<|startoftext|>", "<s>", "[CLS]")
EOT_NAMES = (EOT, "<|endoftext|>", "</s>", "[SEP]")
PAD_NAMES = (PAD, "<pad>")


class Tokenizer:
  """Fixed-length int32 token sequences from text, for a given ``context_length``."""

  def __init__(self, backend: tokenizers.Tokenizer, *, context_length: int):
    if context_length < 2:
      raise ValueError(f"context_length={context_length}: it must hold at least the "
                       "start and end tokens")
    self.backend = backend
    self.context_length = context_length
    vocab = backend.get_vocab(with_added_tokens=True)
    find = lambda names: next((vocab[n] for n in names if n in vocab), None)
    self.sot_id: Optional[int] = find(SOT_NAMES)
    self.eot_id: Optional[int] = find(EOT_NAMES)
    pad_id = find(PAD_NAMES)
    self.pad_id: int = 0 if pad_id is None else pad_id
    if self.eot_id is None:
      raise ValueError(f"the tokenizer has no end-of-text token (looked for "
                       f"{', '.join(EOT_NAMES)}); the text towers pool at that token")

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  @classmethod
  def load(cls, path: epath.PathLike, *, context_length: int) -> "Tokenizer":
    """Reads a ``tokenizer.json`` from any path etils.epath reads (gs:// too): the
    Rust ``from_file`` reads local files only, so the text goes through epath."""
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(
          f"no tokenizer file at {path}. Train one on your captions with `python -m "
          "vit_jax.tools.train_tokenizer --shards=... --output=...`, or point to an "
          "existing tokenizer.json.")
    try:
      backend = tokenizers.Tokenizer.from_str(path.read_text())
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"cannot read tokenizer file {path}: {e}") from e
    return cls(backend, context_length=context_length)

  def save(self, path: epath.PathLike) -> None:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(self.backend.to_str(pretty=True))

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """``[len(texts), context_length]`` int32 token ids."""
    if isinstance(texts, str):
      raise TypeError("encode takes a list of texts, not one string")
    prefix = [] if self.sot_id is None else [self.sot_id]
    room = self.context_length - len(prefix) - 1
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
    for i, encoding in enumerate(encodings):
      ids = prefix + encoding.ids[:room] + [self.eot_id]
      out[i, :len(ids)] = ids
    return out

  def encode_tf(self, texts):
    """``encode`` inside tf.data: string tensor ``[n]`` -> int32 ``[n, context_length]``.

    The Rust tokenizer runs through ``tf.py_function``: call it on whole batches, so
    that the interpreter is entered once per batch (the Rust part releases its lock).
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    def encode(batch):
      return self.encode([text.decode("utf-8") for text in batch.numpy()])

    ids = tf.py_function(encode, [texts], tf.int32)
    ids.set_shape(texts.shape.concatenate([self.context_length]))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of one sequence, special tokens and padding removed (for inspection)."""
    specials = {self.pad_id, self.eot_id, self.sot_id}
    return self.backend.decode([int(i) for i in ids if int(i) not in specials])


def train_bpe(texts: Iterable[str], *, vocab_size: int, context_length: int,
              min_frequency: int = 2) -> Tokenizer:
  """A lower-casing BPE vocabulary learned from ``texts``, the same in every process.

  Words are split on whitespace and punctuation first, so merges never cross word
  boundaries, and a word's first piece carries ``▁`` (SentencePiece's word-start
  marker), so decoding restores the spaces. The special tokens take ids 0-3
  (``[PAD]`` is 0). The marker is a prefix symbol rather than CLIP's ``</w>`` suffix
  because the trainer numbers suffixed symbols in the iteration order of a Rust hash
  map, which changes from process to process: the same captions gave other ids (and
  tie-broken merges) on every run, and so a differently initialised text tower.
  """
  backend = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
  backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Whitespace(),
      pre_tokenizers.Metaspace(prepend_scheme="always", split=False)])
  backend.decoder = decoders.Metaspace(prepend_scheme="always", split=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=[PAD, UNK, SOT, EOT], show_progress=False)
  backend.train_from_iterator(texts, trainer=trainer)
  return Tokenizer(backend, context_length=context_length)


if __name__ == "__main__":  # the command line lives in vit_jax/tools
  runpy.run_module("vit_jax.tools.train_tokenizer", run_name="__main__", alter_sys=True)
