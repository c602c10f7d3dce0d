"""Every notebook in colabs/ runs top to bottom (nbclient), with small settings.

The settings replace the notebook's ``parameters`` cell (papermill's convention):
a new cell after it overrides the values; nothing else in the notebook changes.
"""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO

COLABS = os.path.join(REPO, "colabs")


def settings(name, tfds_dir, pretrained, workdir):
  if name == "quickstart.ipynb":
    return {"WEIGHTS": pretrained}
  if name == "finetune_digits.ipynb":
    return {"TFDS_DIR": tfds_dir, "PRETRAINED": pretrained, "FINETUNE_STEPS": 10,
            "WORKDIR": workdir}
  raise AssertionError(f"no test settings for the new notebook {name}: add them here")


# Notebooks that another test module executes with its own fixtures.
EXECUTED_ELSEWHERE = {"zero_shot.ipynb": "tests/test_contrastive_train.py"}


def test_every_notebook_has_settings():
  names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(COLABS, "*.ipynb")))
  assert names == sorted(["finetune_digits.ipynb", "quickstart.ipynb",
                          *EXECUTED_ELSEWHERE])


@pytest.mark.parametrize("name", ["quickstart.ipynb", "finetune_digits.ipynb"])
def test_notebook_runs(name, tfds_dir, digits_pretrained, tmp_path, monkeypatch):
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  values = settings(name, tfds_dir, digits_pretrained[0], str(tmp_path / "work"))
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
      "\n".join(f"{k} = {v!r}" for k, v in values.items())))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": COLABS}}).execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
  if name == "quickstart.ipynb":
    assert "loaded 72 arrays" in text, text
    assert "round trip max |logit diff|" in text
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the attention map and the rollout
  else:
    assert "new (fresh init): head/bias (10,) -> (5,)" in text
    assert "few-shot top-1 by shots" in text
    assert os.path.exists(tmp_path / "work" / "finetuned.safetensors")
