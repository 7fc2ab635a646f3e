"""Mixed precision against float32 over a whole run: `python -m npllama.train` twice on the same
preset, seed and built-in corpus, once in float32 and once with --precision fp16; the validation loss
of every evaluation side by side, the largest relative difference against the goal (at most 1%), and
the steps the fp16 run skipped for an overflow.

    python bench/precision_tracking.py --backend cupy      # 134M, T = 1024, batch 16, 500 steps
    python bench/precision_tracking.py --backend numpy --preset nano --seq-len 64 --batch-size 4 \\
        --steps 20 --eval-every 10                          # on the CPU: a check that it works

Both runs share one tokenizer and token cache (--cache-dir). Each run's folder, log and
metrics.jsonl are kept under --out (default: a new temporary folder). Exit status: 0 when both runs
finished (the goal met or missed is printed), 1 when a run failed (its last lines are printed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.01  # issue 25: the fp16 run's validation loss within 1% of float32's at every evaluation


def train(args, out: Path, precision: str) -> subprocess.CompletedProcess:
    """One run of python -m npllama.train into out/<precision>, its output logged beside it."""
    command = [sys.executable, "-m", "npllama.train", "--backend", args.backend, "--preset", args.preset,
               "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--precision", precision,
               "--out", str(out / precision), "--cache-dir", str(out / "cache"), "--sample-tokens", "0",
               "--no-progress"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    (out / f"{precision}.log").write_text(result.stdout + result.stderr)
    return result


def metrics(run_folder: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def evaluations(run_folder: Path) -> dict[int, float]:
    """{step: validation loss} of a run."""
    return {row["step"]: row["val_loss"] for row in metrics(run_folder) if "val_loss" in row}


def skipped_steps(run_folder: Path) -> list[int]:
    """The steps an fp16 run skipped (its gradients overflowed float16)."""
    return [row["step"] for row in metrics(run_folder) if row.get("skipped")]


def compare(full: dict[int, float], half: dict[int, float]) -> tuple[list[str], float]:
    """A line per evaluation both runs made, and the largest |fp16 - float32| / float32 among them."""
    lines, worst = [f"{'step':>6} {'float32':>9} {'fp16':>9} {'rel diff':>9}"], 0.0
    for step in sorted(set(full) & set(half)):
        difference = abs(half[step] - full[step]) / full[step]
        worst = max(worst, difference)
        lines.append(f"{step:6d} {full[step]:9.4f} {half[step]:9.4f} {100 * difference:8.3f}%")
    return lines, worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cupy", choices=["numpy", "cupy"])
    parser.add_argument("--preset", default="134M")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="where the runs go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="npllama-precision-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"preset {args.preset}, backend {args.backend}, T = {args.seq_len}, batch {args.batch_size}, "
          f"{args.steps} steps, an evaluation every {args.eval_every}; runs in {out}", flush=True)
    for precision in ("full", "fp16"):
        result = train(args, out, precision)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            print(f"the {precision} run failed (exit status {result.returncode}):", *tail, sep="\n")
            return 1
        print(f"the {precision} run finished", flush=True)
    lines, worst = compare(evaluations(out / "full"), evaluations(out / "fp16"))
    skipped = skipped_steps(out / "fp16")
    print(*lines, sep="\n")
    print(f"skipped fp16 steps: {len(skipped)}" + (f" ({', '.join(map(str, skipped))})" if skipped else ""))
    verdict = "met" if worst <= GOAL else "missed"
    print(f"goal {verdict}: the fp16 validation loss within {100 * worst:.3f}% of float32's at every evaluation "
          f"(goal: within {100 * GOAL:.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
