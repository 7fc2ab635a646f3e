"""What a training run holds: `Run`, what stays fixed while it trains, and `RunState`, what each step
changes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy

from .. import data as corpus
from .. import model as llama
from .. import optim
from ..tokenizer import Tokenizer
from . import distributed, stopping
from .config import TrainConfig


@dataclass
class Run:
    """What stays fixed while a run trains: its settings, model, data and where it writes."""

    config: TrainConfig
    model_config: llama.LlamaConfig
    out: Path
    tokenizer: Tokenizer
    data_id: str
    val_batches: list
    stops: stopping.StopRequests
    xp: Any = numpy  # the array module the weights live in (numpy, or cupy for --backend cupy)
    world: distributed.World = distributed.World()  # the processes of the run (mpirun -n N); rank 0 writes
    pool: Any = None  # worker threads (parallel.workers) while the steps run; None: the whole batch at once

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


@dataclass
class RunState:
    """What each step changes: the weights, AdamW's moments, the sampler's position, the step count,
    the loss scale (--precision fp16), and the newest checkpoint as (path, step)."""

    params: dict
    opt_state: optim.AdamWState
    sampler: corpus.BatchSampler
    step: int
    last_checkpoint: tuple | None = None
    val_loss: float = math.nan
    own_rows: dict | None = None  # --zero 1 under mpirun: the rows of each parameter this rank updates
    loss_scale: optim.LossScale | None = None  # --precision fp16 only

    def forward_weights(self) -> dict:
        """The weights forward and backward run on: the float16 copy of the master weights under
        --precision fp16 (made anew after each update), else the weights themselves."""
        return self.params if self.loss_scale is None else optim.float16_copy(self.params)

