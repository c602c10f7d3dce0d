"""TensorBoard pictures of a short classification run, read back from its event file;
the same run also writes to a stand-in Weights & Biases (``config.wandb``)."""

import glob
import io
import os
import sys
import types

import numpy as np
import pytest

from helpers import train_in_process


class FakeRun:
  def __init__(self, kwargs):
    self.kwargs, self.id, self.logged, self.finished = kwargs, kwargs["id"], [], False
    self.config = types.SimpleNamespace(values={}, update=self._update)

  def _update(self, values, allow_val_change=False):
    self.config.values.update(values)

  def log(self, data, step):
    self.logged.append((step, data))

  def finish(self):
    self.finished = True


class FakeWandb(types.ModuleType):
  """wandb's calls the writer makes, recorded."""

  def __init__(self):
    super().__init__("wandb")
    self.runs = []
    self.util = types.SimpleNamespace(generate_id=lambda: f"id{len(self.runs)}")
    self.Image = lambda array: ("image", np.asarray(array))
    self.Histogram = lambda values, num_bins: ("histogram", np.asarray(values), num_bins)

  def init(self, **kwargs):
    self.runs.append(FakeRun(kwargs))
    return self.runs[-1]


@pytest.fixture(scope="module")
def events(tfds_dir, tmp_path_factory):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("pictures") / "run"
  wandb = FakeWandb()  # wandb is no dependency of vit_jax: a stand-in module
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(sys.modules, "wandb", wandb)
    train_in_process(tfds_dir, workdir, "vit_tiny_patch16_224", steps=2, batch_size=8,
                     image_size=16, patch_size=4, hidden_size=32, num_layers=2,
                     num_heads=2, mlp_dim=64,
                     config_overrides={"tensorboard_pictures": True, "profile_steps": 1,
                                       "wandb.project": "digits", "wandb.mode": "offline"})
  files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 1, files
  accumulator = event_accumulator.EventAccumulator(files[0], size_guidance={
      event_accumulator.TENSORS: 0})
  accumulator.Reload()
  tensors = {tag: accumulator.Tensors(tag) for tag in accumulator.Tags()["tensors"]}
  return {"tensors": tensors, "workdir": str(workdir), "wandb": wandb}


def test_profile_steps_write_a_profiler_trace(events):
  traces = glob.glob(os.path.join(events["workdir"], "tensorboard", "plugins", "profile",
                                  "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def decode_images(event):
  """The images of one tf.summary.image event: [width, height, png, png, ...]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  strings = event.tensor_proto.string_val
  return [np.asarray(Image.open(io.BytesIO(png))) for png in strings[2:]]


def test_run_writes_input_grid_attention_histograms_and_hparams(events):
  events = events["tensors"]
  (grid,) = events["train/inputs"]
  assert grid.step == 0
  (image,) = decode_images(grid)
  # 8 inputs of 16x16 (1-pixel gaps) in one row; each image scaled to its own range.
  assert image.shape[:2] == (17, 8 * 17) and image.max() == 255
  for tag in ("attention/rollout", "attention/last_block"):
    (event,) = events[tag]
    assert event.step == 2  # the evaluation at the last step
    maps = decode_images(event)
    assert len(maps) == 4 and all(m.shape == (96, 96, 3) for m in maps)
    # The heat (red) differs between patches: the maps are not blank.
    assert all(m[..., 0].std() > 0 for m in maps)
  (histogram,) = events["params/norms"]
  buckets = np.frombuffer(histogram.tensor_proto.tensor_content, np.float64).reshape(-1, 3)
  # One count per parameter tensor of the 2-block ViT.
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create("vit_tiny_patch16_224", num_classes=10, image_size=16,
                        patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 16, 16, 3)))
  assert buckets[:, 2].sum() == len(jax.tree.leaves(shapes["params"]))
  assert "_hparams_/session_start_info" in events


def test_image_grid_scales_each_image_and_pads():
  from vit_jax.trainers.pictures import image_grid  # pylint: disable=g-import-not-at-top
  images = np.stack([np.full((2, 2, 1), 5.0), np.arange(4.0).reshape(2, 2, 1)])
  grid = image_grid(images, columns=2, pad=1)
  assert grid.shape == (1, 3, 6, 1)
  np.testing.assert_allclose(grid[0, :2, 3:5, 0], [[0, 1 / 3], [2 / 3, 1]])
  np.testing.assert_allclose(grid[0, :2, :2, 0], 0.0)  # a constant image: all 0
  np.testing.assert_allclose(grid[0, 2], 1.0)  # the gap row


class RecordingWriter:
  def __init__(self):
    self.calls = []

  def __getattr__(self, name):
    return lambda *args: self.calls.append((name, *args))


def test_models_without_plain_vit_blocks_get_histograms_but_no_attention(capsys):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers.pictures import Pictures  # pylint: disable=g-import-not-at-top
  writer = RecordingWriter()
  pictures = Pictures(writer, None, ml_collections.ConfigDict({"a": {"b": 1}}),
                      enabled=True)
  pictures.set_eval_images(np.zeros((2, 8, 8, 3)))
  params = {"stages_0": {"kernel": np.full((3, 4), 2.0, np.float32)}}  # a Swin-like tree
  for step in (5, 10):
    pictures.evaluation(step, {"params": params})
  assert [c[0] for c in writer.calls] == ["write_hparams", "write_histograms",
                                          "write_histograms"]
  assert writer.calls[0][1] == {"a.b": 1}
  np.testing.assert_allclose(writer.calls[1][2]["params/norms"], [np.sqrt(12 * 4.0)])
  out = capsys.readouterr().out
  assert out.count("attention pictures need a plain ViT") == 1  # said once


def test_hierarchical_models_get_per_stage_feature_maps(capsys):
  """A Swin has no token-by-token attention map: each stage's feature norms instead,
  one heat map per eval image and stage, at the stage's own resolution."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers.pictures import Pictures, _stage_norms  # pylint: disable=g-import-not-at-top
  model = models.create("swin_tiny_patch4_window7_224", image_size=32, patch_size=4,
                        embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                        num_classes=10)
  images = np.asarray(jax.random.uniform(jax.random.key(0), (3, 32, 32, 3)))
  variables = model.init(jax.random.key(1), images[:1])
  writer = RecordingWriter()
  pictures = Pictures(writer, model, ml_collections.ConfigDict({}), enabled=True)
  pictures.set_eval_images(images)
  for step in (5, 10):
    pictures.evaluation(step, variables)
  written = [c for c in writer.calls if c[0] == "write_images"]
  assert [c[1] for c in written] == [5, 10]
  assert sorted(written[0][2]) == ["features/stage_0", "features/stage_1"]
  assert all(v.shape == (3, 96, 96, 3) for v in written[0][2].values())
  norms = _stage_norms(model, variables, images)
  _, sown = models.forward_intermediates(model, variables, images)
  assert norms["stage_0"].shape == (3, 8, 8) and norms["stage_1"].shape == (3, 4, 4)
  np.testing.assert_allclose(norms["stage_1"], np.linalg.norm(sown["stage_1"], axis=-1),
                             rtol=1e-5)
  assert capsys.readouterr().out.count("features/stage_0..1") == 1


def test_wandb_writer_gets_what_tensorboard_gets(events):
  (run,) = events["wandb"].runs
  workdir = events["workdir"]
  assert run.kwargs["project"] == "digits" and run.kwargs["mode"] == "offline"
  assert run.kwargs["resume"] == "allow" and run.kwargs["dir"] == workdir
  with open(os.path.join(workdir, "wandb_run_id")) as f:
    assert f.read() == run.id  # a resume continues this W&B run
  assert run.kwargs["config"]["wandb"]["project"] == "digits"
  logged = {}
  for step, data in run.logged:
    for key, value in data.items():
      logged.setdefault(key, []).append((step, value))
  (step, grid), = logged["train/inputs"]
  assert step == 0 and grid[0][0] == "image" and grid[0][1].shape == (17, 136, 3)
  assert grid[0][1].dtype == np.uint8 and grid[0][1].max() == 255
  (step, maps), = logged["attention/rollout"]
  assert step == 2 and len(maps) == 4 and maps[0][1].shape == (96, 96, 3)
  (step, (_, norms, bins)), = logged["params/norms"]
  tb_norms = events["tensors"]["params/norms"][0]
  counts = np.frombuffer(tb_norms.tensor_proto.tensor_content, np.float64).reshape(-1, 3)
  assert step == 2 and len(norms) == counts[:, 2].sum() and bins > 0
  assert [s for s, _ in logged["train/loss"]] == [2]
  assert isinstance(logged["train/loss"][0][1], float)
  assert [s for s, _ in logged["eval/top1"]] == [2]
  assert run.config.values["model_name"] == "vit_tiny_patch16_224"
  assert run.finished


def test_wandb_is_off_by_default_and_a_clear_error_when_missing(tmp_path, monkeypatch):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import common, wandb_writer  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"wandb": {"project": "", "entity": "", "name": "",
                                                "mode": ""}})
  assert wandb_writer.from_config(config, tmp_path, common.write_text_atomic) is None
  assert wandb_writer.from_config(ml_collections.ConfigDict(), tmp_path,
                                   common.write_text_atomic) is None
  config.wandb.project = "p"
  monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
  with pytest.raises(ImportError, match=r"config.wandb.project='p' turns on the Weights "
                     r"& Biases writer, but wandb is not installed .*`pip install wandb`"):
    wandb_writer.from_config(config, tmp_path, common.write_text_atomic)
  wandb = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", wandb)
  first = wandb_writer.from_config(config, tmp_path, common.write_text_atomic)
  first.write_scalars(3, {"train/loss": np.float32(0.5)})
  first.close()
  wandb_writer.from_config(config, tmp_path, common.write_text_atomic).close()  # the resumed run
  assert [r.id for r in wandb.runs] == ["id0", "id0"]
  assert wandb.runs[0].logged == [(3, {"train/loss": 0.5})]
  assert "entity" not in wandb.runs[0].kwargs  # empty settings are wandb's defaults
