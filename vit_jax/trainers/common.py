"""Pieces every trainer shares: train state, console progress, divergence guard,
metric writers."""

import datetime
import json
import sys
import time
import uuid
from typing import Any, Callable, Optional, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers
from etils import epath

from vit_jax import checkpoint as ckpt_lib
from vit_jax.models import moe
from vit_jax.trainers import wandb_writer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # non-trainable collections, e.g. BatchNorm's batch_stats


def init_state_fn(init_variables: Callable[[jax.Array], dict], tx) -> Callable:
  """``key -> TrainState`` at step 0: the model's variables from ``init_variables``
  (``params`` trained by ``tx``, the other collections kept as ``model_state``)."""

  def init_state(key):
    variables = init_variables(key)
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), model_state=dict(variables))
  return init_state


def restore_or_init(config, workdir: epath.Path, init_state: Callable, init_key,
                    abstract_state: TrainState, state_shardings
                    ) -> tuple[ckpt_lib.Checkpointer, TrainState, Any]:
  """The run's checkpointer and its state: the newest checkpoint that verifies, restored
  straight into this run's shardings whatever mesh wrote it (one that does not fit this
  config is an error), else ``init_state(init_key)``. The third value is the
  ``checkpoint.Restored`` (step, meta) of a resume, ``None`` for a fresh state."""
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"),
                                       keep=config.keep_checkpoints, config=config)
  restored = checkpointer.restore_latest(
      ckpt_lib.abstract_with_shardings(abstract_state, state_shardings))
  if restored is None:
    return checkpointer, jax.jit(init_state, out_shardings=state_shardings)(init_key), None
  return checkpointer, restored.state, restored


def due(step: int, total_steps: int, config) -> tuple[bool, bool, bool]:
  """(log, evaluate, save) at ``step``: every ``log_every``, ``eval_every`` (0: at the
  end only) and ``checkpoint_every`` steps, and all three at the last step."""
  is_last = step == total_steps
  return (step % config.log_every == 0 or is_last,
          bool(config.eval_every and step % config.eval_every == 0) or is_last,
          step % config.checkpoint_every == 0 or is_last)


def mean_metrics(pending: list) -> dict:
  """The mean of each metric over the steps in ``pending`` (fetched once), which is
  emptied for the next logging interval."""
  fetched = jax.device_get(pending)
  pending.clear()
  return {k: float(sum(m[k] for m in fetched) / len(fetched)) for k in fetched[0]}


def split_auxiliary(state: dict) -> tuple[dict, Any, dict]:
  """The mutable collections of a training ``apply`` -> ``(model_state, aux_loss,
  metrics)``: auxiliary losses that layers sow into ``moe.AUX_COLLECTION`` (the
  mixture-of-experts routers' load-balancing losses, see ``models/moe.py``) are
  summed for the loss and their metrics returned for logging, not kept as state.
  ``(state, 0.0, {})`` for models that sow none."""
  aux_loss, metrics = moe.auxiliary_losses(state.get(moe.AUX_COLLECTION, {}))
  return {k: v for k, v in state.items() if k != moe.AUX_COLLECTION}, aux_loss, metrics


class DivergenceError(RuntimeError):
  """The loss became NaN or infinite; training stopped before saving that state."""


def is_main_process() -> bool:
  return jax.process_index() == 0


def console(message: str) -> None:
  """One line on stdout from the main process (flushed: logs are often piped)."""
  if is_main_process():
    print(message, flush=True)


def make_writer(logdir: epath.Path, config: Any = None) -> metric_writers.MetricWriter:
  """TensorBoard event files from the main process, and W&B when ``config.wandb``
  asks for it (``wandb_writer``; the run's files and id go in the workdir, ``logdir``'s
  parent); the other processes write nothing."""
  if not is_main_process():
    return metric_writers.MultiWriter([])
  writers = [metric_writers.SummaryWriter(str(logdir))]
  wandb = wandb_writer.from_config(config, epath.Path(logdir).parent, write_text_atomic)
  if wandb is not None:
    writers.append(wandb)
  return metric_writers.AsyncWriter(metric_writers.MultiWriter(writers))


def write_text_atomic(path: epath.PathLike, text: str) -> None:
  """Writes ``path`` whole or not at all: a temporary file beside it, then a rename
  (through etils.epath, so gs:// works too). A killed writer leaves the old file."""
  path = epath.Path(path)
  temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    temporary.write_text(text)
    temporary.replace(path)
  finally:
    if temporary.exists():
      temporary.unlink()


def write_json(path: epath.Path, data: Any) -> None:
  """JSON from the main process, written atomically (``write_text_atomic``)."""
  if is_main_process():
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def format_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class ProgressLine:
  """``step 500/2000 (25%) | loss 0.41 | lr 1e-03 | 1,850 img/s | ETA 0:00:49``."""

  def __init__(self, total_steps: int, start_step: int, examples_per_step: int):
    self.total_steps = total_steps
    self.examples_per_step = examples_per_step
    self._last_step = start_step
    self._last_time: Optional[float] = None
    self._first_step = start_step
    self._start_time: Optional[float] = None
    self._last_examples: Optional[int] = None

  def start(self, examples_seen: Optional[int] = None) -> None:
    """Call after the first step returned: timing excludes compilation."""
    self._last_time = self._start_time = time.perf_counter()
    self._first_step = self._last_step = self._last_step + 1
    self._last_examples = examples_seen

  def update(self, step: int, metrics: dict[str, float],
             examples_seen: Optional[int] = None) -> dict[str, float]:
    """Prints the line; returns throughput numbers for the metric writer.

    ``examples_seen`` (with ``start``'s): images counted, for steps whose image count
    varies (packed batches); otherwise steps times ``examples_per_step``.
    """
    now = time.perf_counter()
    rates = {}
    if self._last_time is not None and step > self._last_step:
      steps_per_sec = (step - self._last_step) / (now - self._last_time)
      images_per_sec = steps_per_sec * self.examples_per_step
      if examples_seen is not None and self._last_examples is not None:
        images_per_sec = (examples_seen - self._last_examples) / (now - self._last_time)
      rates = {"steps_per_sec": steps_per_sec, "images_per_sec": images_per_sec}
      overall = (step - self._first_step) / max(now - self._start_time, 1e-9)
      eta = (self.total_steps - step) / overall if overall > 0 else float("nan")
    else:
      eta = float("nan")
    parts = [f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)"]
    parts += [f"{k} {v:.4g}" for k, v in metrics.items()]
    if rates:
      parts.append(f"{rates['images_per_sec']:,.0f} img/s")
    if np.isfinite(eta):
      parts.append(f"ETA {format_duration(eta)}")
    console(" | ".join(parts))
    self._last_step, self._last_time = step, now
    self._last_examples = examples_seen
    return rates


class NonFiniteGuard:
  """Collects per-step loss flags on device; checks them at the next sync point.

  Checking every step would block the host on the device each step. Checking at
  logging/eval/checkpoint steps costs nothing extra and still runs before any save,
  so a diverged state is never written.
  """

  def __init__(self):
    self._flags: list[tuple[int, Any]] = []

  def add(self, step: int, finite_flag: Any) -> None:
    self._flags.append((step, finite_flag))

  def check(self, last_good_checkpoint: Union[Optional[str],
                                              Callable[[], Optional[str]]]) -> None:
    """DivergenceError if a collected step was not finite.

    ``last_good_checkpoint``: the path the message names, or a function giving it,
    called only on divergence (e.g. one that waits for a save in flight first).
    """
    if not self._flags:
      return
    steps, flags = zip(*self._flags)
    flags = np.asarray(jax.device_get(list(flags)))
    self._flags.clear()
    if not flags.all():
      bad_step = steps[int(np.argmin(flags))]
      if callable(last_good_checkpoint):
        last_good_checkpoint = last_good_checkpoint()
      kept = (f"The last good checkpoint is kept intact: {last_good_checkpoint}."
              if last_good_checkpoint else "No checkpoint had been written yet.")
      raise DivergenceError(
          f"loss became NaN or infinite at step {bad_step}; training stopped without "
          f"saving the diverged state. {kept} Lower the learning rate, add warmup or "
          "gradient clipping, or check the input data.")


def exit_with_error(message: str, code: int = 1) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)
