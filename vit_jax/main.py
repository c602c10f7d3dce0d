r"""Entry point: ``python -m vit_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR``.

Any config field can be overridden: ``--config.total_steps=100``. Rerunning the same
command on the same workdir resumes from its latest checkpoint.

Multi-host: the same command runs on every host (one process per host, or per GPU).
On TPU pods, SLURM (``srun``) and Open MPI the processes find each other by
themselves (``jax.distributed.initialize()``); elsewhere pass
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (what
``launch/local.sh`` does for several processes on one machine). See launch/.
"""

import difflib
import importlib
import os
import sys

# Quiet TensorFlow's C++ start-up logging; TF only feeds data here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file, optionally with ':arg'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, "
                               "TensorBoard logs and results; reused to resume.")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a multi-process run "
    "without a cluster manager (TPU pods and SLURM need no flags).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run "
                                      "(with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in "
                                   "[0, num_processes) (with --coordinator_address).")

TRAINERS = ("classification", "contrastive", "mae")


def _unknown_override_message(argv: list[str]) -> str:
  """Names the first ``--config.a.b=v`` whose key the config does not have."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg is None:
    return ""
  try:  # the config without the overrides, loaded the way --config loads it
    argv_without_overrides = ["main", f"--config={config_arg}"]
    own_flags = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file("config", flag_values=own_flags,
                                                  sys_argv=argv_without_overrides)
    own_flags(argv_without_overrides)
    config = config_flag.value
  except Exception:  # pylint: disable=broad-except
    return ""
  for a in argv:
    if not a.startswith("--config."):
      continue
    path = a[len("--config."):].split("=", 1)[0].split(".")
    node = config
    for depth, key in enumerate(path):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        parent = ".".join(path[:depth]) or "the config"
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(key, keys, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return (f"unknown config key {'.'.join(path)!r} in {a.split('=', 1)[0]}: "
                f"{parent} has no field {key!r}.{hint}")
      node = node[key]
  return ""


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # config_flags reports an unknown override key as a bare AttributeError.
    message = _unknown_override_message(argv) or str(e)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def initialize_distributed() -> None:
  """Joins the other processes of a multi-host run; a no-op for a single process.

  Must run before anything touches a JAX device.
  """
  import jax  # pylint: disable=g-import-not-at-top
  # Cross-process collectives on CPU go through gloo (GPUs/TPUs have their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  explicit = {"--coordinator_address": _COORDINATOR.value,
              "--num_processes": _NUM_PROCESSES.value, "--process_id": _PROCESS_ID.value}
  if any(v is not None for v in explicit.values()):
    missing = [k for k, v in explicit.items() if v is None]
    if missing:
      raise app.UsageError(f"{', '.join(missing)} missing: a multi-process run without "
                           "a cluster manager needs all of " + ", ".join(explicit))
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
    return
  try:  # TPU pods, SLURM and Open MPI are detected from the environment
    jax.distributed.initialize()
  except ValueError:  # none of them: one process on its own
    pass
  except RuntimeError:  # JAX already started in this process (a notebook, a test):
    pass  # it runs as the process it already is


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from vit_jax import config_checks  # pylint: disable=g-import-not-at-top
  try:  # before JAX and TensorFlow load (~20 s on 2 cores): a bad setting fails at once
    config_checks.validate(_CONFIG.value)
  except ValueError as e:
    if flags.FLAGS["verbosity"].present:
      raise
    print(f"error: ValueError: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  initialize_distributed()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import common  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")  # the accelerators belong to JAX
  except RuntimeError:  # TF already started in this process (a notebook, a test)
    pass
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)

  config = _CONFIG.value
  if config.get("trainer") not in TRAINERS:
    common.exit_with_error(f"config.trainer={config.get('trainer')!r}; expected one of "
                           f"{', '.join(TRAINERS)}")
  trainer = importlib.import_module(f"vit_jax.trainers.{config.trainer}")
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except common.DivergenceError as e:
    common.exit_with_error(str(e))
  except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
    # Configuration, data and checkpoint problems get one clear line; pass
    # --verbosity=0 (or higher) to see the traceback instead.
    if flags.FLAGS["verbosity"].present:
      raise
    common.exit_with_error(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
