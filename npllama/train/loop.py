"""Train a Llama-1 model from raw text: `python -m npllama.train`, or `train(TrainConfig(...))`.

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
uninterrupted run would have given (on the CPU, same machine). The settings are
npllama/train/config.py's `TrainConfig`, which also makes the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy

from .. import checkpoint as ckpt
from .. import data as corpus
from .. import files, optim, parallel
from .. import model as llama
from ..backend import float32_products, get_backend
from ..files import default_cache_dir
from ..params import FINAL_NORM
from ..sampling import generate
from ..tokenizer import Tokenizer, recipe_key, train_tokenizer
from . import distributed, resume, run_log, stopping, zero
from .config import TrainConfig, TrainError, command_line, saved_settings
from .state import Run, RunState


class Diverged(TrainError):
    """The loss, the gradient norm, the weights or the validation loss stopped being finite."""


class TrainInterrupted(Exception):
    """SIGINT, SIGTERM or SIGUSR1 stopped the run; the message says what was saved and how to resume.

    `exit_status` is 128 + the signal's number (130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1 on
    Linux), as a shell reports it.
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_status = 128 + signal_number


@dataclass(frozen=True)
class TrainResult:
    """What a finished run leaves: its folder, its newest checkpoint and final validation loss, the sample."""

    out: Path
    checkpoint: Path | None  # None on every rank but rank 0
    step: int
    val_loss: float
    sample: str | None


def _check_writable(folder: Path, flag: str):
    kind = files.kind_of(folder)
    if kind not in (None, "folder"):
        raise TrainError(f"{flag} {folder}: it is a {kind}, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise TrainError(f"{flag} {folder}: cannot write there ({error.strerror}); choose another folder") from None


def _check_memory(config, dtype: str, precision: str):
    """Refuse a model whose weights, gradients and AdamW moments alone exceed this machine's memory."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    needed = config.n_params() * numpy.dtype(dtype).itemsize * 4  # params, grads, m, v
    if precision == "fp16":  # the float16 weights and their gradients besides
        needed += config.n_params() * 2 * 2
    if needed > physical:
        raise TrainError(f"the model has {config.n_params():,} parameters: weights, gradients and AdamW state need "
                         f"{needed / 2**30:.0f} GiB, more than this machine's {physical / 2**30:.0f} GiB; "
                         "choose a smaller --preset")


def _load_tokenizer(config: TrainConfig, vocab_size: int, documents, cache_dir: Path, resumed, log) -> Tokenizer:
    """--tokenizer, else the resumed checkpoint's, else one trained on the data (cached by recipe)."""
    if config.tokenizer:
        tokenizer = Tokenizer.load(config.tokenizer, what="--tokenizer")
    elif resumed is not None and resumed.tokenizer_model is not None:
        tokenizer = Tokenizer.from_bytes(resumed.tokenizer_model)
    else:
        key = recipe_key(vocab_size, corpus.sources_signature(documents))
        path = cache_dir / "tokenizers" / f"bpe-{vocab_size}-{key}.model"
        if path.is_file():
            tokenizer = Tokenizer.load(path)
            log(f"tokenizer: {path} (cached, {tokenizer.vocab_size} pieces)")
        else:
            log(f"training a {vocab_size}-piece BPE tokenizer on {len(documents)} files ...")
            started = time.time()
            # skipped files are reported once, by the tokenisation below
            texts = (text for _, text in corpus.read_documents(documents, warn=lambda message: None))
            tokenizer = train_tokenizer(texts, vocab_size)
            tokenizer.save(path)
            log(f"tokenizer: {path} ({time.time() - started:.0f} s)")
    if tokenizer.vocab_size != vocab_size:
        raise TrainError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                         f"{vocab_size}; pass --vocab-size {tokenizer.vocab_size} or a matching --tokenizer")
    return tokenizer


def _evaluate(params, config, batches, pool=None) -> float:
    """The mean validation loss over `batches` (one batch per worker thread of `pool`, if given)."""
    losses = list((pool.map if pool is not None else map)(lambda batch: llama.loss(params, config, *batch), batches))
    return float(numpy.mean(losses)) if losses else float("nan")


def train(config: TrainConfig, log=None) -> TrainResult:
    """Run the training `config` describes; `log` gets the progress notes (default: stderr).

    Bad settings, data or checkpoints raise a TrainError (or another NpllamaError) in one line,
    before anything is written where possible. A run that created --out and ends without a
    checkpoint leaves no folder, unless it diverged (its log shows how).
    """
    world = distributed.init_world()
    log = (log or (lambda message: print(message, file=sys.stderr, flush=True))) if world.is_writer else _quiet
    xp = get_backend(config.backend)  # a backend that is unknown or cannot run here stops here, in one line
    world = distributed.use_gpus(world, xp)  # under mpirun with CuPy: this rank's GPU and the ranks' NCCL
    distributed.batch_slice(config.batch_size, world)  # a batch the ranks cannot share stops here
    model_config = _model_config(config)
    _check_memory(model_config, config.dtype, config.precision)
    out = Path(distributed.broadcast(str(_output_folder(config)), world))  # rank 0 names a default --out
    created_out = world.is_writer and not out.exists()
    if world.is_writer:
        _check_writable(out, "--out")
    keep_log = False
    # the signal handlers stay in place until the run has said how it ended: a signal that comes
    # while a stopped run tidies up and names its checkpoint is ignored, not a KeyboardInterrupt
    with stopping.stop_requests() as stops:
        try:
            with _only_writer_of(out) if world.is_writer else contextlib.nullcontext(), \
                    float32_products(xp, config.tf32):
                resumed = resume.checkpoint_to_resume(config, model_config, out, xp)
                return _train_into(config, model_config, out, resumed, stops, log, xp, world)
        except stopping.StopNow as stop:
            stops.stopped = True
            raise _interrupted(config, out, stop.signal_number) from None
        except Diverged:
            keep_log = True
            raise
        finally:
            if created_out:
                _remove_unless_of_value(out, keep_log)


def _quiet(message: str) -> None:
    """The log of every rank but 0: one voice for the run."""


def _interrupted(config: TrainConfig, out: Path, signal_number: int) -> TrainInterrupted:
    """What a signal left: the newest checkpoint and the command that resumes from it."""
    name = signal.Signals(signal_number).name
    latest = ckpt.find_latest(out) if out.is_dir() else None
    if latest is None:
        return TrainInterrupted(f"stopped by {name} before the first checkpoint; nothing to resume", signal_number)
    world = distributed.current()
    launcher = ["mpirun", "-n", str(world.size)] if world.size > 1 else []  # any other number resumes it too
    again = shlex.join([*launcher, "python", "-m", "npllama.train",
                        *command_line(dataclasses.replace(config, out=str(out), resume=""))])
    return TrainInterrupted(f"stopped by {name}; the newest checkpoint is {latest}; resume with: {again}",
                            signal_number)


@contextlib.contextmanager
def _only_writer_of(out: Path):
    """Hold --out's lock for the whole run: a second training into it, resume included, is refused."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(files.exclusive_lock(out))
        except files.FolderInUse as busy:
            raise TrainError(f"--out {out} is in use by another training (process {busy.holder or 'unknown'}); "
                             "wait for it to end, or choose another --out") from None
        except OSError as error:
            raise TrainError(f"--out {out}: cannot create its lock file ({error.strerror}); free some space or "
                             "choose another --out") from None
        yield


def _remove_unless_of_value(out: Path, keep_log: bool):
    """Remove the folder this run created if it holds nothing to resume (no checkpoint) and nothing
    but what the run itself wrote there (its lock, its log unless `keep_log`, its plot)."""
    if not out.is_dir() or any(out.glob("step-*")):
        return
    written_here = {files.LOCK_FILE, "loss.png"} | (set() if keep_log else {"metrics.jsonl"})
    entries = list(out.iterdir())
    if all(entry.name in written_here and entry.is_file() for entry in entries):
        for entry in entries:
            entry.unlink()
        out.rmdir()


def _model_config(config: TrainConfig) -> llama.LlamaConfig:
    model_config = llama.get_preset(config.preset)
    changes = {"vocab_size": config.vocab_size, "n_kv_heads": config.n_kv_heads,
               "tie_embeddings": config.tie_embeddings or None}
    try:
        model_config = llama.LlamaConfig(**{**model_config.to_dict(),
                                            **{name: value for name, value in changes.items() if value is not None}})
    except ValueError:  # the only field that can disagree with the preset: --n-kv-heads
        raise TrainError(f"--n-kv-heads {config.n_kv_heads}: the {config.preset} model has {model_config.n_heads} "
                         "query heads; pass a number of key/value heads that divides it") from None
    if config.seq_len > model_config.max_seq_len:
        raise TrainError(f"--seq-len {config.seq_len} exceeds the {config.preset} model's maximum context of "
                         f"{model_config.max_seq_len}; pass --seq-len {model_config.max_seq_len} or less")
    return model_config


def _output_folder(config: TrainConfig) -> Path:
    if config.resume == "" and config.out is None:
        raise TrainError("--resume without a checkpoint continues the run in --out; pass --out RUN_DIR")
    return Path(config.out) if config.out else Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _train_into(config: TrainConfig, model_config, out: Path, resumed, stops, log, xp, world) -> TrainResult:
    from tqdm import tqdm

    config = resume.with_fixed_warmup(config, resumed)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    _check_writable(cache_dir, "--cache-dir")
    with distributed.writer_first(world):  # rank 0 trains the tokenizer and fills the cache; the rest read it
        documents = corpus.find_documents(config.data)
        tokenizer = _load_tokenizer(config, model_config.vocab_size, documents, cache_dir, resumed, log)
        tokens = corpus.prepare_tokens(documents, tokenizer, cache_dir / "tokens",
                                       progress=None if config.no_progress or not world.is_writer else tqdm, warn=log)
    distributed.check_same(tokens.info["content_sha256"], world, "the token streams (their sha256)",
                           "every rank must read the same --data with the same tokenizer (ranks on other "
                           "machines: copy both there, or use a file system the machines share)")
    log(f"data: {tokens.info['n_tokens']['train']:,} training and {tokens.info['n_tokens']['val']:,} validation "
        f"tokens from {len(documents)} files "
        f"(held out: {'whole files' if tokens.info['split'] == 'documents' else 'the last 5%'})")
    run = Run(config, model_config, out, tokenizer, tokens.info["content_sha256"],
              _validation_batches(config, tokens, log), stops, xp, world)
    sampler = corpus.BatchSampler(tokens.train, config.batch_size, config.seq_len, config.seed)
    if resumed is not None:
        state = resume.resumed_state(run, resumed, sampler, log)
    else:
        state = resume.fresh_state(run, sampler, log)
    threads = _worker_threads(config, world)
    log(f"model: {config.preset} ({model_config.n_params():,} parameters), {config.steps} steps of "
        f"{config.batch_size * config.grad_accum} x {config.seq_len} tokens, output in {out}"
        + _ranks(config, world, state) + (f"; {threads} worker thread{'s' if threads > 1 else ''}" if threads else "")
        + ("; float32 products in TF32" if config.tf32 else "")
        + ("; mixed precision: float16 forward and backward, float32 master weights" if state.loss_scale else ""))

    with parallel.workers(threads) if threads else contextlib.nullcontext() as run.pool:
        _training_loop(run, state)
    run.pool = None
    if stops.signal_number is not None and state.step < config.steps:
        raise stopping.StopNow(stops.signal_number)  # the loop stopped early and saved a checkpoint
    if not world.is_writer:
        return TrainResult(out, None, state.step, state.val_loss, None)

    run_log.plot(run.metrics_path, out / "loss.png", log)
    assert state.last_checkpoint is not None  # rank 0 saves at the last step, and when a signal stops it
    log(f"checkpoint: {state.last_checkpoint[0]}")
    sample = None
    if config.sample_tokens > 0 and stops.signal_number is None:  # a signal in the last step: no sample
        prompt = config.sample_prompt if config.sample_prompt is not None else ("def " if config.data is None else "")
        log(f"sample ({config.sample_tokens} tokens, temperature 0.8):")
        sample = prompt + generate(state.params, model_config, tokenizer, prompt, config.sample_tokens,
                                   temperature=0.8, seed=config.seed)
    return TrainResult(out, state.last_checkpoint[0], state.step, state.val_loss, sample)


def _worker_threads(config: TrainConfig, world) -> int | None:
    """How many threads share each step (--threads, default every core this process may use); None
    where the batch runs whole: with --threads 0, on a GPU, and in each process of a run under
    mpirun (the processes share the cores)."""
    if config.backend != "numpy" or world.size > 1 or config.threads == 0:
        return None
    return config.threads or parallel.available_cores()


def _ranks(config: TrainConfig, world, state) -> str:
    """How the work is shared, under mpirun: '; 2 processes, 8 rows of each batch apiece, ...'."""
    if world.comm is None:
        return ""
    processes = f"{world.size} process{'es' if world.size > 1 else ''}"
    return (f"; {processes}, {config.batch_size // world.size} rows of each batch apiece, gradients averaged by "
            f"{'NCCL' if world.nccl is not None else 'MPI'}"
            + (", AdamW's moments sharded (ZeRO stage 1)" if state.own_rows is not None else ""))


def _validation_batches(config: TrainConfig, tokens, log) -> list:
    batches = corpus.fixed_batches(tokens.val, config.batch_size, config.seq_len, config.eval_batches)
    if not batches:
        log(f"validation: the held-out split ({tokens.val.size} tokens) is shorter than one window; "
            "validating on training windows instead")
        batches = corpus.fixed_batches(tokens.train, config.batch_size, config.seq_len, config.eval_batches)
    return batches


def _training_loop(run: Run, state: RunState):
    """From state.step to --steps: learning rate, micro-steps, checks, AdamW step, log, evaluate, checkpoint.

    A first SIGINT, SIGTERM or SIGUSR1 ends the loop after the step it arrives in, with a
    checkpoint. Under mpirun every rank runs the steps; rank 0 alone evaluates, logs and saves, and
    the ranks agree after each step whether any of them was asked to stop.
    """
    from tqdm import tqdm

    config = run.config
    schedule = optim.CosineSchedule(config.lr, config.steps, config.effective_warmup, config.min_lr_ratio)
    adamw = optim.AdamWConfig(weight_decay=config.weight_decay, grad_clip=config.grad_clip)
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum
    writer = run.world.is_writer
    progress = tqdm(total=config.steps, initial=state.step, disable=config.no_progress or not writer, unit="step",
                    dynamic_ncols=True, file=sys.stderr)
    # overflow shows up as a non-finite loss, gradient norm or weight, which stops the run with a
    # clear message below; NumPy's per-operation warnings would only bury that message
    with progress, run_log.open_log(run.metrics_path) if writer else contextlib.nullcontext() as metrics, \
            numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if state.step == 0 and writer:
            _record_step(run, state, {"step": 0}, True, metrics, progress)
        run.stops.deferring = True
        for step in range(state.step, config.steps):
            started = time.perf_counter()
            lr = schedule(step)
            record = _take_step(run, state, step + 1, lr, adamw)
            state.step = step + 1
            record["tokens_per_s"] = tokens_per_step / (time.perf_counter() - started)
            # a signal any rank has had stops them all after this step, under one name; the ranks
            # act on what they agreed here, never on a signal that lands after it (that one counts
            # at the next step), or one rank would stop while the others wait for it
            agreed = distributed.largest(run.stops.signal_number or 0, run.world)
            if agreed:
                run.stops.stop_after_step(agreed)
            checkpoint_now = _checkpoint_due(config, state.step) or bool(agreed)
            if not writer:
                if checkpoint_now:
                    zero.whole_optimizer_state(run, state)  # this rank's part of what rank 0 saves
                if agreed:
                    break
                continue
            _record_step(run, state, record, checkpoint_now or _evaluation_due(config, state.step), metrics, progress)
            if checkpoint_now:
                _save_checkpoint(run, state)
            if agreed:
                break
        run.stops.deferring = False


def _take_step(run: Run, state: RunState, step: int, lr: float, adamw: optim.AdamWConfig) -> dict:
    """Step `step` (counting from 1): the batch's loss and gradients, then AdamW's update, or Diverged
    when they are not finite; under --precision fp16 a step whose gradients overflowed is skipped
    instead, and the loss scale follows. Returns the step's log row, but its timing."""
    loss_scale = state.loss_scale
    loss, grads = _accumulated_loss_and_grads(run, state)
    grad_norm = optim.global_norm(grads, run.pool)
    if not math.isfinite(loss):
        raise _diverged(state, step, f"the loss became {loss}")
    if math.isfinite(grad_norm):
        zero.adamw_step(run, state, grads, lr, adamw, grad_norm, run.pool)
    elif loss_scale is None:
        raise _diverged(state, step, f"the gradient norm became {grad_norm} (loss {loss:.4f})")
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
    if loss_scale is not None:  # mixed precision: an overflow skips the step, which the log says
        state.loss_scale = _next_loss_scale(state, step, math.isfinite(grad_norm))
        record.update(loss_scale=loss_scale.scale, skipped=not math.isfinite(grad_norm))
        if record["skipped"]:
            record["grad_norm"] = None  # inf or nan, which JSON cannot hold
    return record


def _next_loss_scale(state: RunState, step: int, finite: bool) -> optim.LossScale:
    """The loss scale after this step (its gradients finite or not), or Diverged when they overflowed
    float16 with no scale left to take back."""
    assert state.loss_scale is not None
    after = optim.next_loss_scale(state.loss_scale, finite)
    if after is None:
        raise _diverged(state, step, f"the float16 gradients overflowed at loss scale {optim.MIN_LOSS_SCALE:g} "
                                     "(they exceed 65504 unscaled)")
    return after


def _record_step(run: Run, state: RunState, record: dict, evaluate: bool, metrics, progress):
    """Rank 0's account of a step: the validation loss when `evaluate`, the log row, the progress bar.
    Step 0 is the run's first evaluation, before any training."""
    if evaluate:  # the model as the steps run it: in float16 under --precision fp16
        state.val_loss = record["val_loss"] = _evaluate(state.forward_weights(), run.model_config, run.val_batches,
                                                        run.pool)
        first = f" (ln V = {math.log(run.model_config.vocab_size):.4f})" if state.step == 0 else ""
        progress.write(f"step {state.step}: validation loss {state.val_loss:.4f}{first}", file=sys.stderr)
    run_log.write_row(metrics, record)
    if state.step > 0:
        skipped = {} if state.loss_scale is None else {"skipped": state.loss_scale.skipped}
        progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", **skipped)
        progress.update(1)


def _accumulated_loss_and_grads(run: Run, state: RunState):
    """The mean loss and gradient over --grad-accum micro-batches (equal to one batch that many times
    larger), averaged over the ranks under mpirun.

    The last micro-batch's backward hands each finished gradient to `finish`, which adds the
    earlier micro-batches' sum and, with several ranks, sends it on at once (GradientAverage): the
    later layers' gradients travel while backward computes the earlier ones. The micro-batches'
    losses are added where they are (in float64) and read once, so a step on the GPU waits for it
    only here and for the gradient norm."""
    accum = run.config.grad_accum
    loss_sum, sums = 0.0, None
    average = distributed.GradientAverage(state.params, run.world) if distributed.averages(run.world) else None
    weights = state.forward_weights()
    # mixed precision: backward runs on the scaled loss in float16, and each gradient comes back to
    # float32 unscaled as soon as backward has finished it, before any sum
    scale = state.loss_scale.scale if state.loss_scale is not None else None
    grad_dtype = None if scale is None else state.params[FINAL_NORM].dtype

    def to_master(name, grad):
        return grad if scale is None else optim.unscaled(grad, scale, grad_dtype)

    def finish(name, grad):
        grad = to_master(name, grad)
        if sums is not None:
            grad = sums.pop(name) + grad
            grad /= accum
        return grad if average is None else average.add(name, grad)

    rows = distributed.batch_slice(run.config.batch_size, run.world)  # all of them in one process
    for micro_step in range(accum):
        inputs, targets = state.sampler.next_batch()  # the same global batch on every rank
        last = micro_step == accum - 1
        if run.pool is not None:  # each row on a worker thread, the gradients added in row order
            micro_loss, grads = parallel.sliced_loss_and_grads(weights, run.model_config, inputs[rows],
                                                               targets[rows], run.pool, loss_scale=scale or 1.0,
                                                               grad_dtype=grad_dtype)
            grads = {name: (finish if last else to_master)(name, grad) for name, grad in grads.items()}
        else:
            micro_loss, grads = llama.loss_and_grads_on_device(weights, run.model_config, inputs[rows],
                                                               targets[rows], on_grad=finish if last else to_master,
                                                               loss_scale=scale or 1.0)
        loss_sum = loss_sum + micro_loss.astype("float64")
        if last:
            break
        if sums is None:
            sums = grads
        else:
            for name, grad in grads.items():
                sums[name] += grad
    # each rank's loss and gradients are means over its equal share of the rows, so their means
    # over the ranks are the global batch's
    if average is not None:
        grads = average.wait()
    return distributed.mean(float(loss_sum) / accum, run.world), grads


def _evaluation_due(config: TrainConfig, step: int) -> bool:
    return bool(config.eval_every) and step % config.eval_every == 0


def _checkpoint_due(config: TrainConfig, step: int) -> bool:
    """Every --checkpoint-every steps, and at the last step."""
    return step % config.checkpoint_every == 0 or step == config.steps


def _save_checkpoint(run: Run, state: RunState):
    """Checkpoint weights that are finite and give a finite validation loss, or stop the run."""
    if not math.isfinite(optim.global_norm(state.params)):
        raise _diverged(state, state.step, "the weights' norm overflowed (they diverged)")
    if not math.isfinite(state.val_loss):
        raise _diverged(state, state.step, f"the validation loss became {state.val_loss}")
    saved = {"step": state.step, "settings": saved_settings(run.config, run.model_config.vocab_size),
             "sampler": state.sampler.state(), "data_id": run.data_id,
             "tokenizer_fingerprint": run.tokenizer.fingerprint}
    if state.loss_scale is not None:
        saved["loss_scale"] = dataclasses.asdict(state.loss_scale)
    path = ckpt.save_checkpoint(run.out, state.step, config=run.model_config, params=state.params,
                                optimizer_state=zero.whole_optimizer_state(run, state), state=saved,
                                tokenizer_model=run.tokenizer.model_bytes,
                                keep_last=run.config.keep_checkpoints or None)
    state.last_checkpoint = (path, state.step)


def _diverged(state: RunState, step: int, what: str) -> Diverged:
    where = (f"the last good checkpoint is {state.last_checkpoint[0]} (step {state.last_checkpoint[1]})"
             if state.last_checkpoint else "no checkpoint had been written yet")
    return Diverged(f"{what} at step {step}; stopped without saving; {where}; "
                    "start a new run (another --out) with a lower --lr")
