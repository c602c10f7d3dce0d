"""Helpers shared by the tests (importable: ``tests`` is on pytest's pythonpath)."""

import os
import subprocess
import sys

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


def state_dict_of(outputs: dict) -> dict:
  """The ``state/...`` entries of a timm reference output, as a state dict."""
  return {k[len("state/"):]: v for k, v in outputs.items() if k.startswith("state/")}
