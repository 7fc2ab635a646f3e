"""Sweep the tiles of npllama's float32/float64 attention kernels on the GPU, kernel by kernel.

    python bench/attention_tiles.py [--dtype float32] [--head-dims 64 128] [--seq-len 4096] [--reps 5] [--json F]
    python bench/attention_tiles.py --list      # the candidates attention.cu takes; no GPU needed
    python bench/attention_tiles.py --compile   # and their registers, spills, blocks a multiprocessor
                                                # holds on sm_80 and sm_90 (NVRTC, no GPU needed)

For each head dim, each kernel (forward, dK/dV, dQ) runs with every candidate tile of CANDIDATES that
attention.cu takes (npllama.kernels.attention.tiles_problem: the rows split over the row groups, the
columns over a group's lanes, the shared memory within an A100's), the other kernels at the dtype's
default tiles. Shape: causal, batch x seq = 16384 tokens and heads x head dim = 2048, as
bench/attention.py. Each candidate's outputs, which start as NaN, are compared with the default
tiles' (a different tile changes the order of the sums: TOLERANCE, in float32 1e-4 of each element
plus 1e-5 of the tensor's largest): a candidate outside that is WRONG, one that fails to compile or
launch FAILED, and neither is chosen; a default is replaced only by a tile more than 3% faster
(MARGIN). Rows are printed as they are measured. Times are CUDA events around the
kernel's launch, median of --reps after 2 warm-ups (each candidate compiles once, through NVRTC,
first). The last lines give, per head dim, the fastest correct tiles as a `Tiles(...)` for the
table in npllama/kernels/attention.py, with the card's architecture; --json writes every row (after
each head dim, so that a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from attention import time_cupy  # noqa: E402  (bench/attention.py)

from npllama.kernels import attention as cuda_attention  # noqa: E402

KINDS = ("forward", "dkdv", "dq")
# (queries, keys) per tile, for each kernel: the defaults and their neighbours, halving and doubling
CANDIDATES = {
    "forward": [(32, 32), (32, 64), (64, 32), (64, 64), (128, 32), (128, 64), (64, 128)],
    "dkdv": [(16, 16), (16, 32), (32, 16), (32, 32), (64, 32), (32, 64), (16, 64)],
    "dq": [(16, 32), (32, 16), (32, 32), (64, 16), (64, 32), (64, 64), (128, 32)],
}
# How far a candidate's outputs may be from the default tiles' (other tiles add the same terms in
# another order): relative to the element, and to the tensor's largest element
TOLERANCE = {"float32": (1e-4, 1e-5), "float64": (1e-10, 1e-12)}
MARGIN = 0.03  # a candidate replaces a default only when more than 3% faster


def candidates(dtype, head_dim: int) -> list[tuple[str, cuda_attention.Tiles]]:
    """(kernel, tiles) for every candidate attention.cu takes: one kernel's tile changed from the
    dtype's default at a time."""
    default = cuda_attention.tiles_of(dtype)
    found = []
    for kind in KINDS:
        for tile in CANDIDATES[kind]:
            tiles = dataclasses.replace(default, **{kind: tile})
            if cuda_attention.tiles_problem(tiles, dtype, head_dim) is None:
                found.append((kind, tiles))
    return found


def compile_report(dtype, head_dims) -> int:
    """Each candidate's kernel through NVRTC for sm_80 and sm_90 (python -m npllama.kernels's report):
    exit 1 on a spill or a compile error, 2 without NVRTC."""
    from npllama.kernels.__main__ import ARCHITECTURES, CompileError, compile_instances, nvrtc_module, parse_ptxas

    nvrtc = nvrtc_module()
    if nvrtc is None:
        print("NVRTC is not available: pip install nvidia-cuda-nvrtc (the test extra pins it)", file=sys.stderr)
        return 2
    problems = 0
    for head_dim in head_dims:
        for kind, tiles in candidates(dtype, head_dim):
            name = cuda_attention.kernel_names(dtype, head_dim, tiles)[{"forward": 0, "dkdv": 2, "dq": 3}[kind]]
            line = f"{dtype} D={head_dim} {kind:8} {str(getattr(tiles, kind)):>10}"
            for arch in ARCHITECTURES:
                try:
                    log, names = compile_instances(nvrtc, cuda_attention.source(), "attention.cu", [name], arch)
                except CompileError as error:
                    print(f"{line} {arch}: compile error\n{error}")
                    problems += 1
                    continue
                (row,) = parse_ptxas(log, names, {name: cuda_attention.shared_bytes(kind, dtype, head_dim, tiles)},
                                     arch, cuda_attention.THREADS)
                problems += bool(row.problem)
                line += f"  {arch}: {row.registers:3d} regs, {row.spill_bytes} spill, {row.blocks_per_sm} blk/SM"
            print(line, flush=True)
    return 1 if problems else 0


def time_launch(run, dtype, head_dim, tiles, reps) -> float:
    """Median seconds of one launch, after 2 warm-ups (CUDA events)."""
    return time_cupy(lambda: cuda_attention.launch(run, dtype, head_dim, tiles), reps)


def run_kernel(cupy, kind, tiles, problem, reps):
    """(seconds, outputs) of one kernel with `tiles`, its outputs starting as NaN (a tile it leaves
    unwritten shows); the backward kernels from the default forward's out and lse, and Dvec."""
    q, k, v, dout, out, lse, dvec, scale = problem
    dtype, head_dim = q.dtype, q.shape[3]

    def unwritten(shape):
        return cupy.full(shape, cupy.nan, dtype=dtype)

    if kind == "forward":
        out, lse = unwritten(q.shape), unwritten(q.shape[:3])
        run = cuda_attention.forward_launch(q, k, v, out, lse, scale, tiles)
        return time_launch(run, dtype, head_dim, tiles, reps), (out, lse)
    dq, dk, dv = unwritten(q.shape), unwritten(k.shape), unwritten(v.shape)
    runs = cuda_attention.backward_launches(dout, q, k, v, out, lse, dvec, dq, dk, dv, scale, tiles)
    run = runs[1] if kind == "dkdv" else runs[2]
    return time_launch(run, dtype, head_dim, tiles, reps), ((dk, dv) if kind == "dkdv" else (dq,))


def mismatch(cupy, got, want, dtype: str) -> float:
    """The largest |got - want| in units of its bound (TOLERANCE: relative to the element, and to the
    tensor's largest); inf where got holds a NaN. At most 1 passes."""
    if bool(cupy.isnan(got).any()):
        return math.inf
    relative, of_largest = TOLERANCE[dtype]
    bound = relative * abs(want) + max(of_largest * float(abs(want).max()), 1e-300)
    return float((abs(got - want) / bound).max())


def measure(cupy, kind, tiles, problem, reference, reps) -> dict:
    """ms, mismatch and ok of one candidate; a candidate that fails to compile or launch is a failed
    row (with the error's first line), not the end of the sweep."""
    try:
        seconds, outputs = run_kernel(cupy, kind, tiles, problem, reps)
    except Exception as error:  # noqa: BLE001 - any failure of a candidate is a result to report
        return {"ms": None, "mismatch": None, "ok": False, "error": str(error).splitlines()[0][:200]}
    worst = max(mismatch(cupy, got, want, problem[0].dtype.name) for got, want in zip(outputs, reference[kind]))
    return {"ms": seconds * 1e3, "mismatch": worst, "ok": worst <= 1, "error": None}


def print_row(row: dict) -> None:
    timing = f"{row['ms']:9.3f} {row['mismatch']:9.2g}" if row["ms"] is not None else f"{'-':>9} {'-':>9}"
    verdict = ""
    if row["error"]:
        verdict = "  FAILED: " + row["error"]
    elif not row["ok"]:
        verdict = "  WRONG"
    print(f"{row['head_dim']:4d} {row['kernel']:8} {str(tuple(row['tile'])):>10} {timing}"
          f"{'  (default)' if row['default'] else ''}{verdict}", flush=True)


def sweep(cupy, dtype: str, head_dim: int, seq: int, reps: int) -> list[dict]:
    """Every candidate's row, printed as it is measured."""
    n_heads, batch = 2048 // head_dim, max(1, 16384 // seq)
    rng = cupy.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((batch, n_heads, seq, head_dim), dtype=dtype) for _ in range(4))
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = cuda_attention.forward(q, k, v, scale)
    dvec = (dout * out).sum(axis=-1)
    problem = (q, k, v, dout, out, lse, dvec, scale)
    default = cuda_attention.tiles_of(dtype)
    reference = {kind: run_kernel(cupy, kind, default, problem, 1)[1] for kind in KINDS}
    rows = []
    for kind, tiles in candidates(dtype, head_dim):
        row = {"dtype": dtype, "head_dim": head_dim, "seq": seq, "kernel": kind, "tile": getattr(tiles, kind),
               "default": getattr(tiles, kind) == getattr(default, kind),
               **measure(cupy, kind, tiles, problem, reference, reps)}
        print_row(row)
        rows.append(row)
    return rows


def fastest(rows: list[dict], dtype: str, head_dim: int) -> tuple[cuda_attention.Tiles, list[str]]:
    """Per kernel, the fastest correct tile, where it beats the default's time by more than MARGIN (else
    the default: a few percent is within a run's noise); and a line per kernel saying so."""
    chosen, lines = {}, []
    for kind in KINDS:
        correct = [row for row in rows if row["kernel"] == kind and row["head_dim"] == head_dim and row["ok"]]
        default = next((row for row in correct if row["default"]), None)
        best = min(correct, key=lambda row: row["ms"]) if correct else None
        if best is None or default is None or best["ms"] > (1 - MARGIN) * default["ms"]:
            chosen[kind] = getattr(cuda_attention.tiles_of(dtype), kind)
        else:
            chosen[kind] = tuple(best["tile"])
        if best is not None and default is not None:
            lines.append(f"  {kind}: default {tuple(default['tile'])} {default['ms']:.3f} ms, fastest "
                         f"{tuple(best['tile'])} {best['ms']:.3f} ms ({default['ms'] / best['ms']:.2f}x)")
    return cuda_attention.Tiles(**chosen), lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=cuda_attention.DTYPES)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--list", action="store_true", help="print the candidates and stop (no GPU needed)")
    parser.add_argument("--compile", action="store_true", help="compile the candidates with NVRTC, report, stop")
    args = parser.parse_args(argv)
    bad = [d for d in args.head_dims if d not in cuda_attention.HEAD_DIMS]
    if bad:
        parser.error(f"--head-dims {bad}: the kernels exist for {cuda_attention.HEAD_DIMS}")
    if args.list:
        for head_dim in args.head_dims:
            for kind, tiles in candidates(args.dtype, head_dim):
                print(f"{args.dtype} D={head_dim} {kind:8} {getattr(tiles, kind)}")
        return 0
    if args.compile:
        return compile_report(args.dtype, args.head_dims)
    from npllama.backend import BackendError, get_backend

    try:
        cupy = get_backend("cupy")
    except BackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    props = cupy.cuda.runtime.getDeviceProperties(0)
    arch = f"sm_{props['major']}{props['minor']}"
    print(f"{props['name'].decode()} ({arch}); {args.dtype}, causal, T = {args.seq_len}")
    print(f"{'D':>4} {'kernel':8} {'tile':>10} {'ms':>9} {'mismatch':>9}  (mismatch: the worst difference from the "
          "default tiles' outputs in units of its bound; at most 1 passes)")
    rows = []
    for head_dim in args.head_dims:
        rows += sweep(cupy, args.dtype, head_dim, args.seq_len, args.reps)
        if args.json:  # after each head dim: a run cut short keeps what it measured
            args.json.write_text(json.dumps({"arch": arch, "card": props["name"].decode(), "rows": rows}, indent=1))
    for head_dim in args.head_dims:
        tiles, lines = fastest(rows, args.dtype, head_dim)
        print("\n".join(lines))
        print(f"fastest {args.dtype} D={head_dim} {arch}: {tiles}")
    return 1 if any(not row["ok"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
