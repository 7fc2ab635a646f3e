"""ZeRO stage 1 (`--zero 1` under mpirun): each rank keeps AdamW's moments of, and updates, its own
contiguous rows of every parameter, then the ranks all-gather the rows. AdamW is elementwise, so the
numbers are those of one rank updating everything; a checkpoint holds every row's moments."""

from __future__ import annotations

from .. import optim
from . import distributed
from .state import Run, RunState


def own_rows(run: Run, params) -> dict | None:
    """This rank's rows of each parameter under --zero 1 with several processes; None when one rank
    updates everything."""
    return distributed.own_rows(params, run.world) if run.config.zero and run.world.size > 1 else None


def adamw_step(run: Run, state: RunState, grads, lr, adamw, grad_norm, pool=None) -> dict:
    """One AdamW step of every parameter (on `pool`'s threads, when given); under --zero 1 each rank
    steps its own rows (the update is elementwise, so the numbers are the same), then the ranks send
    each other theirs."""
    if state.own_rows is None:
        return optim.step(state.params, grads, state.opt_state, lr, adamw, grad_norm=grad_norm, pool=pool)
    own = state.own_rows
    stats = optim.step({name: p[own[name]] for name, p in state.params.items()},
                       {name: g[own[name]] for name, g in grads.items()}, state.opt_state, lr, adamw,
                       grad_norm=grad_norm)
    distributed.allgather_rows(state.params, run.world)
    return stats


def whole_optimizer_state(run: Run, state: RunState):
    """AdamW's state of every row, on rank 0 (None elsewhere under --zero 1): what a checkpoint holds."""
    if state.own_rows is None:
        return state.opt_state
    shapes = {name: p.shape for name, p in state.params.items()}
    m = distributed.gather_rows_to_writer(state.opt_state.m, shapes, run.world)
    v = distributed.gather_rows_to_writer(state.opt_state.v, shapes, run.world)
    if not run.world.is_writer:
        return None
    assert m is not None and v is not None  # rank 0 gathers the whole arrays
    return optim.AdamWState(m=m, v=v, step=state.opt_state.step)

