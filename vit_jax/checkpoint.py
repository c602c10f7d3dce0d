"""Train-state checkpoints with Orbax.

A checkpoint is a step directory holding two items: ``state`` (the train state's
arrays, saved shard by shard from every host) and ``meta`` (JSON: step, examples
seen, the config). Orbax writes each step to a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoints intact; the
leftover temporary directory is ignored and cleaned up on the next start.
"""

import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from vit_jax import tree as tree_lib


class CheckpointError(RuntimeError):
  """A checkpoint cannot be restored into the requested state."""


def compare_trees(expected: Mapping[str, Any], found: Mapping[str, Any]
                  ) -> tuple[list[str], list[str], list[str]]:
  """Missing, unexpected and shape-mismatched names between two nested trees."""
  expected, found = tree_lib.flatten(expected), tree_lib.flatten(found)
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  mismatched = sorted(
      f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
      for k in set(expected) & set(found)
      if hasattr(found[k], "shape") and tuple(expected[k].shape) != tuple(found[k].shape))
  return missing, unexpected, mismatched


def describe_mismatch(missing, unexpected, mismatched, limit: int = 10) -> str:
  parts = []
  for title, names in (("missing", missing), ("unexpected", unexpected),
                       ("shape mismatch", mismatched)):
    if names:
      shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)"
                                          if len(names) > limit else "")
      parts.append(f"{title}: {shown}")
  return "; ".join(parts)


def absolute(path: str) -> epath.Path:
  """Orbax needs absolute paths; cloud paths (gs://...) already are."""
  path = str(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


class Checkpointer:
  """Saves and restores the train state under ``directory`` (keeps the last ``keep``)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Starts saving; arrays are copied off the devices before this returns."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores ``step`` into the structure, shapes and shardings of ``abstract_state``.

    A checkpoint of another architecture, or a corrupt one, raises CheckpointError
    naming the parameters that do not match.
    """
    path = self.directory / str(step)
    try:
      saved = self._manager.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). "
                            "Delete that step directory to resume from an earlier one, "
                            "or use a new --workdir.") from e
    saved_tree = getattr(saved, "tree", saved) or {}
    expected = getattr(abstract_state, "params", None)
    if expected is not None and "params" in saved_tree:
      missing, unexpected, mismatched = compare_trees(expected, saved_tree["params"])
      report = describe_mismatch(missing, unexpected, mismatched)
      if report:
        hint = ""
        scanned = lambda names: any("/encoderblock/" in n for n in names)
        if scanned(missing) != scanned(unexpected):
          hint = (" The ViT block layouts differ (scan_layers): convert the checkpoint "
                  "with vit_jax.models.vit.stack_block_params / unstack_block_params "
                  "(README, \"Memory options\"), or keep the run's scan_layers.")
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({report}). It was written by a "
            f"different model or config; use a new --workdir.{hint}")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot restore checkpoint {path}: {type(e).__name__}: {e}"
                            ) from e
    return restored.state, dict(restored.meta)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """Shape/dtype/sharding skeleton of a state, the target of a restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)



def latest_step_dir(workdir_or_checkpoints: str) -> epath.Path:
  """The newest committed step directory under a workdir or its ``checkpoints``."""
  root = epath.Path(workdir_or_checkpoints)
  if (root / "checkpoints").exists():
    root = root / "checkpoints"
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {workdir_or_checkpoints}")
  return root / str(steps[-1])


def load_state_arrays(step_dir: str, sharding: Optional[jax.sharding.Sharding] = None
                      ) -> dict:
  """Reads a checkpoint's ``state`` item as nested dicts of arrays on one device.

  Works whatever mesh wrote the checkpoint (8 devices with FSDP, several hosts):
  every array is assembled whole on ``sharding`` (default: the first local device).
  """
  path = epath.Path(step_dir) / "state"
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(path).item_metadata
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"checkpoint {step_dir} is unreadable: {e}") from e
  tree = getattr(metadata, "tree", metadata)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree,
      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
  return checkpointer.restore(path, target)
