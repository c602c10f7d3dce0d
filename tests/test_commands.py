"""Every documented ``python -m vit_jax...`` command, and every tool, answers ``--help``.

The commands are read from README.md, docs/, configs/, colabs/ and launch/. A module
whose command lives in ``vit_jax/tools`` runs the tool (``runpy.run_module`` under
``if __name__ == "__main__"``, read from its source: running it would load what the
module itself imports, TensorFlow included). Each command is run with ``--help`` in
one subprocess (``helpers.run_command``), and the flags a documented command line
uses must be among those it lists.
"""

import ast
import glob
import json
import os
import re
import subprocess
import sys

from helpers import REPO, subprocess_env

DOCUMENTS = ("README.md", "docs/*.md", "configs/*.py", "colabs/*.ipynb", "launch/*")
NOT_COMMANDS = {"vit_jax.tools.benchmark_timm"}  # a worker driven by tools/benchmark.py
# Module paths of commands that live in vit_jax/tools: each runs its tool.
FORWARDED = {"vit_jax.benchmark": "vit_jax.tools.benchmark",
         "vit_jax.memory": "vit_jax.tools.memory",
         "vit_jax.data.tokenizer": "vit_jax.tools.train_tokenizer",
         "vit_jax.evaluators.zero_shot": "vit_jax.tools.zero_shot",
         "vit_jax.evaluators.retrieval": "vit_jax.tools.retrieval"}


def documented_commands() -> dict[str, set[str]]:
  """Module -> the flags its documented command lines use."""
  commands: dict[str, set[str]] = {}
  for pattern in DOCUMENTS:
    for path in glob.glob(os.path.join(REPO, pattern)):
      text = open(path, encoding="utf-8").read()
      for match in re.finditer(r"python -m (vit_jax(?:\.\w+)+)", text):
        if match.group(1) != match.group(1).lower():  # a placeholder: vit_jax.tools.NAME
          continue
        rest = text[match.end():]
        # To the closing backtick of an inline span, else to a line end without "\".
        inline = text[match.start() - 1] == "`"
        end = re.search(r"`" if inline else r"`|(?<!\\)\n", rest)
        line = rest[:end.start() if end else len(rest)]
        flags = {f.split(".")[0] for f in re.findall(r"(?<!\S)--([\w.]+)", line)}
        commands.setdefault(match.group(1), set()).update(flags)
  return commands


def forwarded_to(module: str) -> str:
  """The module that ``python -m module`` runs (itself, or the tool it forwards to)."""
  path = os.path.join(REPO, *module.split("."))
  path = path + ".py" if os.path.exists(path + ".py") else os.path.join(path, "__init__.py")
  for node in ast.parse(open(path, encoding="utf-8").read()).body:
    if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
      for call in ast.walk(node):
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "runpy.run_module":
          keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
          assert keywords.get("run_name") == "__main__", ast.unparse(call)
          return ast.literal_eval(call.args[0])
  return module


def tools() -> set[str]:
  names = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "vit_jax",
                                                                    "tools", "*.py"))}
  return {f"vit_jax.tools.{n}" for n in names - {"__init__"}} - NOT_COMMANDS


WORKER = """
import json, sys, traceback
import helpers
answers = {}
for module in json.loads(sys.argv[1]):
  try:
    answers[module] = helpers.run_command(module, "--help")
  except Exception:  # pylint: disable=broad-except
    answers[module] = (None, traceback.format_exc())
print("@@" + json.dumps(answers))
"""


def test_every_command_answers_help_with_its_documented_flags():
  documented = documented_commands()
  runs = {module: forwarded_to(module) for module in {*documented, *FORWARDED}}
  assert {m: runs[m] for m in FORWARDED} == FORWARDED
  commands = sorted(set(runs.values()) | tools())
  env = subprocess_env(PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
  proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(commands)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  answers = json.loads(proc.stdout.split("@@", 1)[1])
  for command in commands:
    code, text = answers[command]
    # absl exits with 1 after --help, argparse with 0.
    assert code in (0, 1) and re.search(r"^\s+--\w", text, re.M), f"{command}:\n{text}"
  for module, flags in documented.items():
    text = answers[runs[module]][1]
    for flag in sorted(flags):
      assert re.search(rf"--(\[no\])?{flag}\b", text), (
          f"python -m {module} has no --{flag}, which the documentation uses:\n{text}")


IMPORTER = """
import importlib, json, sys
from absl import flags
for module in json.loads(sys.argv[1]):
  importlib.import_module(module)
print("@@" + json.dumps(sorted(
    f"{flags.FLAGS.find_module_defining_flag(n, '')}: --{n}" for n in flags.FLAGS
    if flags.FLAGS.find_module_defining_flag(n, "").startswith("vit_jax"))))
"""


def test_importing_a_command_defines_no_flags():
  """Commands define their flags when run (``define_flags()`` under ``__main__``), not
  when imported: the tests import tools (and xdist workers collect every test file)
  in processes that then run other commands in-process, and a flag name claimed at
  import (--mode, --batch, --workdir) made the next command fail with
  DuplicateFlagError. The trainer (``vit_jax.main``) is only ever run, never imported."""
  modules = sorted(({forwarded_to(m) for m in documented_commands()} | tools())
                   - {"vit_jax.main"})
  env = subprocess_env(PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", IMPORTER, json.dumps(modules)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.split("@@", 1)[1]) == []
