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
from .tokenizer import Tokenizer, TokenizerError, train_tokenizer


class TrainError(ValueError):
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


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m npllama.train",
        description="Train a Llama-1 model with hand-written backward passes. With no arguments: the 'tiny' "
                    "preset on the Python standard library's source files, about 10 minutes on 2 CPU cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"],
                        help="array backend (cupy: the GPU backend is not available yet)")
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
                        help="continue a run: from --out's latest checkpoint, or from the checkpoint given")
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
    parser.add_argument("--checkpoint-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="parameter dtype")
    parser.add_argument("--cache-dir", default=None, help=f"tokenizer and token cache (default: {default_cache_dir()})")
    parser.add_argument("--sample-tokens", type=int, default=80, help="tokens to generate at the end (0: none)")
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
        (args.vocab_size is None or args.vocab_size >= 259, "--vocab-size must be at least 259 "
                                                            "(256 byte pieces + unk, bos, eos)"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainError(message)


def _check_writable(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise TrainError(f"--out {out}: cannot write there ({error.strerror}); choose another folder") from None


def _load_tokenizer(args, settings, documents, cache_dir: Path, resumed, log) -> Tokenizer:
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    elif resumed is not None and resumed.tokenizer_model is not None:
        tokenizer = Tokenizer.from_bytes(resumed.tokenizer_model)
    else:
        signature = corpus.sources_signature(documents)
        key = hashlib.sha256(json.dumps({"v": settings.vocab_size, "sources": signature},
                                        sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir / "tokenizers" / f"bpe-{settings.vocab_size}-{key}.model"
        if path.is_file():
            tokenizer = Tokenizer.load(path)
            log(f"tokenizer: {path} (cached, {tokenizer.vocab_size} pieces)")
        else:
            log(f"training a {settings.vocab_size}-piece BPE tokenizer on {len(documents)} files ...")
            started = time.time()
            texts = (text for _, text in corpus.read_documents(documents, warn=log))
            tokenizer = train_tokenizer(texts, settings.vocab_size)
            path.parent.mkdir(parents=True, exist_ok=True)
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
    if args.backend == "cupy":
        raise TrainError("--backend cupy: the GPU backend is not available yet; use --backend numpy")
    if args.preset not in llama.PRESETS:
        raise TrainError(f"--preset {args.preset}: unknown preset; choose one of {', '.join(llama.PRESETS)}")
    config = llama.get_preset(args.preset)
    if args.vocab_size is not None:
        config = llama.LlamaConfig(**{**config.to_dict(), "vocab_size": args.vocab_size})
    if args.seq_len > config.max_seq_len:
        raise TrainError(f"--seq-len {args.seq_len} exceeds the {args.preset} model's maximum context of "
                         f"{config.max_seq_len}; pass --seq-len {config.max_seq_len} or less")
    out = Path(args.out) if args.out else Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()

    resumed = None
    if args.resume is not None:
        source = Path(args.resume) if args.resume else out
        if not args.resume and ckpt.find_latest(out) is None:
            raise TrainError(f"--resume: {out} holds no checkpoint to resume; pass --resume CHECKPOINT_DIR")
        resumed = ckpt.load_checkpoint(source, expected_config=config)
    elif out.is_dir() and ckpt.find_latest(out) is not None:
        raise TrainError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
    _check_writable(out)
    settings = _settings_from_args(args, config)

    documents = corpus.find_documents(args.data)
    tokenizer = _load_tokenizer(args, settings, documents, cache_dir, resumed, log)
    from tqdm import tqdm

    tokens = corpus.prepare_tokens(documents, tokenizer, cache_dir / "tokens",
                                   progress=None if args.no_progress else tqdm, warn=log)
    data_id = tokens.directory.name
    log(f"data: {tokens.info['n_tokens']['train']:,} training and {tokens.info['n_tokens']['val']:,} validation "
        f"tokens from {tokens.info['n_documents']['train'] + tokens.info['n_documents']['val']} files")

    sampler = corpus.BatchSampler(tokens.train, settings.batch_size, settings.seq_len, settings.seed)
    val_batches = corpus.fixed_batches(tokens.val, settings.batch_size, settings.seq_len, args.eval_batches)
    if not val_batches:
        log(f"validation: the held-out split ({tokens.val.size} tokens) is shorter than one window; "
            "validating on training windows instead")
        val_batches = corpus.fixed_batches(tokens.train, settings.batch_size, settings.seq_len, args.eval_batches)
    schedule = optim.CosineSchedule(settings.lr, settings.steps, settings.warmup, settings.min_lr_ratio)
    adamw = optim.AdamWConfig(weight_decay=settings.weight_decay, grad_clip=settings.grad_clip)

    if resumed is not None:
        saved = resumed.state
        if saved.get("data_id") != data_id:
            raise TrainError(f"--resume: the checkpoint {resumed.path} was trained on other data (or another "
                             "tokenizer); pass the same --data, or start a new run with another --out")
        if saved.get("settings") != asdict(settings):
            before = saved.get("settings", {})
            changed = [f"{k} {before.get(k)} -> {v}" for k, v in asdict(settings).items() if before.get(k) != v]
            raise TrainError(f"--resume: the run's settings differ from the checkpoint's ({', '.join(changed)}); "
                             "resume with the same flags, or start a new run with another --out")
        if resumed.optimizer_state is None:
            raise TrainError(f"--resume: {resumed.path} holds no optimizer state (an exported model?); "
                             "training cannot continue exactly from it")
        params = {name: p.astype(settings.dtype, copy=False) for name, p in resumed.params.items()}
        opt_state = resumed.optimizer_state
        sampler.restore(saved["sampler"])
        start_step = int(saved["step"])
        log(f"resumed from {resumed.path} at step {start_step}")
    else:
        params = llama.init_params(config, seed=settings.seed, dtype=settings.dtype)
        opt_state = optim.init_state(params)
        start_step = 0
    log(f"model: {args.preset} ({config.n_params():,} parameters), {settings.steps} steps of "
        f"{settings.batch_size * settings.grad_accum} x {settings.seq_len} tokens, output in {out}")

    metrics_path = out / "metrics.jsonl"
    last_saved = ckpt.find_latest(out)

    def save(step):
        nonlocal last_saved
        state = {"step": step, "settings": asdict(settings), "sampler": sampler.state(), "data_id": data_id,
                 "tokenizer_fingerprint": tokenizer.fingerprint}
        last_saved = ckpt.save_checkpoint(out, step, config=config, params=params, optimizer_state=opt_state,
                                          state=state, tokenizer_model=tokenizer.model_bytes)

    progress = tqdm(total=settings.steps, initial=start_step, disable=args.no_progress, unit="step",
                    dynamic_ncols=True, file=sys.stderr)
    tokens_per_step = settings.batch_size * settings.seq_len * settings.grad_accum
    # overflow shows up as a non-finite loss or gradient norm, which stops the run with a clear
    # message below; NumPy's per-operation warnings would only bury that message
    with open(metrics_path, "a") as metrics, numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
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
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                progress.close()
                where = (f"the last good checkpoint is {last_saved} (step {_step_of(last_saved)})" if last_saved
                         else "no checkpoint had been written yet")
                raise TrainError(f"the loss became {loss_value} (gradient norm {grad_norm}) at step {step + 1}; "
                                 f"stopped without saving; {where}; try a lower --lr")
            stats = optim.step(params, grads, opt_state, lr, adamw, grad_norm=grad_norm)
            elapsed = time.perf_counter() - started
            done = step + 1
            record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": stats["grad_norm"],
                      "tokens_per_s": tokens_per_step / elapsed}
            if (args.eval_every and done % args.eval_every == 0) or done == settings.steps:
                record["val_loss"] = _evaluate(params, config, val_batches)
                progress.write(f"step {done}: validation loss {record['val_loss']:.4f}", file=sys.stderr)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            progress.update(1)
            if done % args.checkpoint_every == 0 or done == settings.steps:
                save(done)
    progress.close()
    _plot(metrics_path, out / "loss.png", log)
    log(f"checkpoint: {last_saved}")
    if args.sample_tokens > 0:
        from .generate import generate

        prompt = "def "
        log(f"sample ({args.sample_tokens} tokens, temperature 0.8):")
        text = generate(params, config, tokenizer, prompt, args.sample_tokens, temperature=0.8, seed=settings.seed)
        print(prompt + text, flush=True)
    return 0


def _step_of(path) -> str:
    name = Path(path).name
    return str(int(name.split("-")[-1])) if name.startswith("step-") else "?"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return train(args)
    except (TrainError, corpus.DataError, ckpt.CheckpointError, TokenizerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
