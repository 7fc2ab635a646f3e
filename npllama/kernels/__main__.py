"""python -m npllama.kernels: compile every kernel instance for sm_80 and sm_90, without a GPU.

NVRTC (through CuPy's `cupy_backends.cuda.libs.nvrtc`, which needs no driver) compiles each source
to a cubin with the options CuPy uses, and ptxas reports each instance's registers, stack and
spills. The table lists them with the dynamic shared memory each launch asks for, and how many
of its blocks fit on one multiprocessor at once (registers, shared memory with the 1 KiB the
hardware reserves per block, threads: the CUDA occupancy calculator's arithmetic). Exit 1 on a
compile error, a spill, or a block asking for more shared memory than the architecture allows;
exit 2 when NVRTC cannot be loaded.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from ..cli import fail
from . import COMPILE_OPTIONS, CUPY_ADDED_OPTIONS
from . import adamw as adamw_kernels
from . import attention as attention_kernels
from . import attention_mma as attention_mma_kernels
from . import cross_entropy as cross_entropy_kernels
from . import embedding as embedding_kernels
from . import rmsnorm as rmsnorm_kernels
from . import rope as rope_kernels
from . import swiglu as swiglu_kernels

ARCHITECTURES = ("sm_80", "sm_90")
MAX_SHARED_BYTES = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # per block, opted in
SM_SHARED_BYTES = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}  # per multiprocessor, at the largest carveout
SM_REGISTERS, SM_THREADS, SM_BLOCKS = 65536, 2048, 32  # per multiprocessor, on both
RESERVED_SHARED_BYTES = 1024  # the shared memory the hardware keeps for each resident block
SOURCES = {"attention.cu": attention_kernels, "attention_mma.cu": attention_mma_kernels,
           "embedding.cu": embedding_kernels, "adamw.cu": adamw_kernels, "swiglu.cu": swiglu_kernels,
           "rmsnorm.cu": rmsnorm_kernels, "rope.cu": rope_kernels,
           "cross_entropy.cu": cross_entropy_kernels}


class CompileError(Exception):
    """NVRTC refused a source: the message is its log."""


@dataclass(frozen=True)
class Resources:
    """What ptxas reports for one kernel instance on one architecture."""

    kernel: str
    arch: str
    registers: int
    stack_bytes: int
    spill_bytes: int  # stores + loads
    static_shared_bytes: int
    dynamic_shared_bytes: int
    threads: int = 128  # per block, as its launch asks

    @property
    def blocks_per_sm(self) -> int:
        """Blocks resident on one multiprocessor at once, as CUDA's occupancy calculator counts them:
        registers go to warps in units of 256 within each of the 4 quarters of the register file,
        and a block's shared memory (with the 1 KiB reserved for it) in units of 128 bytes."""
        warps = -(-self.threads // 32)
        registers_per_warp = -(-self.registers * 32 // 256) * 256
        by_registers = 4 * (SM_REGISTERS // 4 // max(registers_per_warp, 1)) // warps
        shared = self.static_shared_bytes + self.dynamic_shared_bytes + RESERVED_SHARED_BYTES
        by_shared = SM_SHARED_BYTES[self.arch] // (-(-shared // 128) * 128)
        return min(by_registers, by_shared, SM_THREADS // self.threads, SM_BLOCKS)

    @property
    def problem(self) -> str | None:
        if self.spill_bytes:
            return f"spills {self.spill_bytes} bytes"
        shared = self.static_shared_bytes + self.dynamic_shared_bytes
        if shared > MAX_SHARED_BYTES[self.arch]:
            return f"asks for {shared} bytes of shared memory, more than {self.arch}'s {MAX_SHARED_BYTES[self.arch]}"
        return None


def nvrtc_module():
    """CuPy's NVRTC binding, or None when it or the NVRTC library is missing."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception:  # ImportError, or CuPy's own error when libnvrtc cannot be loaded
        return None
    return nvrtc


def compile_instances(nvrtc, source: str, filename: str, names: list[str], arch: str) -> tuple[str, dict]:
    """Compile `source` with the instances `names` for `arch`: (ptxas log, {mangled name: name})."""
    program = nvrtc.createProgram(source, filename, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        options = [f"--gpu-architecture={arch}", *COMPILE_OPTIONS, *CUPY_ADDED_OPTIONS, "--ptxas-options=-v"]
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError:
            raise CompileError(nvrtc.getProgramLog(program)) from None
        nvrtc.getCUBIN(program)  # the cubin exists: ptxas ran to the end
        return nvrtc.getProgramLog(program), {nvrtc.getLoweredName(program, name): name for name in names}
    finally:
        nvrtc.destroyProgram(program)


def parse_ptxas(log: str, names: dict, shared: dict, arch: str, threads: int = 128) -> list[Resources]:
    """One Resources per entry function in ptxas's verbose log (blocks of `threads` threads)."""
    found, kernel, stack, spills = [], None, 0, 0
    for line in log.splitlines():
        if match := re.search(r"Compiling entry function '([^']+)'", line):
            kernel = names.get(match.group(1), match.group(1))
        elif match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            stack, spills = int(match.group(1)), int(match.group(2)) + int(match.group(3))
        elif match := re.search(r"Used (\d+) registers", line):
            static = re.search(r"(\d+) bytes smem", line)
            assert kernel is not None, line  # ptxas names each entry function before its registers
            found.append(Resources(kernel, arch, int(match.group(1)), stack, spills,
                                   int(static.group(1)) if static else 0, shared.get(kernel, 0), threads))
    return found


def report(nvrtc) -> tuple[list[Resources], list[str]]:
    """Every instance on every architecture, and the compile errors."""
    rows, errors = [], []
    for filename, module in SOURCES.items():
        instances = dict(module.instances())
        for arch in ARCHITECTURES:
            try:
                log, names = compile_instances(nvrtc, module.source(), filename, list(instances), arch)
            except CompileError as error:
                errors.append(f"{filename} for {arch}:\n{error}")
                continue
            compiled = parse_ptxas(log, names, instances, arch, module.THREADS)
            missing = set(instances) - {row.kernel for row in compiled}
            errors += [f"{filename} for {arch}: ptxas reported nothing for {name}" for name in sorted(missing)]
            rows += compiled
    return rows, errors


def main(argv=None) -> int:
    nvrtc = nvrtc_module()
    if nvrtc is None:
        return fail('NVRTC is not available: pip install "npllama[gpu]" nvidia-cuda-nvrtc (the test extra pins '
                    "the version this report was checked with)")
    major, minor = nvrtc.getVersion()
    print(f"NVRTC {major}.{minor}; options {' '.join((*COMPILE_OPTIONS, *CUPY_ADDED_OPTIONS))}")
    rows, errors = report(nvrtc)
    print(f"{'kernel':62} {'arch':6} {'regs':>4} {'stack':>5} {'spill':>5} {'smem':>7} {'blk/SM':>6}  problem")
    for row in rows:
        shared = row.static_shared_bytes + row.dynamic_shared_bytes
        print(f"{row.kernel:62} {row.arch:6} {row.registers:4d} {row.stack_bytes:5d} {row.spill_bytes:5d} "
              f"{shared:7d} {row.blocks_per_sm:6d}  {row.problem or ''}")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    problems = [row for row in rows if row.problem]
    print(f"{len(rows)} instances, {len(problems)} with a problem, {len(errors)} compile errors")
    return 1 if problems or errors else 0


if __name__ == "__main__":
    sys.exit(main())
