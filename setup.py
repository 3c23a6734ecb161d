"""minimind_fast: a kernel-backed trainer for MiniMind-family small language models.

The `kernels/` folder is installed as `minimind_fast.kernels` so that it never collides with the
`kernels` package on PyPI, which `transformers` probes for at import time.
"""

from setuptools import setup

setup(
    name="minimind_fast",
    version="0.1.0",
    description="Fast, kernel-backed training of MiniMind-family small language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "minimind_fast",
        "minimind_fast.data",
        "minimind_fast.training",
        "minimind_fast.serving",
        "minimind_fast.kernels",
    ],
    package_dir={"minimind_fast.kernels": "kernels"},
    package_data={"minimind_fast.data": ["FORMAT.md"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "deepspeed>=0.15",
        "numpy>=1.24",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "rich>=13",
        "tqdm>=4.60",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "pydantic>=2",  # the server's request schemas (v2 API)
        "starlette",
        "matplotlib>=3.7",  # every run's loss.png
        "jinja2>=3",  # chat templates other than ChatML (minimind-3's tokenizer)
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3",
            "transformers>=4.49",
            "ruff>=0.5",
            "openai>=1.30",
            "httpx>=0.27",
            "liger-kernel>=0.5",  # a baseline of the kernel benchmarks; its kernels' adapters are tested
            "pyarrow>=14",
            "zstandard>=0.22",
        ],
        "data": ["pyarrow>=14", "zstandard>=0.22"],  # Parquet and .zst inputs
        # Hugging Face reward models in GRPO/PPO. From 4.49 a *ForSequenceClassification model scores at the last
        # token that is not padding; before, at the one before the first pad, early where the pad id (often the
        # end-of-turn token) also ends an earlier turn.
        "hf": ["transformers>=4.49"],
        "gpu": ["flash-attn>=2.6", "liger-kernel>=0.5"],
        "hopper": ["flash-attn-4"],
    },
)
