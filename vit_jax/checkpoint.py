"""Train-state checkpoints with Orbax, verified by checksums.

A checkpoint is a step directory holding two items, ``state`` (the train state's
arrays, saved shard by shard from every host) and ``meta`` (JSON: step, examples
seen, the run's config), and ``checksums.json``: the size and SHA-256 of every other
file of the step. Orbax writes each step to a temporary directory and renames it when
complete; the checksums are recorded inside that directory just before the rename
(Orbax's post-finalization hook), so every committed step carries its record, and a
run killed mid-save leaves the previous checkpoints intact (the leftover temporary
directory is removed on the next start). Orbax's own layout checksums only the zarr
shard index, not the array data, hence the record.

``Checkpointer.restore_latest`` verifies the newest step before restoring it. A step
whose files differ from the record (a flipped byte, a truncated or deleted file) or
that Orbax cannot read is moved aside to ``<step>.corrupt`` with a warning saying what
was wrong, and the next older step is tried. A checkpoint that does not fit the model
or the optimizer is an error naming the settings that changed, never a fallback.
"""

import hashlib
import json
import os
from typing import Any, Mapping, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vit_jax import config_checks
from vit_jax import tree as tree_lib

CHECKSUMS_FILE = "checksums.json"
# Written by Orbax after the record: the commit marker on object stores.
_UNRECORDED = frozenset({CHECKSUMS_FILE, "commit_success.txt"})
# Rewritten by Orbax at the commit (it holds the commit time): recorded as present.
_PRESENCE_ONLY = frozenset({"_CHECKPOINT_METADATA"})
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(RuntimeError):
  """A checkpoint cannot be saved, or restored into the requested state."""


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


def first_line(error: BaseException, limit: int = 300) -> str:
  """``Type: message`` cut to its first line (TensorStore errors run to pages), its
  middle left out when long: the operating system's reason comes last."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  if len(text) > limit:
    text = f"{text[:limit // 2]} ... {text[-limit // 2:]}"
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ---------------------------------------------------------------- checksum record

def _files(directory: epath.Path) -> list[str]:
  """Every file under ``directory``, as sorted ``/``-separated relative paths."""
  names = []
  for root, _, files in directory.walk():
    relative = os.path.relpath(str(root), str(directory))
    for name in files:
      names.append(name if relative == "." else f"{relative}/{name}".replace(os.sep, "/"))
  return sorted(names)


def _digest(path: epath.Path) -> tuple[int, str]:
  sha, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    while chunk := f.read(1 << 22):
      sha.update(chunk)
      size += len(chunk)
  return size, sha.hexdigest()


def record_checksums(step_dir: epath.Path) -> None:
  """Writes ``checksums.json``: size and SHA-256 of every file of a written step."""
  files = {}
  for name in _files(step_dir):
    if name in _PRESENCE_ONLY:
      files[name] = {}
    elif name not in _UNRECORDED:
      size, sha = _digest(step_dir / name)
      files[name] = {"bytes": size, "sha256": sha}
  (step_dir / CHECKSUMS_FILE).write_text(json.dumps({"files": files}, indent=1))


def verify(step_dir: epath.Path) -> Optional[str]:
  """What is wrong with a step directory's files, or None if they match the record.

  A step without a record (written before checksums were recorded) passes with a
  warning: Orbax's own checks are all it gets.
  """
  step_dir = epath.Path(step_dir)
  record_path = step_dir / CHECKSUMS_FILE
  if not record_path.exists():
    if not step_dir.exists():
      return "the step directory is missing"
    logging.warning("checkpoint %s has no checksum record (%s); it is read unverified",
                    step_dir, CHECKSUMS_FILE)
    return None
  try:
    recorded = json.loads(record_path.read_text())["files"]
  except Exception as e:  # pylint: disable=broad-except
    return f"its checksum record {CHECKSUMS_FILE} is unreadable ({first_line(e)})"
  problems = []
  for name, expected in sorted(recorded.items()):
    path = step_dir / name
    if not path.exists():
      problems.append(f"{name} is missing")
      continue
    if not expected:
      continue
    size, sha = _digest(path)
    if size != expected["bytes"]:
      problems.append(f"{name} has {size:,} bytes, {expected['bytes']:,} were written")
    elif sha != expected["sha256"]:
      problems.append(f"{name} differs from what was written (SHA-256 mismatch)")
  if not problems:
    return None
  shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} files in all)"
                                     if len(problems) > 3 else "")
  return f"files changed since the save: {shown}"


# ---------------------------------------------------------------- state layout

def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{"params/a/kernel": shape}`` of an abstract state or of Orbax's metadata tree."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
  return {tree_lib.path_name(path): tuple(leaf.shape) for path, leaf in leaves
          if hasattr(leaf, "shape")}


def _compare_part(expected: dict, found: dict, prefix: str
                  ) -> tuple[list[str], list[str], list[str]]:
  """``compare_trees`` for the names under ``prefix`` of two ``_shapes`` results."""
  expected = {n[len(prefix):]: s for n, s in expected.items() if n.startswith(prefix)}
  found = {n[len(prefix):]: s for n, s in found.items() if n.startswith(prefix)}
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  mismatched = sorted(f"{k}: expected {expected[k]}, found {found[k]}"
                      for k in set(expected) & set(found) if expected[k] != found[k])
  return missing, unexpected, mismatched


class Restored(NamedTuple):
  step: int
  state: Any
  meta: dict


class Checkpointer:
  """Saves and restores the train state under ``directory`` (keeps the last ``keep``).

  ``config`` (the run's ``ConfigDict``) is saved with every step, so that a resume
  names the settings that changed since.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               config: Any = None):
    self.directory = absolute(directory)
    self._async = async_save
    self._config = (json.loads(config.to_json_best_effort()) if config is not None
                    else None)
    self._saving: Optional[int] = None  # the step of the last save started
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._record))
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  # -------------------------------------------------------------- saving

  def _record(self) -> None:
    """Orbax's post-finalization hook (main process, after every process wrote its
    part): the step is complete in its temporary directory, not yet renamed."""
    if jax.process_index() != 0:
      return
    step = self._saving
    pending = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
    # Object stores write in place and commit with a marker file written after this.
    record_checksums(pending[-1] if pending else self.directory / str(step))

  def _save_failed(self, error: Exception) -> CheckpointError:
    self._manager.reload()
    kept = self.all_steps()
    intact = (f"the earlier checkpoints are intact (steps {', '.join(map(str, kept))}); "
              "free space (or fix the storage) and rerun the same command to resume "
              f"from step {max(kept)}" if kept else "no earlier checkpoint exists")
    return CheckpointError(f"saving checkpoint {self.directory / str(self._saving)} "
                           f"failed ({first_line(error)}); {intact}")

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Starts saving; arrays are copied off the devices before this returns.

    A failed earlier save raises CheckpointError here (or in ``wait``).
    """
    self.wait()
    self._saving = step
    meta = dict(meta)
    if self._config is not None:
      meta["config"] = self._config
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e
    if not self._async:
      self.wait()

  def wait(self) -> None:
    """Waits for a save in flight; CheckpointError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e

  def newest_committed(self) -> Optional[str]:
    """The newest complete step directory, once any save in flight has ended."""
    try:
      self.wait()
    except CheckpointError as e:
      logging.warning("%s", e)
    self._manager.reload()
    step = self._manager.latest_step()
    return None if step is None else str(self.directory / str(step))

  def close(self) -> None:
    self.wait()
    self._manager.close()

  # -------------------------------------------------------------- restoring

  def _saved_config(self, step: int) -> Optional[dict]:
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
    except Exception:  # pylint: disable=broad-except
      return None
    return (meta or {}).get("config")

  def check_fits(self, step: int, abstract_state: Any) -> None:
    """CheckpointError naming what differs, if ``step`` cannot restore into the state."""
    path = self.directory / str(step)
    try:
      saved = self._manager.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {path} is unreadable ({first_line(e)}). "
                            "Delete that step directory to resume from an earlier one, "
                            "or use a new --workdir.") from e
    found = _shapes(getattr(saved, "tree", saved) or {})
    expected = _shapes(abstract_state)
    changed = config_checks.changed_settings(self._saved_config(step), self._config)
    since = (f" Settings changed since it was saved: {'; '.join(changed[:8])}."
             if changed else "")
    missing, unexpected, mismatched = _compare_part(expected, found, "params/")
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
          f"different model or config; use a new --workdir.{since}{hint}")
    for part, what in (("opt_state/", "an optimizer state"),
                       ("model_state/", "a model state (e.g. BatchNorm statistics)")):
      report = describe_mismatch(*_compare_part(expected, found, part))
      if report:
        raise CheckpointError(
            f"checkpoint {path} holds {what} that does not fit this run ({report})."
            f"{since or ' It was written with other settings.'} Resume with the "
            "settings it was written with, or use a new --workdir.")

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores ``step`` into the structure, shapes and shardings of ``abstract_state``.

    A checkpoint of another architecture or optimizer raises CheckpointError naming
    what does not match; so does one that cannot be read.
    """
    self.check_fits(step, abstract_state)
    try:
      return self._read(step, abstract_state)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot restore checkpoint {self.directory / str(step)}: "
                            f"{first_line(e)}") from e

  def restore_latest(self, abstract_state: Any) -> Optional[Restored]:
    """The newest good step, restored; None when there is no checkpoint.

    Newer steps that fail verification or cannot be read are moved aside to
    ``<step>.corrupt`` with a warning. When no step is good the run stops
    (CheckpointError): starting afresh would in time delete them.
    """
    bad: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      problem = _agree(lambda: verify(self.directory / str(step)))  # pylint: disable=cell-var-from-loop
      if problem is None:
        self.check_fits(step, abstract_state)  # a settings error: no fallback
        try:
          state, meta = self._read(step, abstract_state)
        except Exception as e:  # pylint: disable=broad-except
          if jax.process_count() > 1:  # every process must restore the same step
            raise CheckpointError(f"cannot restore checkpoint {self.directory / str(step)}"
                                  f": {first_line(e)}") from e
          problem = f"Orbax cannot read it ({first_line(e)})"
      if problem is not None:
        logging.warning("checkpoint %s is corrupt: %s", self.directory / str(step), problem)
        bad.append((step, problem))
        continue
      self._set_aside(bad, step)
      changed = config_checks.changed_settings(meta.get("config"), self._config)
      if changed:
        logging.warning("resuming from step %d with settings changed since it was saved: "
                        "%s", step, "; ".join(changed))
      return Restored(step, state, meta)
    if bad:
      listing = "; ".join(f"step {s}: {p}" for s, p in bad)
      raise CheckpointError(
          f"no usable checkpoint in {self.directory} ({listing}). Move them away to "
          "start afresh, or use a new --workdir.")
    return None

  def _set_aside(self, bad: list[tuple[int, str]], good: int) -> None:
    if not bad:
      return
    moved = []
    if jax.process_index() == 0:
      for step, _ in bad:
        source = self.directory / str(step)
        target = self.directory / f"{step}{CORRUPT_SUFFIX}"
        n = 1
        while target.exists():
          n += 1
          target = self.directory / f"{step}{CORRUPT_SUFFIX}{n}"
        source.rename(target)
        moved.append(target.name)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("vit_jax checkpoint set aside")
    self._manager.reload()
    if moved:
      logging.warning("resuming from the newest good checkpoint, step %d; the corrupt "
                      "ones are kept as %s under %s (delete them when done)", good,
                      ", ".join(moved), self.directory)


def _agree(problem_of_main_process) -> Optional[str]:
  """The main process's verdict, on every process (all must restore the same step)."""
  if jax.process_count() == 1:
    return problem_of_main_process()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  problem = problem_of_main_process() if jax.process_index() == 0 else None
  bad = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
  if bad and problem is None:
    problem = "failed verification on the main process"
  return problem if bad else None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """Shape/dtype/sharding skeleton of a state, the target of a restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def latest_step_dir(workdir_or_checkpoints: str) -> epath.Path:
  """The newest committed step directory that verifies, under a workdir or its
  ``checkpoints``; corrupt newer ones are skipped with a warning."""
  root = epath.Path(workdir_or_checkpoints)
  if (root / "checkpoints").exists():
    root = root / "checkpoints"
  steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {workdir_or_checkpoints}")
  problems = []
  for step in steps:
    problem = verify(root / str(step))
    if problem is None:
      return root / str(step)
    logging.warning("skipping checkpoint %s: %s", root / str(step), problem)
    problems.append(f"step {step}: {problem}")
  raise CheckpointError(f"no usable checkpoint under {workdir_or_checkpoints} "
                        f"({'; '.join(problems)})")


def load_state_arrays(step_dir: str, sharding: Optional[jax.sharding.Sharding] = None
                      ) -> dict:
  """Reads a checkpoint's ``state`` item as nested dicts of arrays on one device.

  Works whatever mesh wrote the checkpoint (8 devices with FSDP, several hosts):
  every array is assembled whole on ``sharding`` (default: the first local device).
  The step's files are verified against its checksum record first.
  """
  problem = verify(epath.Path(step_dir))
  if problem is not None:
    raise CheckpointError(f"checkpoint {step_dir} is corrupt: {problem}")
  path = epath.Path(step_dir) / "state"
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(path).item_metadata
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"checkpoint {step_dir} is unreadable: {first_line(e)}") from e
  tree = getattr(metadata, "tree", metadata)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree,
      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
  try:
    return checkpointer.restore(path, target)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"cannot read checkpoint {step_dir}: {first_line(e)}") from e
