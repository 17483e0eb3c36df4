"""Build of apparate's compiled extensions.

apparate._C       C++ CPU kernels and the apparate_C op schemas; always built.
apparate._C_cuda  CUDA kernels; built when torch has CUDA and nvcc is found.
                  APPARATE_BUILD_CUDA=1 forces it (and fails loudly), =0 skips it.
                  TORCH_CUDA_ARCH_LIST defaults to 9.0 (Hopper).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDA_HOME, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3", "-std=c++20"]


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_decision() -> tuple[bool, str]:
    forced = os.environ.get("APPARATE_BUILD_CUDA", "").strip()
    if forced not in ("", "0", "1"):
        sys.exit(f"APPARATE_BUILD_CUDA must be 0 or 1; got {forced!r}")
    if forced == "0":
        return False, "APPARATE_BUILD_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        reasons.append("nvcc was not found (set CUDA_HOME)")
    if reasons and forced == "1":
        sys.exit("APPARATE_BUILD_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(reasons))
    return not reasons, "; ".join(reasons)


class OptionalCudaBuild(BuildExtension):
    """Builds the CPU extension always; a failed automatic CUDA build says why and continues."""

    def build_extension(self, ext):
        if ext.name != "apparate._C_cuda" or os.environ.get("APPARATE_BUILD_CUDA") == "1":
            return super().build_extension(ext)
        try:
            return super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler failure makes the build optional
            print(
                f"apparate: the CUDA extension failed to build ({exc}); CUDA tensors will use "
                "Triton or the reference. Set APPARATE_BUILD_CUDA=1 to make this an error.",
                file=sys.stderr,
            )


extensions = [
    CppExtension(
        "apparate._C",
        ["csrc/torch_bindings.cpp", *_sources("csrc/ops/*_cpu.cpp")],
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": CXX_FLAGS},
    )
]
build_cuda, why_not = _cuda_decision()
if build_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    extensions.append(
        CUDAExtension(
            "apparate._C_cuda",
            ["csrc/torch_bindings_cuda.cpp", *_sources("csrc/ops/*.cu")],
            include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++20"]},
        )
    )
else:
    print(f"apparate: building without the CUDA extension ({why_not})", file=sys.stderr)

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalCudaBuild})
