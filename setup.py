"""Build of fusetune: the Python package, the Triton kernels and, where torch has CUDA, `fusetune._C`.

A CPU-only install never needs nvcc: the CUDA extension is added only when torch was built with
CUDA and a CUDA toolkit is found (FUSETUNE_BUILD_CUDA=0 skips it, =1 insists on it). The build
imports torch, so build it with `pip install --no-build-isolation -e .` (pip's isolated build
environment has no torch).
"""
import os
import re
from pathlib import Path

from setuptools import setup

package_dir = {"fusetune": "python/fusetune", "fusetune.triton_kernels": "triton_kernels"}
packages = ["fusetune", "fusetune.triton_kernels", "fusetune.reference", "fusetune.ops",
            "fusetune.patching", "fusetune.lora", "fusetune.quant", "fusetune.training", "fusetune.api",
            "fusetune.recipe", "fusetune.cli", "fusetune.data"]


def _cuda_extension():
    wanted = os.environ.get("FUSETUNE_BUILD_CUDA", "auto")
    if wanted == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        if wanted == "1":
            raise RuntimeError("FUSETUNE_BUILD_CUDA=1 but torch cannot be imported by the build: install "
                               "torch first and run pip install --no-build-isolation -e .") from err
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if wanted == "1":
            raise RuntimeError("FUSETUNE_BUILD_CUDA=1 but torch has no CUDA or no CUDA toolkit was found")
        return [], {}
    from glob import glob
    sources = sorted(glob("csrc/*.cu")) + ["csrc/ops.cpp"]
    # (no -std: torch's builder picks the C++ standard its headers need, C++20 from torch 2.13 on)
    ext = CUDAExtension("fusetune._C", sources, extra_compile_args={
        "cxx": ["-O3"],
        "nvcc": ["-O3", "--use_fast_math", "-gencode=arch=compute_80,code=sm_80",
                 "-gencode=arch=compute_90,code=sm_90"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="fusetune",
    version=re.search(r'__version__ = "(.+)"', (Path(__file__).parent / "python/fusetune/version.py").read_text()).group(1),
    description="Fast, lean fine-tuning of Hugging Face LLMs with fused Triton kernels",
    package_dir=package_dir,
    packages=packages,
    python_requires=">=3.10",
    package_data={"fusetune.data": ["*.jsonl", "*.yaml"]},
    # The supported range: the lower bounds are the lowest releases CI tests (.ci/lowest.txt; torch
    # 2.11 and Triton 3.6 on the GPU tier), the upper bounds the next major releases.
    install_requires=["torch>=2.11,<3", "triton>=3.6,<4", "transformers>=5.17,<6", "peft>=0.18,<1",
                      "accelerate>=1.15,<2", "safetensors>=0.4,<1", "pyyaml>=6,<7"],
    # train: the embedded default of `fusetune train` reads a GGUF file and plots the loss
    extras_require={"train": ["gguf>=0.17,<1", "matplotlib>=3.7,<4"],
                    # near-duplicate removal in `fusetune data`; ROUGE of data.generation_path
                    "data": ["datasketch>=1.6,<3", "rouge-score>=0.1.2,<1"],
                    "tensorboard": ["tensorboard>=2.14,<3"],  # training.report_to: [tensorboard]
                    "test": ["pytest>=8,<10", "gguf>=0.17,<1", "matplotlib>=3.7,<4", "bitsandbytes>=0.50,<1",
                             "trl>=1.15,<2", "datasketch>=1.6,<3", "rouge-score>=0.1.2,<1", "tensorboard>=2.14,<3"]},
    entry_points={"console_scripts": ["fusetune=fusetune.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
