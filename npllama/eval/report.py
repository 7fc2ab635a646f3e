"""One task evaluated and reported: its metrics with standard errors, its chance level, every
example (for `--json`), and the text table `python -m npllama.eval` prints."""

from __future__ import annotations

import sys

from .scoring import Generation, Partial, aggregate, evaluate_items, few_shot_prompts, n_requests


def chance_level(items) -> float:
    """The expected headline score of a uniform guess: mean 1/(number of options); 0 for generation."""
    if not items or isinstance(items[0], Generation):
        return 0.0
    options = [len(item.contexts) if isinstance(item, Partial) else len(item.choices) for item in items]
    return sum(1 / n for n in options) / len(options)


def evaluate_task(model, loaded, shots: int = 0, limit: int | None = None, seed: int = 1234,
                  batch_size: int = 32, progress: bool = True) -> dict:
    """One task's results: metrics (value, stderr), headline, chance, and every example."""
    from tqdm import tqdm

    items = loaded.items[:limit] if limit else loaded.items
    prompted = few_shot_prompts(items, loaded.pool, shots, seed, loaded.task.description, loaded.task.separator)
    with tqdm(total=n_requests(prompted), desc=loaded.task.name, unit="request", disable=not progress,
              leave=False, file=sys.stderr) as bar:
        examples = evaluate_items(model, prompted, batch_size=batch_size, progress=bar.update)
    metrics = aggregate(examples)
    return {"headline": loaded.task.headline, "chance": chance_level(items), "n": len(examples), "shots": shots,
            "metrics": {name: {"value": value, "stderr": stderr} for name, (value, stderr) in metrics.items()},
            "examples": [{"index": example.index, "prompt": _prompt(item), **example.metrics, **example.details}
                         for example, item in zip(examples, prompted)]}


def _prompt(item):
    return list(item.contexts) if isinstance(item, Partial) else item.context


def table(results: dict) -> str:
    """The results as a text table, one row per task and metric."""
    lines = [f"{'task':15}{'metric':14}{'value':>8}{'stderr':>9}{'examples':>10}{'chance':>8}"]
    for name, result in results.items():
        for row, (metric, score) in enumerate(result["metrics"].items()):
            mark = " *" if metric == result["headline"] else ""
            lines.append(f"{name if row == 0 else '':15}{metric + mark:14}{score['value']:8.4f}{score['stderr']:9.4f}"
                         f"{result['n'] if row == 0 else '':>10}"
                         f"{format(result['chance'], '.4f') if row == 0 else '':>8}")
    return "\n".join(lines)
