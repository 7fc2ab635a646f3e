"""What a checkpoint's problems are called: `CheckpointError`, and the sentences that describe
tensors or a config that do not fit. Each message is one line: what, where, how to fix it."""

from __future__ import annotations

from pathlib import Path

from ..errors import NpllamaError, few


class CheckpointError(NpllamaError):
    """A checkpoint that cannot be used. The message is one line: what, where, how to fix it."""

    def __init__(self, what: str, where, fix: str):
        self.what, self.where, self.fix = what, Path(where), fix
        super().__init__(" ".join(f"checkpoint {where}: {what}; {fix}".split()))


def tensor_problem(found: dict, expected: dict) -> str | None:
    """What is wrong with `found` (name -> (shape, dtype name)) given `expected` (name -> shape), or None."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {few(unexpected)}")
        return " and ".join(parts)
    for name, shape in expected.items():
        if tuple(found[name][0]) != tuple(shape):
            return f"{name} has shape {tuple(found[name][0])}, this config needs {tuple(shape)}"
    dtypes: dict[str, list[str]] = {}
    for name, (_, dtype) in found.items():
        dtypes.setdefault(dtype, []).append(name)
    for dtype, names in dtypes.items():
        if dtype not in ("float32", "float64"):
            return f"{few(names)} {'is' if len(names) == 1 else 'are'} {dtype}; checkpoints hold float32 or float64"
    if len(dtypes) > 1:
        return "mixed dtypes: " + ", ".join(f"{dtype} ({few(names)})" for dtype, names in dtypes.items())
    return None


def config_differences(theirs: dict, ours: dict) -> str:
    """`checkpoint has dim=64, this run has dim=128, ...` for every field that differs."""
    return ", ".join(f"checkpoint has {key}={theirs[key]!r}, this run has {key}={ours[key]!r}"
                     for key in theirs if theirs[key] != ours[key])
