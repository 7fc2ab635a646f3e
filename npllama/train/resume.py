"""Where a run starts: fresh weights, or a checkpoint that `--resume` names, after checking that it
belongs to `--out`'s run and that the data and settings are the checkpoint's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import checkpoint as ckpt
from .. import model as llama
from .. import optim
from . import run_log, zero
from .config import ADDED_SAVED_SETTINGS, TrainConfig, TrainError, saved_settings
from .state import Run, RunState


def checkpoint_to_resume(config: TrainConfig, model_config, out: Path, xp):
    """The checkpoint --resume names (or None), after checking it belongs to --out's run."""
    out_had_run = out.is_dir() and ckpt.find_latest(out) is not None
    if config.resume is None:
        if out_had_run:
            raise TrainError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
        return None
    if config.resume == "" and not out_had_run:
        raise TrainError(f"--resume: {out} holds no checkpoint to resume; pass --resume CHECKPOINT_DIR")
    # checkpoints hold host arrays: one saved on either backend resumes on either
    resumed = ckpt.load_checkpoint(Path(config.resume) if config.resume else out, expected_config=model_config,
                                   xp=xp)
    if out_had_run and resumed.path.parent.resolve() != out.resolve():
        raise TrainError(f"--out {out} already holds another run; to continue {resumed.path} pass "
                         f"--out {resumed.path.parent}, or choose a new --out")
    return resumed


def with_fixed_warmup(config: TrainConfig, resumed) -> TrainConfig:
    """The warmup is fixed when a run starts (--warmup, or 10% of --steps) and saved with it, so a
    resumed run without --warmup keeps its run's warmup and a larger --steps only stretches the cosine."""
    if config.warmup is not None:
        return config
    saved = resumed.state.get("settings", {}).get("warmup") if resumed is not None else None
    return dataclasses.replace(config, warmup=saved if isinstance(saved, int) else config.effective_warmup)


def fresh_state(run: Run, sampler, log) -> RunState:
    if run.world.is_writer:
        run_log.set_aside(run.metrics_path, log)
    # drawn on the CPU on every backend, so both start from the same numbers
    params = llama.init_params(run.model_config, seed=run.config.seed, dtype=run.config.dtype, xp=run.xp)
    own = zero.own_rows(run, params)
    opt_state = optim.init_state(params if own is None else {n: p[own[n]] for n, p in params.items()})
    loss_scale = optim.LossScale(run.config.first_loss_scale) if run.config.precision == "fp16" else None
    return RunState(params, opt_state, sampler, step=0, own_rows=own, loss_scale=loss_scale)


def resumed_state(run: Run, resumed, sampler, log) -> RunState:
    """The state saved in `resumed`, after checking that the run's data and settings are the checkpoint's."""
    saved = resumed.state
    if saved.get("data_id") != run.data_id:
        raise TrainError(f"--resume: the checkpoint {resumed.path} was trained on other data (or another "
                         "tokenizer); pass the same --data, or start a new run with another --out")
    before = dict(saved.get("settings", {}))
    now = saved_settings(run.config, run.model_config.vocab_size)
    before = {**ADDED_SAVED_SETTINGS, **before}  # a checkpoint older than a setting ran with its default
    changed = [f"{k} {before.get(k)} -> {v}" for k, v in now.items() if k != "steps" and before.get(k) != v]
    if changed:
        raise TrainError(f"--resume: the run's settings differ from the checkpoint's ({', '.join(changed)}); "
                         "resume with the same flags, or start a new run with another --out")
    if before.get("steps") != run.config.steps:
        log(f"note: --steps changed from {before.get('steps')} to {run.config.steps}: the learning-rate schedule "
            "is stretched, so the run will not match one trained for this many steps from the start")
    if resumed.optimizer_state is None:
        raise TrainError(f"--resume: {resumed.path} holds no optimizer state (an exported model?); "
                         "training cannot continue exactly from it")
    start_step = int(saved["step"])
    if start_step >= run.config.steps:
        raise TrainError(f"--resume: the checkpoint is at step {start_step}, the run has --steps "
                         f"{run.config.steps}; pass a larger --steps to train further")
    sampler.restore(saved["sampler"])
    params = {name: p.astype(run.config.dtype, copy=False) for name, p in resumed.params.items()}
    if run.world.is_writer:
        run_log.repair(run.metrics_path, start_step, log)
    log(f"resumed from {resumed.path} at step {start_step}")
    opt_state, own = resumed.optimizer_state, zero.own_rows(run, params)
    if own is not None:  # the checkpoint holds every row's moments: keep this rank's
        opt_state = optim.AdamWState(m={n: m[own[n]].copy() for n, m in opt_state.m.items()},
                                     v={n: v[own[n]].copy() for n, v in opt_state.v.items()}, step=opt_state.step)
    loss_scale = _saved_loss_scale(run, resumed)
    if loss_scale is not None:
        log(f"loss scale {loss_scale.scale:g} from the checkpoint ({loss_scale.skipped} steps skipped so far)"
            + ("; --loss-scale sets only a new run's first scale" if run.config.loss_scale is not None else ""))
    return RunState(params, opt_state, sampler, start_step, last_checkpoint=(resumed.path, resumed.step),
                    own_rows=own, loss_scale=loss_scale)


def _saved_loss_scale(run: Run, resumed) -> optim.LossScale | None:
    """The loss scale and its counters as the checkpoint saved them (--precision fp16), checked."""
    if run.config.precision != "fp16":
        return None
    saved = resumed.state.get("loss_scale")
    try:
        if not isinstance(saved, dict) or set(saved) != {"scale", "good_steps", "skipped"}:
            raise ValueError("it needs scale, good_steps and skipped")
        return optim.LossScale(**saved)
    except (ValueError, TypeError) as error:
        raise TrainError(f"--resume: {resumed.path / 'state.json'} holds no usable loss scale ({error}); the "
                         "checkpoint is damaged: resume from another one") from None

