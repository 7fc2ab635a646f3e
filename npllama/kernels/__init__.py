"""npllama's own CUDA kernels, for the CuPy backend: attention (forward and backward), the
deterministic embedding backward, and AdamW's update of a parameter in one pass.

Each kernel's source is package data (`attention.cu`, `embedding.cu`, `adamw.cu`); its Python module says which
instances exist and computes each launch (`Launch`), which the CuPy path and the CPU harness of the
tests both run. `python -m npllama.kernels` compiles every instance through NVRTC, without a GPU,
and reports its registers, shared memory, spills and the blocks a multiprocessor holds.
"""

import re
from dataclasses import dataclass
from importlib import resources

# What CuPy passes to NVRTC for a RawModule: ours, then the two CuPy adds on its own. The compile
# report (python -m npllama.kernels) passes all three, so it checks what runs.
COMPILE_OPTIONS = ("--std=c++17",)
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
CXX_TYPES = {"float32": "float", "float64": "double"}  # the dtypes every kernel is instantiated for


def kernel_source(filename: str) -> str:
    """The text of one of this package's .cu files, each `#include "x.cuh"` of this package replaced
    by that file's text (NVRTC compiles one string; the CPU harness's compiler includes them itself)."""
    text = resources.files(__package__).joinpath(filename).read_text()
    return re.sub(r'^#include "([A-Za-z0-9_]+\.cuh)"$', lambda match: kernel_source(match.group(1)), text,
                  flags=re.MULTILINE)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the C++ name of the instance, grid, block, dynamic shared bytes, arguments.

    Arrays are C-contiguous (passed as pointers); scalars are NumPy scalars of the exact C++ type."""

    kernel: str
    grid: tuple
    block: tuple
    shared_bytes: int
    args: tuple
