"""Every setting of a training run, in one dataclass that also makes the command line.

Each field of `TrainConfig` is one flag of `python -m npllama.train` (`batch_size` is
`--batch-size`), with its default, its help and the rule its value must satisfy written beside
it. The parser (`parser()`) and the validation (`TrainConfig.__post_init__`) are generated from
those fields, so a new flag is one new field; `train(TrainConfig(...))` runs from Python the same
way `python -m npllama.train` runs from a shell, and a bad value fails the same way: one line, a
`TrainError`.

The fields marked `saved` decide a run's numbers: they are stored with every checkpoint and a
`--resume` must repeat them (`saved_settings`).
"""

from __future__ import annotations

import argparse
import functools
import math
import typing
from dataclasses import dataclass, field, fields

from .. import optim
from ..backend import BACKENDS
from ..cli import OneLineParser
from ..errors import NpllamaError
from ..files import default_cache_dir
from ..model import PRESETS
from ..tokenizer import BYTE_PIECE_COUNT, MIN_VOCAB_SIZE

DTYPES = ("float32", "float64")  # the parameter dtypes training supports
PRECISIONS = ("full", "fp16")  # every array in --dtype, or float16 forward and backward (mixed precision)


class TrainError(NpllamaError):
    """A problem with the run's settings or state, stated in one line."""


def _setting(default, help, *, rule=None, saved=False, **argparse_options):
    """A field of TrainConfig: its default, its --help text, and `rule` = (predicate, message).

    The predicate gets the value (never None: None means "derive it", and is always allowed for an
    optional field); the message is completed with the flag and value, e.g. "{flag} must be >= 0".
    """
    return field(default=default, metadata={"help": help, "rule": rule, "saved": saved, "argparse": argparse_options})


def _at_least(lowest):
    return (lambda value: value >= lowest, f"{{flag}} must be at least {lowest}")


def _non_negative(note=""):
    return (lambda value: value >= 0 and math.isfinite(value), "{flag} must be >= 0" + note)


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one training run; the defaults are `python -m npllama.train` with no flags."""

    backend: str = _setting("numpy", f"array backend: {' or '.join(BACKENDS)} (cupy: a CUDA GPU, with npllama's "
                                     "kernels)")
    preset: str = _setting("tiny", f"model shape: {', '.join(PRESETS)}", saved=True,
                           rule=(lambda name: name in PRESETS,
                                 f"{{flag}} {{value}}: unknown preset; choose one of {', '.join(PRESETS)}"))
    vocab_size: int | None = _setting(None, "override the preset's vocabulary size (the tokenizer is trained to "
                                            "match)", saved=True,
                                      rule=(lambda n: n >= MIN_VOCAB_SIZE,
                                            f"{{flag}} must be at least {MIN_VOCAB_SIZE} ({BYTE_PIECE_COUNT} byte "
                                            "pieces + unk, bos, eos)"))
    n_kv_heads: int | None = _setting(None, "key/value heads, shared by groups of query heads (grouped-query "
                                            "attention; default: the preset's, one per query head)",
                                      rule=_at_least(1))
    tie_embeddings: bool = _setting(False, "use the embedding matrix as the output head too (no output.weight)")
    data: list[str] | None = _setting(None, "text files, folders or globs (default: the Python standard library's "
                                            "*.py files). Files found in folders/globs that are not UTF-8 are "
                                            "skipped and counted; a file named directly that is not UTF-8 is an "
                                            "error", nargs="+", metavar="PATH")
    tokenizer: str | None = _setting(None, "a SentencePiece tokenizer.model (default: train one on the data, "
                                           "cached)", metavar="FILE")
    out: str | None = _setting(None, "output folder (default: runs/<preset>-<date>-<time>)", metavar="DIR")
    resume: str | None = _setting(None, "continue the run in --out from its latest checkpoint, or from the "
                                        "checkpoint given (which must belong to --out's run, or --out must be "
                                        "new); the other flags must match the run's, except --steps (a longer "
                                        "run stretches the schedule)", nargs="?", const="", metavar="CHECKPOINT")
    steps: int = _setting(800, "optimizer steps in total", saved=True, rule=_at_least(1))
    batch_size: int = _setting(16, "sequences per micro-batch (under mpirun: in all, shared by the processes)",
                               saved=True, rule=_at_least(1))
    seq_len: int = _setting(128, "tokens per sequence", saved=True, rule=_at_least(1))
    grad_accum: int = _setting(1, "micro-batches per optimizer step", saved=True, rule=_at_least(1))
    threads: int | None = _setting(None, "worker threads of the NumPy backend, each running forward and backward "
                                         "on its rows of the batch; the numbers do not depend on it (default: the "
                                         "cores this process may use; 0: none, each batch runs whole with the "
                                         "BLAS's own threads, as under mpirun)", rule=_at_least(0), metavar="N")
    zero: int = _setting(0, "under mpirun, 1 shards AdamW's moments over the processes (ZeRO stage 1: each "
                            "updates its rows of every parameter); the numbers are those of 0", choices=(0, 1),
                         type=int, rule=(lambda level: level in (0, 1), "{flag} must be 0 or 1"))
    lr: float = _setting(2e-3, "peak learning rate", saved=True,
                         rule=(lambda lr: lr > 0 and math.isfinite(lr), "{flag} must be a positive number"))
    warmup: int | None = _setting(None, "warmup steps (default: 10%% of --steps; the paper used 2000)", saved=True,
                                  rule=(lambda n: n >= 0, "{flag} must be >= 0"))
    min_lr_ratio: float = _setting(0.1, "final learning rate / peak (paper: 0.1)", saved=True,
                                   rule=(lambda ratio: 0 <= ratio <= 1, "{flag} must lie in [0, 1]"))
    weight_decay: float = _setting(0.1, "AdamW decoupled weight decay (paper: 0.1)", saved=True,
                                   rule=_non_negative())
    grad_clip: float = _setting(1.0, "max global gradient norm (paper: 1.0)", saved=True,
                                rule=_non_negative(" (0: no clipping)"))
    seed: int = _setting(0, "seed for initialisation and batch sampling", saved=True, rule=_at_least(0))
    eval_every: int = _setting(100, "validation every N steps (0: only at the end)", rule=_at_least(0))
    eval_batches: int = _setting(8, "validation batches per evaluation", rule=_at_least(1))
    checkpoint_every: int = _setting(200, "checkpoint every N steps and at the end, with a validation loss; "
                                          "weights that diverged (non-finite) are never saved", rule=_at_least(1))
    keep_checkpoints: int = _setting(2, "how many of the newest checkpoints to keep (0: all)", rule=_at_least(0))
    dtype: str = _setting("float32", "parameter dtype", saved=True, choices=DTYPES,
                          rule=(lambda name: name in DTYPES, "{flag} must be float32 or float64"))
    precision: str = _setting("full", "full: every array in --dtype; fp16: mixed precision, forward and backward in "
                                      "float16 (products and reductions accumulated in float32) on a float16 copy of "
                                      "float32 master weights, AdamW in float32, with dynamic loss scaling",
                              saved=True, choices=PRECISIONS,
                              rule=(lambda name: name in PRECISIONS, "{flag} must be full or fp16"))
    loss_scale: float | None = _setting(None, "with --precision fp16, the first loss scale, a power of two; halved "
                                              "(and the step skipped) whenever a gradient overflows float16, doubled "
                                              f"after {optim.GROWTH_INTERVAL} steps without one (default: 2^16); a "
                                              "resumed run continues from its checkpoint's scale",
                                        rule=(optim.is_loss_scale,
                                              "{flag} must be a power of two of at least 1, such as 65536"))
    tf32: bool = _setting(False, "with --backend cupy, let float32 matrix products, attention's included, round "
                                 "their inputs to TF32 (a 10-bit mantissa) on the tensor cores, accumulating in "
                                 "float32: faster, other numbers (default: full float32)", saved=True)
    cache_dir: str | None = _setting(None, f"tokenizer and token cache (default: {default_cache_dir()})")
    sample_tokens: int = _setting(80, "tokens to generate at the end (0: none)", rule=_at_least(0))
    sample_prompt: str | None = _setting(None, "prompt of the final sample (default: 'def ' on the built-in "
                                               "corpus, else empty)")
    no_progress: bool = _setting(False, "no progress bar (metrics still go to the log)")

    def __post_init__(self):
        for spec in fields(self):
            _check(spec, getattr(self, spec.name))
        if self.precision == "fp16" and self.dtype != "float32":
            raise TrainError(f"--precision fp16 keeps float32 master weights; --dtype {self.dtype} would not be "
                             "used: drop --dtype, or train with --precision full")
        if self.loss_scale is not None and self.precision != "fp16":
            raise TrainError("--loss-scale scales the float16 gradients of --precision fp16; with --precision "
                             f"{self.precision} there are none: drop it, or add --precision fp16")
        if self.tf32 and self.precision == "fp16":
            raise TrainError("--tf32 changes float32 matrix products; with --precision fp16 they are float16 "
                             "(accumulated in float32): drop one of the two")
        if self.tf32 and (self.backend != "cupy" or self.dtype != "float32"):
            raise TrainError(f"--tf32 changes float32 matrix products on the GPU; with --backend {self.backend} and "
                             f"--dtype {self.dtype} it would change nothing: drop it, or train with --backend cupy "
                             "--dtype float32")
        if self.zero and self.backend != "numpy":
            raise TrainError(f"--zero 1 shards AdamW's moments of CPU processes only (the GPUs' NCCL has no "
                             f"all-gather of uneven shards); with --backend {self.backend} use --zero 0")

    @property
    def first_loss_scale(self) -> float:
        """The loss scale a mixed-precision run starts with: --loss-scale, or 2^16."""
        return self.loss_scale if self.loss_scale is not None else optim.DEFAULT_LOSS_SCALE

    @property
    def effective_warmup(self) -> int:
        """The warmup this run uses: --warmup, or 10% of --steps (at least 1)."""
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)


def flag(name: str) -> str:
    """The command-line flag of a field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


@functools.cache
def _field_types() -> dict:
    """Each field's type with the `| None` removed: int, float, str, bool or list[str]."""
    types = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = typing.get_args(hint)
        types[name] = next(arg for arg in args if arg is not type(None)) if type(None) in args else hint
    return types


def _check(spec, value):
    """Raise TrainError unless `value` has the field's type and satisfies its rule."""
    expected = _field_types()[spec.name]
    if value is None:
        if spec.default is None:
            return
        raise TrainError(f"{flag(spec.name)} needs a value")
    if expected is bool:
        well_typed = isinstance(value, bool)
    elif expected is int:
        well_typed = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        well_typed = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is str:
        well_typed = isinstance(value, str)
    else:  # list[str]
        well_typed = isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)
    if not well_typed:
        raise TrainError(f"{flag(spec.name)} must be {getattr(expected, '__name__', 'a list of str')}, "
                         f"got {value!r}")
    rule = spec.metadata["rule"]
    if rule is not None and not rule[0](value):
        raise TrainError(rule[1].format(flag=flag(spec.name), value=value))


class _DefaultsFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to a flag's help unless the help already says or X is None/False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m npllama.train`, one flag per field of TrainConfig."""
    result = OneLineParser(
        prog="python -m npllama.train",
        description="Train a Llama-1 model with hand-written backward passes. With no arguments: the 'tiny' "
                    "preset on the Python standard library's source files, about 10 minutes on 2 CPU cores.",
        formatter_class=_DefaultsFormatter)
    types = _field_types()
    for spec in fields(TrainConfig):
        options = dict(spec.metadata["argparse"])
        if types[spec.name] is bool:
            options["action"] = "store_true"
        elif types[spec.name] in (int, float, str):
            options["type"] = types[spec.name]
        result.add_argument(flag(spec.name), default=spec.default, help=spec.metadata["help"], **options)
    return result


def from_command_line(argv=None) -> TrainConfig:
    """Parse `argv` (default: sys.argv[1:]) into a TrainConfig; a bad value raises TrainError."""
    return TrainConfig(**vars(parser().parse_args(argv)))


# The saved settings added after checkpoints were first written, with what a checkpoint that does
# not record one (it is older than the setting) ran with. Any other missing setting is a change.
ADDED_SAVED_SETTINGS = {"tf32": False, "precision": "full"}


def saved_settings(config: TrainConfig, vocab_size: int) -> dict:
    """The settings that decide a run's numbers, as saved with each checkpoint: the `saved` fields,
    with the derived values filled in (the model's vocabulary size, the warmup actually used)."""
    settings = {spec.name: getattr(config, spec.name) for spec in fields(config) if spec.metadata["saved"]}
    settings.update(vocab_size=vocab_size, warmup=config.effective_warmup)
    return settings


def command_line(config: TrainConfig) -> list[str]:
    """The flags that give `config` (those of the fields that differ from their defaults)."""
    flags = []
    for spec in fields(config):
        value = getattr(config, spec.name)
        if value == spec.default:
            continue
        if value is True or (spec.name == "resume" and value == ""):
            flags.append(flag(spec.name))
        elif isinstance(value, (list, tuple)):
            flags += [flag(spec.name), *map(str, value)]
        else:
            flags += [flag(spec.name), str(value)]
    return flags
