"""Train a Llama-1 model from raw text: `python -m npllama.train`.

With no arguments it trains the `tiny` preset (dim 128, 4 layers, 4 heads, 1.9M parameters) on
the built-in corpus (the Python standard library's source files, found on this machine) with a
4096-piece SentencePiece BPE tokenizer trained on the same text, for about ten minutes on two
CPU cores; the validation loss falls from ln(4096) = 8.3 to well below it.

Each step: draw `--grad-accum` batches of (B, T+1) token windows, run the hand-written forward
and backward of npllama.model on each, average the gradients, clip to global norm 1, and take
one AdamW step at the learning rate of a cosine schedule with linear warmup. Outputs in --out:

    metrics.jsonl      one JSON object per step (loss, lr, grad_norm, tokens/s) and per evaluation
    loss.png           the loss curves (when matplotlib is installed: pip install 'npllama[plot]')
    step-XXXXXXXX/     checkpoints (config, weights, optimizer, sampler and RNG state, tokenizer)
    latest             the name of the newest complete checkpoint

`--resume` continues a run exactly: the resumed steps give bitwise the parameters an
uninterrupted run would have given (on the CPU, same machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy

from . import checkpoint as ckpt
from . import data as corpus
from . import model as llama
from . import optim
from .backend import BACKENDS, get_backend
from .errors import NpllamaError
from .files import write_atomically
from .tokenizer import Tokenizer, train_tokenizer


class TrainError(NpllamaError):
    """A problem with the run's settings or state, stated in one line."""


@dataclass
class TrainSettings:
    """Everything that determines a run's numbers (saved in each checkpoint's state.json)."""

    preset: str
    vocab_size: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    grad_accum: int
    seed: int
    dtype: str


def default_cache_dir() -> Path:
    if os.environ.get("NPLLAMA_CACHE"):
        return Path(os.environ["NPLLAMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "npllama"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to a flag's help unless the help already says or X is None/False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m npllama.train",
        description="Train a Llama-1 model with hand-written backward passes. With no arguments: the 'tiny' "
                    "preset on the Python standard library's source files, about 10 minutes on 2 CPU cores.",
        formatter_class=_DefaultsFormatter)
    parser.add_argument("--backend", default="numpy",
                        help=f"array backend: {' or '.join(BACKENDS)} (cupy: not available yet in this release)")
    parser.add_argument("--preset", default="tiny", help=f"model shape: {', '.join(llama.PRESETS)}")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="override the preset's vocabulary size (the tokenizer is trained to match)")
    parser.add_argument("--data", nargs="+", default=None, metavar="PATH",
                        help="text files, folders or globs (default: the Python standard library's *.py files). "
                             "Files found in folders/globs that are not UTF-8 are skipped and counted; "
                             "a file named directly that is not UTF-8 is an error")
    parser.add_argument("--tokenizer", default=None, metavar="FILE",
                        help="a SentencePiece tokenizer.model (default: train one on the data, cached)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: runs/<preset>-<date>-<time>)")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                        help="continue the run in --out from its latest checkpoint, or from the checkpoint "
                             "given (which must belong to --out's run, or --out must be new); the other flags "
                             "must match the run's, except --steps (a longer run stretches the schedule)")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps in total")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warmup steps (default: 10%% of --steps; the paper used 2000)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak (paper: 0.1)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay (paper: 0.1)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (paper: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and batch sampling")
    parser.add_argument("--eval-every", type=int, default=100, help="validation every N steps (0: only at the end)")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    parser.add_argument("--checkpoint-every", type=int, default=200,
                        help="checkpoint every N steps and at the end, with a validation loss; weights that "
                             "diverged (non-finite) are never saved")
    parser.add_argument("--keep-checkpoints", type=int, default=2,
                        help="how many of the newest checkpoints to keep (0: all)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="parameter dtype")
    parser.add_argument("--cache-dir", default=None, help=f"tokenizer and token cache (default: {default_cache_dir()})")
    parser.add_argument("--sample-tokens", type=int, default=80, help="tokens to generate at the end (0: none)")
    parser.add_argument("--sample-prompt", default=None,
                        help="prompt of the final sample (default: 'def ' on the built-in corpus, else empty)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to the log)")
    return parser


def _settings_from_args(args, config) -> TrainSettings:
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    return TrainSettings(preset=args.preset, vocab_size=config.vocab_size, steps=args.steps,
                         batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=warmup,
                         min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                         grad_accum=args.grad_accum, seed=args.seed, dtype=args.dtype)


def _validate_args(args):
    checks = [
        (args.steps >= 1, "--steps must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.seq_len >= 1, "--seq-len must be at least 1"),
        (args.grad_accum >= 1, "--grad-accum must be at least 1"),
        (args.lr > 0 and math.isfinite(args.lr), "--lr must be a positive number"),
        (args.warmup is None or args.warmup >= 0, "--warmup must be >= 0"),
        (0 <= args.min_lr_ratio <= 1, "--min-lr-ratio must lie in [0, 1]"),
        (args.eval_every >= 0 and args.eval_batches >= 1, "--eval-every must be >= 0 and --eval-batches >= 1"),
        (args.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
        (args.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0"),
        (args.grad_clip >= 0 and math.isfinite(args.grad_clip), "--grad-clip must be >= 0 (0: no clipping)"),
        (args.weight_decay >= 0 and math.isfinite(args.weight_decay), "--weight-decay must be >= 0"),
        (args.sample_tokens >= 0, "--sample-tokens must be >= 0"),
        (args.vocab_size is None or args.vocab_size >= 259, "--vocab-size must be at least 259 "
                                                            "(256 byte pieces + unk, bos, eos)"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainError(message)


def _check_writable(folder: Path, flag: str):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise TrainError(f"{flag} {folder}: cannot write there ({error.strerror}); choose another folder") from None


def _check_memory(config, dtype: str):
    """Refuse a model whose weights, gradients and AdamW moments alone exceed this machine's memory."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    needed = config.n_params() * numpy.dtype(dtype).itemsize * 4  # params, grads, m, v
    if needed > physical:
        raise TrainError(f"the model has {config.n_params():,} parameters: weights, gradients and AdamW state need "
                         f"{needed / 2**30:.0f} GiB, more than this machine's {physical / 2**30:.0f} GiB; "
                         "choose a smaller --preset")


def _load_tokenizer(args, settings, documents, cache_dir: Path, resumed, log) -> Tokenizer:
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    elif resumed is not None and resumed.tokenizer_model is not None:
        tokenizer = Tokenizer.from_bytes(resumed.tokenizer_model)
    else:
        signature = corpus.sources_signature(documents)
        import sentencepiece

        from .tokenizer import DEFAULT_MAX_SENTENCES, LLAMA_TRAINING_OPTIONS

        recipe = {"vocab": settings.vocab_size, "sources": signature, "options": LLAMA_TRAINING_OPTIONS,
                  "max_sentences": DEFAULT_MAX_SENTENCES, "seed": 0, "sentencepiece": sentencepiece.__version__}
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = cache_dir / "tokenizers" / f"bpe-{settings.vocab_size}-{key}.model"
        if path.is_file():
            tokenizer = Tokenizer.load(path)
            log(f"tokenizer: {path} (cached, {tokenizer.vocab_size} pieces)")
        else:
            log(f"training a {settings.vocab_size}-piece BPE tokenizer on {len(documents)} files ...")
            started = time.time()
            # skipped files are reported once, by the tokenisation below
            texts = (text for _, text in corpus.read_documents(documents, warn=lambda message: None))
            tokenizer = train_tokenizer(texts, settings.vocab_size)
            tokenizer.save(path)
            log(f"tokenizer: {path} ({time.time() - started:.0f} s)")
    if tokenizer.vocab_size != settings.vocab_size:
        raise TrainError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                         f"{settings.vocab_size}; pass --vocab-size {tokenizer.vocab_size} or a matching --tokenizer")
    return tokenizer


def _evaluate(params, config, batches) -> float:
    losses = [llama.loss(params, config, x, y) for x, y in batches]
    return float(numpy.mean(losses)) if losses else float("nan")


def _plot(metrics_path: Path, out_path: Path, log):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no loss.png (pip install 'npllama[plot]')")
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def train(args, log=None) -> int:
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    _validate_args(args)
    get_backend(args.backend)  # a backend that is unknown or not available stops here, in one line
    if args.preset not in llama.PRESETS:
        raise TrainError(f"--preset {args.preset}: unknown preset; choose one of {', '.join(llama.PRESETS)}")
    config = llama.get_preset(args.preset)
    if args.vocab_size is not None:
        config = llama.LlamaConfig(**{**config.to_dict(), "vocab_size": args.vocab_size})
    if args.seq_len > config.max_seq_len:
        raise TrainError(f"--seq-len {args.seq_len} exceeds the {args.preset} model's maximum context of "
                         f"{config.max_seq_len}; pass --seq-len {config.max_seq_len} or less")
    _check_memory(config, args.dtype)
    if args.resume == "" and args.out is None:
        raise TrainError("--resume without a checkpoint continues the run in --out; pass --out RUN_DIR")
    out = Path(args.out) if args.out else Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()

    out_had_run = out.is_dir() and ckpt.find_latest(out) is not None
    resumed = None
    if args.resume is not None:
        if args.resume == "" and not out_had_run:
            raise TrainError(f"--resume: {out} holds no checkpoint to resume; pass --resume CHECKPOINT_DIR")
        resumed = ckpt.load_checkpoint(Path(args.resume) if args.resume else out, expected_config=config)
        if out_had_run and resumed.path.parent.resolve() != out.resolve():
            raise TrainError(f"--out {out} already holds another run; to continue {resumed.path} pass "
                             f"--out {resumed.path.parent}, or choose a new --out")
    elif out_had_run:
        raise TrainError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
    created_out = not out.exists()
    _check_writable(out, "--out")
    try:
        return _train_into(args, log, config, out, cache_dir, resumed)
    except BaseException:
        if created_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no empty folder behind
        raise


def _train_into(args, log, config, out: Path, cache_dir: Path, resumed) -> int:
    _check_writable(cache_dir, "--cache-dir")
    settings = _settings_from_args(args, config)
    documents = corpus.find_documents(args.data)
    tokenizer = _load_tokenizer(args, settings, documents, cache_dir, resumed, log)
    from tqdm import tqdm

    tokens = corpus.prepare_tokens(documents, tokenizer, cache_dir / "tokens",
                                   progress=None if args.no_progress else tqdm, warn=log)
    data_id = tokens.info["content_sha256"]
    log(f"data: {tokens.info['n_tokens']['train']:,} training and {tokens.info['n_tokens']['val']:,} validation "
        f"tokens from {len(documents)} files "
        f"(held out: {'whole files' if tokens.info['split'] == 'documents' else 'the last 5%'})")

    sampler = corpus.BatchSampler(tokens.train, settings.batch_size, settings.seq_len, settings.seed)
    val_batches = corpus.fixed_batches(tokens.val, settings.batch_size, settings.seq_len, args.eval_batches)
    if not val_batches:
        log(f"validation: the held-out split ({tokens.val.size} tokens) is shorter than one window; "
            "validating on training windows instead")
        val_batches = corpus.fixed_batches(tokens.train, settings.batch_size, settings.seq_len, args.eval_batches)
    adamw = optim.AdamWConfig(weight_decay=settings.weight_decay, grad_clip=settings.grad_clip)

    metrics_path = out / "metrics.jsonl"
    if resumed is not None:
        saved = resumed.state
        if saved.get("data_id") != data_id:
            raise TrainError(f"--resume: the checkpoint {resumed.path} was trained on other data (or another "
                             "tokenizer); pass the same --data, or start a new run with another --out")
        before = dict(saved.get("settings", {}))
        now = asdict(settings)
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in now.items() if k != "steps" and before.get(k) != v]
        if changed:
            raise TrainError(f"--resume: the run's settings differ from the checkpoint's ({', '.join(changed)}); "
                             "resume with the same flags, or start a new run with another --out")
        if before.get("steps") != settings.steps:
            log(f"note: --steps changed from {before.get('steps')} to {settings.steps}: the learning-rate schedule "
                "is stretched, so the run will not match one trained for this many steps from the start")
        if resumed.optimizer_state is None:
            raise TrainError(f"--resume: {resumed.path} holds no optimizer state (an exported model?); "
                             "training cannot continue exactly from it")
        params = {name: p.astype(settings.dtype, copy=False) for name, p in resumed.params.items()}
        opt_state = resumed.optimizer_state
        sampler.restore(saved["sampler"])
        start_step = int(saved["step"])
        if start_step >= settings.steps:
            raise TrainError(f"--resume: the checkpoint is at step {start_step}, the run has --steps "
                             f"{settings.steps}; pass a larger --steps to train further")
        _truncate_metrics(metrics_path, start_step)
        log(f"resumed from {resumed.path} at step {start_step}")
    else:
        params = llama.init_params(config, seed=settings.seed, dtype=settings.dtype)
        opt_state = optim.init_state(params)
        start_step = 0
    schedule = optim.CosineSchedule(settings.lr, settings.steps, settings.warmup, settings.min_lr_ratio)
    log(f"model: {args.preset} ({config.n_params():,} parameters), {settings.steps} steps of "
        f"{settings.batch_size * settings.grad_accum} x {settings.seq_len} tokens, output in {out}")

    last_saved = None if resumed is None else (resumed.path, resumed.step)
    keep = args.keep_checkpoints or None

    def save(step, val_loss):
        """Checkpoint weights that are finite and give a finite validation loss, or stop the run."""
        nonlocal last_saved
        if not math.isfinite(optim.global_norm(params)):
            stop(step, "the weights' norm overflowed (they diverged)")
        if not math.isfinite(val_loss):
            stop(step, f"the validation loss became {val_loss}")
        state = {"step": step, "settings": asdict(settings), "sampler": sampler.state(), "data_id": data_id,
                 "tokenizer_fingerprint": tokenizer.fingerprint}
        path = ckpt.save_checkpoint(out, step, config=config, params=params, optimizer_state=opt_state,
                                    state=state, tokenizer_model=tokenizer.model_bytes, keep_last=keep)
        last_saved = (path, step)

    def stop(step, what):
        progress.close()
        where = (f"the last good checkpoint is {last_saved[0]} (step {last_saved[1]})" if last_saved
                 else "no checkpoint had been written yet")
        raise TrainError(f"{what} at step {step}; stopped without saving; {where}; "
                         "start a new run (another --out) with a lower --lr")

    progress = tqdm(total=settings.steps, initial=start_step, disable=args.no_progress, unit="step",
                    dynamic_ncols=True, file=sys.stderr)
    tokens_per_step = settings.batch_size * settings.seq_len * settings.grad_accum
    # overflow shows up as a non-finite loss, gradient norm or weight, which stops the run with a
    # clear message below; NumPy's per-operation warnings would only bury that message
    with open(metrics_path, "a") as metrics, numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if start_step == 0:
            initial = _evaluate(params, config, val_batches)
            metrics.write(json.dumps({"step": 0, "val_loss": initial}) + "\n")
            progress.write(f"step 0: validation loss {initial:.4f} (ln V = {math.log(config.vocab_size):.4f})",
                           file=sys.stderr)
        for step in range(start_step, settings.steps):
            started = time.perf_counter()
            lr = schedule(step)
            loss_sum, grads = 0.0, None
            for _ in range(settings.grad_accum):
                inputs, targets = sampler.next_batch()
                micro_loss, micro_grads = llama.loss_and_grads(params, config, inputs, targets)
                loss_sum += micro_loss
                if grads is None:
                    grads = micro_grads
                else:
                    for name, g in micro_grads.items():
                        grads[name] += g
            if settings.grad_accum > 1:
                for g in grads.values():
                    g /= settings.grad_accum
            loss_value = loss_sum / settings.grad_accum
            grad_norm = optim.global_norm(grads)
            if not math.isfinite(loss_value):
                stop(step + 1, f"the loss became {loss_value}")
            if not math.isfinite(grad_norm):
                stop(step + 1, f"the gradient norm became {grad_norm} (loss {loss_value:.4f})")
            stats = optim.step(params, grads, opt_state, lr, adamw, grad_norm=grad_norm)
            elapsed = time.perf_counter() - started
            done = step + 1
            record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": stats["grad_norm"],
                      "tokens_per_s": tokens_per_step / elapsed}
            checkpoint_now = done % args.checkpoint_every == 0 or done == settings.steps
            if (args.eval_every and done % args.eval_every == 0) or checkpoint_now:
                record["val_loss"] = _evaluate(params, config, val_batches)
                progress.write(f"step {done}: validation loss {record['val_loss']:.4f}", file=sys.stderr)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            progress.update(1)
            if checkpoint_now:
                save(done, record["val_loss"])
    progress.close()
    _plot(metrics_path, out / "loss.png", log)
    log(f"checkpoint: {last_saved[0]}")
    if args.sample_tokens > 0:
        from .generate import generate

        prompt = args.sample_prompt if args.sample_prompt is not None else ("def " if args.data is None else "")
        log(f"sample ({args.sample_tokens} tokens, temperature 0.8):")
        text = generate(params, config, tokenizer, prompt, args.sample_tokens, temperature=0.8, seed=settings.seed)
        print(prompt + text, flush=True)
    return 0


def _truncate_metrics(path: Path, last_step: int):
    """Drop the log rows after `last_step` (written by the run being resumed after its checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    write_atomically(path, "".join(line + "\n" for line in kept).encode())


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return train(args)
    except NpllamaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; checkpoints written so far are complete and kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
