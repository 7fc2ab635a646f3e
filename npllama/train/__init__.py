"""Training: `python -m npllama.train`, or `train(TrainConfig(...))` from Python.

    from npllama.train import TrainConfig, train
    result = train(TrainConfig(preset="nano", steps=200, out="runs/nano"))

`config.py` holds every setting (one field per flag), `loop.py` the run from start to finish and
the training loop, `state.py` what a run holds, `resume.py` what a resumed run checks and
restores, `zero.py` ZeRO stage 1's rows, `run_log.py` the metrics log and plot, `stopping.py` the
signals, `distributed.py` the processes under mpirun; `__main__.py` is the command.
"""

from .config import TrainConfig, TrainError
from .loop import Diverged, TrainInterrupted, TrainResult, train

__all__ = ["Diverged", "TrainConfig", "TrainError", "TrainInterrupted", "TrainResult", "train"]
