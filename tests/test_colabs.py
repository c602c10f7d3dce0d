"""The notebooks in colabs/ as a user runs them: from any directory, package installed.

Each notebook is executed top to bottom (nbclient) with the current directory a fresh
temporary one and no ``PYTHONPATH``: the kernel imports the installed package (``make
test``'s venv has ``pip install -e .``), and configs and data are found through it,
never relative to the working directory. Small settings replace the notebook's
``parameters`` cell (papermill's convention): a cell inserted after it overrides the
values; nothing else in the notebook changes. ``zero_shot.ipynb`` needs a trained
contrastive workdir, which tests/test_contrastive_train.py has: it runs there, as
``token_merging.ipynb`` runs in tests/test_token_reduction.py.
"""

import glob
import importlib.util
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO

COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(COLABS, "*.ipynb")))

# Notebooks that another test module executes with its own fixtures.
EXECUTED_ELSEWHERE = {"zero_shot.ipynb": "tests/test_contrastive_train.py",
                      "token_merging.ipynb": "tests/test_token_reduction.py"}


def settings(name, tfds_dir, pretrained, workdir):
  if name == "quickstart.ipynb":
    return {"WEIGHTS": pretrained}
  if name == "finetune_digits.ipynb":
    # Pictures cost a third of the fine-tune cell; tests/test_tensorboard_pictures.py
    # checks them.
    return {"TFDS_DIR": tfds_dir, "PRETRAINED": pretrained, "FINETUNE_STEPS": 4,
            "WORKDIR": workdir, "TENSORBOARD_PICTURES": False}
  raise AssertionError(f"no test settings for the new notebook {name}: add them here")


def load_install_module():
  spec = importlib.util.spec_from_file_location("colab_install",
                                                os.path.join(COLABS, "install.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_notebook_has_settings():
  assert NOTEBOOKS == sorted(["finetune_digits.ipynb", "quickstart.ipynb",
                              *EXECUTED_ELSEWHERE])


def test_notebooks_open_with_one_install_cell_and_assume_no_directory():
  """The same setup cell first; no forced platform, no paths relative to a clone's
  colabs/; a README badge per notebook, all on the one repository URL."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  first_cells = set()
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    first_cells.add(code[0])
    everything = "\n".join(code)
    for bad in ("JAX_PLATFORMS", "../", "sys.path.insert(0, \"configs", "os.chdir"):
      assert bad not in everything.replace(code[0], ""), (name, bad)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), name
    url = re.search(r'REPO_URL = "([^"]+)"', code[0]).group(1)
    badge = (f"https://colab.research.google.com/github/"
             f"{url.removeprefix('https://github.com/')}/blob/main/colabs/{name}")
    assert badge in readme, (name, badge)
    assert badge in nb.cells[0].source, name
  assert len(first_cells) == 1, "the notebooks' install cells differ"
  assert "colabs/install.py" in first_cells.pop()


def test_install_keeps_the_runtimes_tensorflow_and_drops_extras():
  install = load_install_module()
  requires = ["jax>=0.10.2,!=0.12.1", "tensorflow-cpu>=2.18", "clu>=0.0.12",
              'timm>=1.0.15; extra == "test"']
  assert install.requirements(requires, {"numpy"}) == requires[:3]
  # Colab: its GPU TensorFlow is the tensorflow module already.
  assert install.requirements(requires, {"tensorflow", "jax"}) == [requires[0],
                                                                    requires[2]]
  with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
    assert '"tensorflow-cpu>=' in f.read()  # the name PROVIDED_BY knows


def test_configs_are_found_through_the_package(tmp_path, monkeypatch):
  from vit_jax import config_files  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)  # no configs/ here
  monkeypatch.delenv(config_files.ENV, raising=False)
  assert config_files.checkout_dir() == config_files.configs_dir().parent
  assert config_files.get_config("finetune", "digits_vit,digits,24").model_name == (
      config_files.get_config("digits_vit.py").model_name)
  with pytest.raises(FileNotFoundError, match=r"no config digits_vt.py in .*configs; "
                     "close matches: digits_vit"):
    config_files.get_config("digits_vt")
  (tmp_path / "mine.py").write_text("def get_config(arg='a'):\n  return {'arg': arg}\n")
  monkeypatch.setenv(config_files.ENV, str(tmp_path))
  assert config_files.get_config("mine", "b") == {"arg": "b"}
  monkeypatch.setenv(config_files.ENV, str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match=r"\$VIT_JAX_CONFIGS=.*missing is not a "
                     "directory of config files"):
    config_files.get_config("mine")
  monkeypatch.delenv(config_files.ENV)
  monkeypatch.setattr(config_files, "checkout_dir", lambda: None)  # a non-editable install
  with pytest.raises(FileNotFoundError, match=r"no configs/ beside the installed vit_jax "
                     r".*Clone it and `pip install -e` the clone, or set \$VIT_JAX_CONFIGS"):
    config_files.get_config("digits_vit")


def _outputs(nb):
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))


@pytest.mark.parametrize("name", ["quickstart.ipynb", "finetune_digits.ipynb"])
def test_notebook_runs(name, tfds_dir, digits_pretrained, tmp_path, monkeypatch):
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  values = settings(name, tfds_dir, digits_pretrained[0], str(tmp_path / "work"))
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
      "\n".join(f"{k} = {v!r}" for k, v in values.items())))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.delenv("PYTHONPATH", raising=False)  # the installed package, as in Colab
  monkeypatch.delenv("VIT_JAX_CONFIGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # this machine's choice, not the notebook's
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(cwd)}}).execute()
  text = _outputs(nb)
  imported = re.search(r"vit_jax \S+ from (.+)", text).group(1).strip()
  assert os.path.realpath(imported) == os.path.realpath(os.path.join(REPO, "vit_jax")), (
      f"the kernel imported vit_jax from {imported}, not from this checkout ({REPO}): "
      f"`pip install -e {REPO}` into the environment that runs the tests")
  assert os.listdir(cwd) == [], "the notebook wrote into the working directory"
  if name == "quickstart.ipynb":
    assert "loaded 72 arrays" in text, text
    assert "round trip max |logit diff|" in text
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the attention map and the rollout
  else:
    assert "no checkpoint at" not in text  # it fine-tuned the given checkpoint
    assert "new (fresh init): head/bias (10,) -> (5,)" in text
    shots = re.findall(r"(\d+)-shot (\d+\.\d)%", text)
    assert [int(k) for k, _ in shots] == [1, 5, 10], text
    assert all(0 <= float(v) <= 100 for _, v in shots)
    assert "1437 train and 360 test images" in text  # digits' splits, all ten classes
    assert os.path.exists(tmp_path / "work" / "finetuned.safetensors")
