"""timm side of ``python -m vit_jax.tools.benchmark --compare=timm`` (a worker process).

PyTorch and TensorFlow abort when imported into one process, and the JAX side's
thread pool would compete with PyTorch's, so timm runs here, in its own process,
driven over stdin/stdout by ``vit_jax.tools.benchmark``:

1. the parent starts ``python -m vit_jax.tools.benchmark_timm '<json spec>'``;
2. the worker builds the model (eager and, if asked, ``torch.compile``), runs the
   warm-up steps of each (compilation included) and prints a ``ready`` line;
3. for each line ``eager`` or ``compile`` it reads, it times ONE repeat of
   ``steps`` steps and prints the seconds per step; ``quit`` ends it.

The parent alternates JAX repeats with these, so both sides see the same machine
load. The train step is the same work as the JAX one: forward, cross-entropy,
backward and an AdamW update (``torch.optim.AdamW``, its CPU/GPU default
implementation); ``torch.compile`` compiles the model (as timm's ``benchmark.py``
does), the optimizer step stays eager. Inference runs under ``torch.inference_mode``.

``python -m vit_jax.tools.benchmark_timm --known '<json list of names>'`` prints which
of the names timm's registry has (how ``--zoo`` prefers models timm can compare).

Output lines the parent reads start with ``@@`` followed by JSON; everything else
(PyTorch warnings) is ignored.
"""

import contextlib
import json
import sys
import time


def _emit(obj: dict) -> None:
  print("@@" + json.dumps(obj), flush=True)


def main(spec: dict) -> None:
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(spec["threads"])
  device = torch.device(spec.get("device", "cpu"))
  torch.manual_seed(0)
  batch, size, mode = spec["batch"], spec["image_size"], spec["mode"]
  dtype = spec["dtype"]
  autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)
              ) if dtype == "bfloat16" else contextlib.nullcontext

  if not timm.is_model(spec["model"]):  # timm's own registry says, not a guess
    _emit({"error": f"not in timm {timm.__version__}'s registry: ours alone",
           "missing": True})
    return
  try:
    model = timm.create_model(spec["model"], pretrained=False,
                              num_classes=spec["num_classes"], **spec.get("kwargs", {}))
  except RuntimeError as e:  # timm: "Unknown model (...)"
    _emit({"error": f"timm cannot create {spec['model']!r}: {e}"})
    return
  model = model.to(device).train(mode == "train")
  params = sum(p.numel() for p in model.parameters())
  images = torch.randn(batch, 3, size, size, device=device)
  labels = torch.randint(0, max(spec["num_classes"], 1), (batch,), device=device)

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  def make_step(net):
    if mode == "infer":
      def infer():
        with torch.inference_mode(), autocast():
          net(images)
      return infer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def train():
      optimizer.zero_grad(set_to_none=True)
      with autocast():
        out = net(images)
        loss = (torch.nn.functional.cross_entropy(out, labels) if spec["num_classes"]
                else out.float().square().mean())
      loss.backward()
      optimizer.step()
    return train

  steps = {}
  compile_s = {}
  for impl in spec["impls"]:
    net = model if impl == "eager" else torch.compile(model)
    step = make_step(net)
    start = time.perf_counter()
    for _ in range(spec["warmup"]):
      step()
    sync()
    compile_s[impl] = time.perf_counter() - start
    steps[impl] = step
  _emit({"ready": True, "params": params, "warmup_s": compile_s,
         "torch": torch.__version__, "timm": timm.__version__,
         "threads": torch.get_num_threads()})

  for line in sys.stdin:
    impl = line.strip()
    if impl == "quit":
      break
    step = steps[impl]
    sync()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
      step()
    sync()
    _emit({"impl": impl, "step_s": (time.perf_counter() - start) / spec["steps"]})


def known(names: list[str]) -> None:
  """Prints which of ``names`` timm's registry has (``--known '<json list>'``)."""
  import timm  # pylint: disable=g-import-not-at-top
  _emit({"known": [n for n in names if timm.is_model(n)], "timm": timm.__version__})


if __name__ == "__main__":
  if sys.argv[1] == "--known":
    known(json.loads(sys.argv[2]))
  else:
    main(json.loads(sys.argv[1]))
