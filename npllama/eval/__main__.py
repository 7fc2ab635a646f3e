"""Zero- and few-shot evaluation on the Llama paper's benchmarks, or on tasks of your own.

    python -m npllama.eval.datasets download               # once, with access to PyPI
    python -m npllama.eval --checkpoint runs/mine --tasks all --limit 200
    python -m npllama.eval --checkpoint Llama-2-7b-hf --tasks arc_easy,piqa --shots 5 --json scores.json
    python -m npllama.eval --checkpoint runs/mine --tasks my_task.jsonl

Prints a table per task: each metric, its value and standard error, the number of examples and
the chance level; `*` marks the metric the paper reports. `--json` writes the same with every
example's prompt, scores and answer, for audit. How items are scored: npllama/eval/scoring.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..backend import BACKENDS
from ..cli import OneLineParser, command, integer
from ..errors import NpllamaError
from .report import evaluate_task, table
from .scoring import MAX_SHOTS


def _parser():
    from ..convert.load import WHAT_LOADS
    from .tasks import BENCHMARKS, default_data_dir

    parser = OneLineParser(prog="python -m npllama.eval",
                           description="Zero- and few-shot evaluation, scored as in the Llama paper.")
    parser.add_argument("--checkpoint", required=True,
                        help=WHAT_LOADS)
    parser.add_argument("--tasks", default="all",
                        help=f"comma-separated: {', '.join(BENCHMARKS)}, 'all' (those ten), or a local "
                             "task's .jsonl file (default all)")
    parser.add_argument("--shots", type=integer(minimum=0), default=0,
                        help=f"few-shot examples before each item, 0 to {MAX_SHOTS} (default 0)")
    parser.add_argument("--limit", type=integer(minimum=1), default=None,
                        help="evaluate only the first N items of each task")
    parser.add_argument("--seed", type=integer(minimum=0), default=1234, help="few-shot draw seed (default 1234)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the results, with every example's prompt and scores, to FILE")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where python -m npllama.eval.datasets download put the benchmarks "
                             f"(default {default_data_dir()})")
    parser.add_argument("--batch-size", type=integer(minimum=1), default=32,
                        help="completions (or answers) computed in one forward pass (default 32)")
    parser.add_argument("--backend", default="numpy", help=f"array backend: {' or '.join(BACKENDS)}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


@command
def main(argv=None) -> int:
    from ..convert.load import load
    from .tasks import BENCHMARKS, load_task

    args = _parser().parse_args(argv)
    try:
        if args.shots > MAX_SHOTS:
            raise NpllamaError(f"--shots {args.shots}: at most {MAX_SHOTS}")
        names = [name.strip() for name in args.tasks.split(",") if name.strip()]
        names = [task for name in names for task in (BENCHMARKS if name == "all" else [name])]
        if not names:
            raise NpllamaError("--tasks is empty; name at least one task, or 'all'")
        loaded_tasks = [load_task(name, args.data_dir) for name in dict.fromkeys(names)]
        for loaded in loaded_tasks:
            if args.shots > len(loaded.pool):
                raise NpllamaError(f"--shots {args.shots}: the few-shot pool of {loaded.task.name} ({loaded.where}) "
                                   f"holds {len(loaded.pool)} examples; ask for at most {len(loaded.pool)}")
        if args.json is not None:
            _check_writable(args.json)
        model = load(args.checkpoint, backend=args.backend, flag="--checkpoint")
        if model.tokenizer is None:
            raise NpllamaError(f"--checkpoint {model.path}: the model has no tokenizer.model; put its tokenizer "
                               "beside the weights")
        started = time.perf_counter()
        results = {}
        for loaded in loaded_tasks:
            results[loaded.task.name] = evaluate_task(model, loaded, args.shots, args.limit, args.seed,
                                                      args.batch_size, progress=not args.no_progress)
        seconds = time.perf_counter() - started
    except KeyboardInterrupt:
        return 130
    print(table(results))
    print(f"{args.shots}-shot, {sum(r['n'] for r in results.values())} examples in {seconds:.0f} s "
          f"({args.checkpoint}, backend {args.backend})")
    if args.json is not None:
        from ..files import write_atomically

        report = {"checkpoint": str(args.checkpoint), "shots": args.shots, "seed": args.seed, "limit": args.limit,
                  "seconds": seconds, "tasks": results}
        write_atomically(args.json, json.dumps(report, indent=1, ensure_ascii=False).encode("utf-8"))
    return 0


def _check_writable(path: Path) -> None:
    """--json is checked before the evaluation runs, so that hours of work never end unwritable."""
    import os

    from ..files import cannot_create_in, kind_of

    kind = kind_of(path)
    if kind not in (None, "regular file"):
        raise NpllamaError(f"--json {path}: it is a {kind}; name a file to write")
    if not path.parent.is_dir():
        raise NpllamaError(f"--json {path}: the folder {path.parent} does not exist; create it first")
    # the report replaces the file (write_atomically: a new file renamed over it), so the folder must
    # take a new file; a read-only file is kept read-only, as a user who made it so would expect
    reason = cannot_create_in(path.parent) or (
        "permission denied" if kind is not None and not os.access(path, os.W_OK) else None)
    if reason:
        raise NpllamaError(f"--json {path}: cannot be written ({reason}); choose another place")


if __name__ == "__main__":
    sys.exit(main())
