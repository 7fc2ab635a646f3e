"""npllama's own CUDA kernels, for the CuPy backend: attention (forward and backward, float32 and
float64, and on the tensor cores float16 and float32 as TF32), the deterministic embedding backward, AdamW's update of a
parameter in one pass, and SwiGLU, RMSNorm and RoPE fused.

Each kernel's source is package data (`attention.cu`, `attention_mma.cu`, `embedding.cu`, `adamw.cu`,
`swiglu.cu`, `rmsnorm.cu`, `rope.cu`, and the headers they include); its Python module says which
instances exist and computes each launch (`Launch`), which the CuPy path and the CPU harness of the
tests both run. `python -m npllama.kernels` compiles every instance through NVRTC, without a GPU,
and reports its registers, shared memory, spills and the blocks a multiprocessor holds.
"""

import re
from dataclasses import dataclass
from importlib import resources

import numpy

# What CuPy passes to NVRTC for a RawModule: ours, then the two CuPy adds on its own. The compile
# report (python -m npllama.kernels) passes all three, so it checks what runs.
COMPILE_OPTIONS = ("--std=c++17",)
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
CXX_TYPES = {"float32": "float", "float64": "double"}  # the dtypes every kernel is instantiated for
# The fused kernels' dtypes (storage.cuh): each as its C++ storage type (float16 as its bits), and the
# dtype it is computed in, as the array code's compute_dtype
STORAGE = {"float32": "float", "float64": "double", "float16": "unsigned short"}
COMPUTE = {"float32": numpy.float32, "float64": numpy.float64, "float16": numpy.float32}


PACKAGE_DATA = ("*.cu", "*.cuh")  # the kernel sources a wheel ships (pyproject.toml's package data)
LOCAL_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.cuh)"$', re.MULTILINE)


def kernel_source(filename: str, pasted: set | None = None) -> str:
    """The text of one of this package's .cu files, each `#include "x.cuh"` of this package replaced
    by that file's text, once (NVRTC compiles one string; the CPU harness's compiler includes the
    files itself, where their `#pragma once` does the same)."""
    pasted = set() if pasted is None else pasted
    pasted.add(filename)
    text = resources.files(__package__).joinpath(filename).read_text()

    def paste(match) -> str:
        header = match.group(1)
        return "" if header in pasted else kernel_source(header, pasted)

    return LOCAL_INCLUDE.sub(paste, text)


def check_arrays(kernel: str, arrays: dict) -> None:
    """ValueError unless each of `arrays` (name: (array, dtype, size)) is C-contiguous, of that dtype
    and that many elements; `kernel` names the launch in the message."""
    for name, (array, dtype, size) in arrays.items():
        if array.dtype != dtype or array.size != size or not array.flags.c_contiguous:
            raise ValueError(f"{kernel}: {name} must be a contiguous {numpy.dtype(dtype).name} array of {size} "
                             f"elements, got {array.dtype.name} of {array.size}")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the C++ name of the instance, grid, block, dynamic shared bytes, arguments.

    Arrays are C-contiguous (passed as pointers); scalars are NumPy scalars of the exact C++ type."""

    kernel: str
    grid: tuple
    block: tuple
    shared_bytes: int
    args: tuple
