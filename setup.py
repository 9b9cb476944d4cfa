"""Install megatron-dapo.

The fused CUDA extension in csrc/ is added here once it exists; until then the package is pure
Python and its pure-torch reference ops are used everywhere.
"""
from setuptools import find_packages, setup

setup(
    name="megatron-dapo",
    version="0.1.0",
    description="DAPO reinforcement learning for LLMs on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_dapo", "megatron_dapo.*"]),
    package_data={"megatron_dapo": ["py.typed"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "transformers>=4.51",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "psutil",  # megatron-core dist_checkpointing writers need it
        "matplotlib",
        "pyarrow",
    ],
    extras_require={
        "sglang": ["sglang>=0.5.17"],
        "te": ["transformer-engine[pytorch]>=2.0"],
        "test": ["pytest>=8.0"],
        "dev": ["pytest>=8.0", "ruff>=0.5"],
    },
    entry_points={"console_scripts": ["megatron-dapo=megatron_dapo.cli:main"]},
)
