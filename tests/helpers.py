"""Helpers shared by the tests (importable: ``tests`` is on pytest's pythonpath)."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(num_devices: int = 1, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if num_devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_main(config: str, workdir, *overrides, num_devices: int = 1, timeout=600,
             check: bool = True, cwd: str = REPO) -> subprocess.CompletedProcess:
  """Runs ``python -m vit_jax.main`` as a user would; returns the finished process.

  ``config`` is relative to the repository; ``workdir`` may be relative to ``cwd``.
  """
  cmd = [sys.executable, "-m", "vit_jax.main", f"--config={os.path.join(REPO, config)}",
         f"--workdir={workdir}", *overrides]
  proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(num_devices),
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def run_command(module: str, *args: str) -> tuple[int, str]:
  """Runs ``python -m module *args`` in this process; returns (exit code, stdout).

  The command's absl flags are defined, parsed and removed again, so that commands
  with flags of the same name run one after another.
  """
  proc = _run_module_in_process(module, args, cwd=None)
  sys.stderr.write(proc.stderr)  # for pytest to show if the test fails
  return proc.returncode, proc.stdout


def run_main_in_process(config: str, workdir, *overrides, check: bool = True,
                        cwd: str = REPO) -> subprocess.CompletedProcess:
  """``run_main`` without a new interpreter: ``python -m vit_jax.main`` runs in this
  process, with its stdout, stderr and absl warnings captured.

  Saves the ~15-20 s of interpreter and TensorFlow start-up that every ``run_main``
  pays on 2 cores. Use ``run_main`` where the run must be its own process: one that
  is killed, or one on virtual devices.
  """
  args = (f"--config={os.path.join(REPO, config)}", f"--workdir={workdir}", *overrides)
  proc = _run_module_in_process("vit_jax.main", args, cwd=cwd)
  if check and proc.returncode != 0:
    raise AssertionError(f"vit_jax.main {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def _run_module_in_process(module: str, args, cwd) -> subprocess.CompletedProcess:
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  import runpy  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  before = set(flags.FLAGS)
  argv, sys.argv = sys.argv, [module, *args]
  out, err = io.StringIO(), io.StringIO()
  # absl's handler holds the real stderr; a second handler copies its records here.
  absl_logger = logging.getLogger("absl")
  to_err = logging.StreamHandler(err)
  absl_logger.addHandler(to_err)
  old_cwd = os.getcwd()
  code = 0
  try:
    if cwd is not None:
      os.chdir(cwd)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    os.chdir(old_cwd)
    absl_logger.removeHandler(to_err)
    sys.argv = argv
    # Flags of our modules (the command's, and those of commands it imported as
    # libraries) and ml_collections' per-override "config.a.b" flags go; libraries'
    # (absl's verbosity, grain's) stay: their module is imported once, would not
    # define them again, and reads them. runpy names the command by its file.
    for name in set(flags.FLAGS) - before:
      defined_by = flags.FLAGS.find_module_defining_flag(name, "")
      if "." in name or defined_by == "__main__" or defined_by.startswith(
          ("vit_jax", REPO)):
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
  return subprocess.CompletedProcess([module, *args], code, out.getvalue(),
                                     err.getvalue())


def state_dict_of(outputs: dict) -> dict:
  """The ``state/...`` entries of a timm reference output, as a state dict."""
  return {k[len("state/"):]: v for k, v in outputs.items() if k.startswith("state/")}


def assert_matches_reference(out: dict, logits, intermediates: dict, *, label: str = "",
                             atol: float = 1e-4) -> dict:
  """Checks logits, ``features`` and every ``stage_{i}`` map against a reference output
  (``official_ref.py`` names: ``logits``, ``features``, ``stage/{i}``) within ``atol``;
  prints and returns the max differences. Near-zero reference logits are an error: a
  comparison of them would prove little.
  """
  diffs = {"logits": np.abs(np.asarray(logits) - out["logits"]).max(),
           "features": np.abs(np.asarray(intermediates["features"]) - out["features"]).max()}
  stages = sorted(k for k in out if k.startswith("stage/"))
  for key in stages:
    ours = np.asarray(intermediates[f"stage_{key.split('/')[1]}"])
    assert ours.shape == out[key].shape, (key, ours.shape, out[key].shape)
    diffs[key] = np.abs(ours - out[key]).max()
  print(label, {k: f"{v:.1e}" for k, v in diffs.items()},
        f"mean |logit| {np.abs(out['logits']).mean():.2f}")
  assert stages and max(diffs.values()) < atol, diffs
  assert np.abs(out["logits"]).mean() > 0.1, "reference logits near zero"
  return diffs


def run_timm_reference(jobs: list[dict], directory, script: str = "timm_ref.py"
                       ) -> list[dict]:
  """Runs timm models in a subprocess (torch never meets TF); returns loaded ``.npz``s.

  Each job is a ``tests/timm_ref.py`` job with ``images`` (NHWC array) in place of
  ``input``/``out``. Batch all the jobs of a test module into one call: starting
  torch costs seconds. Use from a fixture of any scope. ``script="official_ref.py"``
  runs the re-creations of official implementations instead (same job format).
  """
  directory = str(directory)
  specs = []
  for i, job in enumerate(jobs):
    job = dict(job)
    if "images" in job:
      np.save(os.path.join(directory, f"timm_in{i}.npy"),
              np.asarray(job.pop("images"), np.float32))
      job["input"] = os.path.join(directory, f"timm_in{i}.npy")
    specs.append({**job, "out": os.path.join(directory, f"timm_out{i}.npz")})
  jobs_file = os.path.join(directory, "timm_jobs.json")
  with open(jobs_file, "w") as f:
    json.dump(specs, f)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", script),
                         jobs_file], env=subprocess_env(), capture_output=True, text=True,
                        timeout=900)
  if proc.returncode:
    raise AssertionError(f"{script} failed:\n{proc.stderr[-5000:]}")
  return [dict(np.load(s["out"])) for s in specs]


def train_in_process(tfds_dir: str, workdir, model_name: str, *, steps: int = 20,
                     input_size: int = 16, batch_size: int = 32, learning_rate=1e-3,
                     config_overrides: dict | None = None, **model_overrides) -> dict:
  """Trains a model through the real classification trainer on digits, in-process.

  Cheaper than ``run_main`` (no interpreter and TF start-up) for checks such as "this
  family trains and its loss goes down". Digits are resized to ``input_size``;
  ``model_overrides`` go to ``models.create`` (pass the model's own ``image_size`` if
  it has one). Returns the trainer's result dict, with
  ``train_loss_history`` logged every 5 steps.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import digits_vit  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import classification  # pylint: disable=g-import-not-at-top
  config = digits_vit.get_config()
  config.input.data_dir = tfds_dir
  config.input.batch_size = batch_size
  config.input.pp_train = (f"decode|resize({input_size})|"
                           f"random_crop({input_size}, pad={max(input_size // 8, 1)})|"
                           "value_range(-1, 1)")
  config.input.pp_eval = f"decode|resize({input_size})|value_range(-1, 1)"
  config.model_name = model_name
  config.model = ml_collections.ConfigDict(model_overrides)
  config.optimizer.learning_rate = learning_rate
  config.schedule.warmup_steps = min(5, steps - 1)
  config.total_steps = steps
  config.log_every = 5
  config.eval_every = 0
  config.checkpoint_every = steps
  config.label_smoothing = 0.0
  config.tensorboard_pictures = False  # its own test turns them on (one compile each)
  for key, value in (config_overrides or {}).items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return classification.train_and_evaluate(config, str(workdir))


def check_trained_batch_stats(tfds_dir: str, workdir, result: dict, model, *,
                              input_size: int) -> dict:
  """For a BatchNorm model trained with ``train_in_process``: checks that training
  moved the running statistics away from their initial values and that the trainer's
  evaluation used them (its reported eval loss is reproduced with the trained
  statistics, and differs with the initial ones). Returns the trained state.
  """
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, sharding  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import classification as classification_eval  # pylint: disable=g-import-not-at-top
  state = checkpoint.load_state_arrays(
      os.path.join(str(workdir), "checkpoints", str(result["step"])))
  trained = state["model_state"]["batch_stats"]
  # BatchNorm starts from mean 0 and variance 1 (nn.BatchNorm's initial statistics).
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, input_size, input_size, 3)))["batch_stats"]
  initial = flax.traverse_util.unflatten_dict({
      path: np.zeros(s.shape, s.dtype) if path[-1] == "mean" else np.ones(s.shape, s.dtype)
      for path, s in flax.traverse_util.flatten_dict(shapes).items()})
  moved = jax.tree.map(lambda a, b: bool(np.any(np.abs(np.asarray(a) - b) > 1e-4)),
                       trained, initial)
  assert all(jax.tree.leaves(moved)), "some BatchNorm statistics never changed"

  mesh = sharding.make_mesh({"data": -1})
  evaluator = classification_eval.ClassificationEvaluator(
      lambda v, x: model.apply(v, x, train=False),
      input_pipeline.get_builder("digits", tfds_dir), "test",
      preprocess_fn=preprocess.parse(
          f"decode|resize({input_size})|value_range(-1, 1)"),
      batch_size=360, sharding=sharding.batch_sharding(mesh))
  with_trained = evaluator.run({"params": state["params"], "batch_stats": trained})
  with_initial = evaluator.run({"params": state["params"], "batch_stats": initial})
  np.testing.assert_allclose(with_trained["loss"], result["eval_loss"], rtol=1e-5)
  assert abs(with_initial["loss"] - with_trained["loss"]) > 1e-3
  return state


def intermediate_shapes(model, shape):
  """(logits shape, {sown name: shape}) of ``model`` on float32 images of ``shape``:
  traced only, nothing computed."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top

  def run(x):
    return models.forward_intermediates(model, model.init(jax.random.key(0), x), x)

  logits, inter = jax.eval_shape(run, jax.ShapeDtypeStruct(shape, jnp.float32))
  return logits.shape, {k: v.shape for k, v in inter.items()}
