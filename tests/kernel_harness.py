"""Running CUDA kernel sources on the CPU, under the sanitizers, for CI without a GPU.

tests/harness/cuda_on_cpu.h emulates the few CUDA features our kernels use (one std::thread per CUDA
thread, std::barrier for __syncthreads, dynamic shared memory filled with NaN bytes), and
tests/harness/harness.cpp runs one launch that a manifest describes. This module builds that harness
with the kernel sources and runs launches through it:

    binary = build([Path("npllama/kernels/attention.cu")], ["npllama::attention_forward<float, 64, 64, 64>"],
                   "thread", folder)
    q, k, v, out, ... = run(binary, launch)

`launch` is any object with the attributes kernel (the C++ name expression), grid and block (3 ints
each), shared_bytes (dynamic shared memory) and args: C-contiguous NumPy arrays, passed as pointers to
their element type, and NumPy scalars of exactly numpy.int32, numpy.int64, numpy.float32 or
numpy.float64. The harness refuses a launch whose arguments do not match the kernel's C++ parameters
one for one (`const float*` or `float*` takes a float32 array, `int` a numpy.int32, `float` a
numpy.float32, and so on).

Any failure (a sanitizer's report, the watchdog, a refused launch, a compile error) raises
HarnessFailure, an AssertionError, with the harness's report.
"""

import functools
import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy

HARNESS = Path(__file__).resolve().parent / "harness"
DRIVER = HARNESS / "harness.cpp"
EMULATION = HARNESS / "cuda_on_cpu.h"

COMPILER = os.environ.get("CXX", "g++")
# -ffp-contract=off: no multiply and add fused into one rounding (on any CPU), as the *_rn intrinsics promise
COMMON_FLAGS = ["-O1", "-g", "-std=c++20", "-ffp-contract=off", "-pthread", "-DNPLLAMA_CPU_EMULATION",
                "-Wno-unknown-pragmas", "-fno-omit-frame-pointer"]
SANITIZER_FLAGS = {
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "thread": ["-fsanitize=thread"],
}
# The sanitizers' settings for every run: stop at the first report, with a non-zero status.
SANITIZER_OPTIONS = {
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66",
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}
# Text that means a sanitizer found something, even if the process still exited 0.
SANITIZER_MARKERS = ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                     "ERROR: UndefinedBehaviorSanitizer", "runtime error:")

# The harness's own exit statuses (harness.cpp).
EXIT_STATUS = {64: "could not read its launch", 65: "refused the launch", 70: "was stopped by its watchdog",
               71: "lost a kernel thread"}

SCALAR_DTYPES = ("int32", "int64", "float32", "float64")
ARRAY_DTYPES = SCALAR_DTYPES + ("uint32", "float16")  # float16 goes to an `unsigned short*`, as its bits
BACKSTOP_SECONDS = 30  # beyond the harness's own watchdog, before Python kills it


@functools.cache
def unavailable_reason() -> str | None:
    """None when the compiler builds and runs a C++20 program under both sanitizers, else why not
    (the reason the harness tests are skipped on such a machine)."""
    if shutil.which(COMPILER) is None:
        return f"{COMPILER} is not installed: the kernel harness needs a C++20 compiler with ASan and TSan"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "probe.cpp"
        source.write_text("#include <barrier>\nint main() { std::barrier sync(1); sync.arrive_and_wait(); }\n")
        for sanitizer, flags in SANITIZER_FLAGS.items():
            binary = Path(folder) / f"probe-{sanitizer}"
            built = subprocess.run([COMPILER, "-std=c++20", "-pthread", *flags, str(source), "-o", str(binary)],
                                   capture_output=True, text=True, timeout=300)
            ran = subprocess.run([str(binary)], capture_output=True, timeout=60) if built.returncode == 0 else None
            if ran is None or ran.returncode != 0:
                return (f"{COMPILER} cannot build and run a C++20 program with -fsanitize for {sanitizer} "
                        "(a C++20 <barrier> and the sanitizer runtimes are needed)")
    return None


class HarnessFailure(AssertionError):
    """The harness reported a problem: a sanitizer's report, a hang, a refused launch, a failed build."""


def build(sources: list[Path], kernels: list[str], sanitizer: str, folder: Path) -> Path:
    """The harness binary for `kernels` (C++ name expressions of kernel instances defined in `sources`),
    built with the sanitizer "address" (AddressSanitizer and UBSan) or "thread" (ThreadSanitizer).

    Binaries are kept in `folder` under a hash of everything that goes into them (the sources and the
    local headers they include, the kernels, the harness, the compiler and its flags): a second build
    of the same is instant.
    """
    if sanitizer not in SANITIZER_FLAGS:
        raise ValueError(f"sanitizer {sanitizer!r}: expected one of {sorted(SANITIZER_FLAGS)}")
    kernels = list(kernels)
    if not kernels:
        raise ValueError("build() needs at least one kernel name")
    for name in kernels:
        if not name.strip() or any(c in name for c in '"\\\n'):
            raise ValueError(f"kernel name {name!r}: a C++ name expression, on one line, without quotes")
    sources = [Path(source).resolve() for source in sources]
    flags = [*COMMON_FLAGS, *SANITIZER_FLAGS[sanitizer]]

    digest = hashlib.sha256()
    for part in [COMPILER, *flags, *kernels]:
        digest.update(part.encode() + b"\0")
    for path in [DRIVER, EMULATION, *_with_local_includes(sources)]:
        digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    out = Path(folder) / f"{sanitizer}-{digest.hexdigest()[:16]}"
    binary = out / "harness"
    if binary.exists():
        return binary

    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / "harness_sources.inc", "".join(f'#include "{source}"\n' for source in sources))
    _write_atomically(out / "harness_instances.inc",
                      "".join(f'{{"{name}", make_launcher(&{name})}},\n' for name in kernels))
    partial = out / f"harness.partial-{os.getpid()}"
    command = [COMPILER, *flags, "-I", str(out), str(DRIVER), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=900)
    if result.returncode != 0:
        raise HarnessFailure(f"{COMPILER} could not build the harness ({sanitizer}) for {kernels}:\n"
                             f"{' '.join(command)}\n{result.stderr}")
    os.replace(partial, binary)
    return binary


def run(binary: Path, launch, timeout: float = 120) -> list:
    """Runs one launch; returns its args after the run: each array as a new NumPy array holding what the
    kernel left in it (the caller's arrays are not changed), each scalar as it was.

    The harness's watchdog ends a launch that runs longer than `timeout` seconds (a hang).
    """
    seconds = max(1, math.ceil(timeout))
    with tempfile.TemporaryDirectory(prefix="kernel-launch-") as scratch:
        scratch = Path(scratch)
        lines = [f"kernel {launch.kernel}", f"grid {_dims(launch, 'grid')}", f"block {_dims(launch, 'block')}",
                 f"shared_bytes {int(launch.shared_bytes)}"]
        arrays = {}  # index in args -> its file
        for index, arg in enumerate(launch.args):
            lines.append("argument " + _describe(launch.kernel, index, arg, scratch / f"{index}.bin", arrays))
        manifest = scratch / "launch.txt"
        manifest.write_text("\n".join(lines) + "\n")

        command = [str(binary), "--timeout", str(seconds), str(manifest)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                    env={**os.environ, **SANITIZER_OPTIONS}, timeout=seconds + BACKSTOP_SECONDS)
        except subprocess.TimeoutExpired as expired:
            output = _text(expired.stderr) + _text(expired.stdout)
            raise HarnessFailure(f"kernel {launch.kernel}: the harness was killed after {seconds + BACKSTOP_SECONDS} s;"
                                 f" its own {seconds} s watchdog did not fire\n{output}") from None
        report = (result.stderr + result.stdout).strip()
        sanitizer_report = any(marker in report for marker in SANITIZER_MARKERS)
        if result.returncode != 0 or sanitizer_report:
            how = "stopped at a sanitizer's report" if sanitizer_report else _how_it_ended(result.returncode)
            raise HarnessFailure(f"kernel {launch.kernel}: the harness {how} (exit status {result.returncode}):\n"
                                 f"{report}")

        after = list(launch.args)
        for index, path in arrays.items():
            before = launch.args[index]
            after[index] = numpy.fromfile(path, dtype=before.dtype).reshape(before.shape)
        return after


def _describe(kernel: str, index: int, arg, path: Path, arrays: dict) -> str:
    """The manifest's line for one argument; writes an array's contents to `path`."""
    if isinstance(arg, numpy.ndarray):
        if not arg.flags.c_contiguous:
            raise ValueError(f"kernel {kernel}: argument {index} is not a C-contiguous array; the kernel would "
                             f"read its buffer as one (numpy.ascontiguousarray makes one)")
        if arg.dtype.name not in ARRAY_DTYPES or not arg.dtype.isnative:
            return f"other {arg.dtype.name} array" + ("" if arg.dtype.isnative else " (not in native byte order)")
        arg.tofile(path)
        arrays[index] = path
        return f"array {arg.dtype.name} {arg.nbytes} {path}"
    if isinstance(arg, numpy.generic):
        if arg.dtype.name not in SCALAR_DTYPES:
            return f"other numpy.{arg.dtype.name}"
        value = str(int(arg)) if arg.dtype.kind == "i" else float(arg).hex()  # hex: the exact value
        return f"scalar {arg.dtype.name} {value}"
    return f"other Python {type(arg).__name__}" if type(arg) in (bool, int, float) else f"other {type(arg).__name__}"


def _dims(launch, name: str) -> str:
    dims = tuple(getattr(launch, name))
    if len(dims) != 3 or any(not isinstance(d, (int, numpy.integer)) or d < 0 for d in dims):
        raise ValueError(f"kernel {launch.kernel}: {name} must be 3 ints, not {dims!r}")
    return " ".join(str(int(d)) for d in dims)


def _how_it_ended(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return EXIT_STATUS.get(status, "failed")


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def _with_local_includes(sources: list[Path]) -> list[Path]:
    """The sources and, recursively, the files they #include "in quotes" from their own folder (the ones
    whose change must rebuild the harness; <system> headers are not followed)."""
    seen, pending = [], list(sources)
    while pending:
        path = pending.pop(0)
        if path in seen:
            continue
        seen.append(path)
        for name in re.findall(r'^\s*#\s*include\s*"([^"]+)"', path.read_text(errors="replace"), re.MULTILINE):
            included = (path.parent / name).resolve()
            if included.is_file():
                pending.append(included)
    return seen


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)
