"""AdamW (Loshchilov & Hutter, 2019) with global-norm clipping and a cosine schedule with warmup.

The paper's settings (Touvron et al. 2023, §2.3) are the defaults: beta1 = 0.9, beta2 = 0.95,
weight decay 0.1, gradient clipping at global norm 1.0, 2000 warmup steps, and a cosine decay to
10% of the peak learning rate. One step, for every parameter p with gradient g (t counts from 1):

    c = min(1, clip / (|G| + 1e-6))         |G| the L2 norm of all gradients together
    g = c * g
    m = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    p = p - lr * wd * p                      decoupled decay, only for matrices (not norm gains)
    p = p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

Parameters are updated in place (they are the optimiser's to change); gradients are not touched.
The moments are kept in float32 or wider whatever the parameters' dtype.

Mixed precision (Micikevicius et al., 2018) adds dynamic loss scaling, `LossScale`: the forward and
backward passes run on a float16 copy of the float32 weights (`float16_copy`), backward starts from
scale * dL instead of dL so that small gradients stay above float16's smallest numbers, and
`unscaled` divides the float16 gradients by the scale again in float32 (exactly: it is a power of
two) before clipping and AdamW, which see the float32 gradients as they would without any scale.
A step whose gradients are not all finite (an overflow) is skipped and the scale halved; after
GROWTH_INTERVAL finite steps in a row it doubles.
Derivation and references: reference/derivations.md#adamw
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from functools import partial

from .backend import array_namespace, compute_dtype, is_cupy_array
from .kernels import adamw as cuda_adamw


@dataclass(frozen=True)
class AdamWConfig:
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global norm; 0 or None disables clipping


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup from lr/warmup to the peak `lr`, then a half cosine down to min_lr_ratio * lr at `steps`.

    The fields are named as the training flags that set them (--lr, --steps, --warmup, --min-lr-ratio).
    """

    lr: float
    steps: int
    warmup: int = 2000
    min_lr_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        """Learning rate for step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        final_lr = self.min_lr_ratio * self.lr
        decay_steps = max(self.steps - self.warmup, 1)
        progress = min(max((step - self.warmup) / decay_steps, 0.0), 1.0)
        return final_lr + 0.5 * (self.lr - final_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass
class AdamWState:
    """First and second moments per parameter, and the number of steps taken.

    `scratch` is working memory for `step` (for each thread that updates, one buffer as large as the
    largest parameter, or as a block of UPDATE_BLOCK elements where the threads update by blocks,
    reused for every parameter so a step allocates nothing); it holds no state and is never saved.
    """

    m: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)
    step: int = 0
    scratch: dict = field(default_factory=dict, repr=False, compare=False)

    def scratch_like(self, array):
        """A scratch view with `array`'s shape and dtype, the calling thread's own."""
        key = (array_namespace(array).__name__, str(array.dtype), threading.get_ident())
        buffer = self.scratch.get(key)
        if buffer is None or buffer.size < array.size:
            largest = max(m.size for m in self.m.values())
            size = min(largest, UPDATE_BLOCK) if array.size <= UPDATE_BLOCK else largest  # fits every later one
            buffer = self.scratch[key] = array_namespace(array).empty(size, dtype=array.dtype)
        return buffer[: array.size].reshape(array.shape)


def decays(param) -> bool:
    """Weight decay applies to matrices (embeddings, linear weights), not to 1-D norm gains."""
    return param.ndim >= 2


def init_state(params: dict) -> AdamWState:
    state = AdamWState()
    for name, p in params.items():
        xp = array_namespace(p)
        state.m[name] = xp.zeros(p.shape, dtype=compute_dtype(xp, p.dtype))
        state.v[name] = xp.zeros(p.shape, dtype=compute_dtype(xp, p.dtype))
    return state


def global_norm(grads: dict, pool=None) -> float:
    """L2 norm of all gradients taken together.

    Each parameter's sum of squares is one dot product (BLAS, in the gradient's dtype, no
    temporary); the per-parameter sums are added in float64 on the device, in the order of `grads`,
    so there is one transfer to the host, not one per parameter. With `pool` (an executor) the dot
    products run on its threads; the sum, in the same order, is the same to the bit.
    """
    squares = (pool.map if pool is not None else map)(_sum_of_squares, grads.values())
    total = None
    for part in squares:
        total = part if total is None else total + part
    return math.sqrt(float(total)) if total is not None else 0.0


def _sum_of_squares(g):
    xp = array_namespace(g)
    flat = g.reshape(-1)
    return xp.asarray(xp.vdot(flat, flat), dtype=xp.float64)


def clip_coefficient(grad_norm: float, max_norm: float | None) -> float:
    """The factor min(1, max_norm / (norm + 1e-6)) that clipping multiplies every gradient by."""
    if not max_norm:
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))


def step(params: dict, grads: dict, state: AdamWState, lr: float, config: AdamWConfig = AdamWConfig(),
         grad_norm: float | None = None, pool=None) -> dict:
    """Update `params` in place by one AdamW step. Returns {"grad_norm", "clip"} for logging.

    `grad_norm` may be passed when the caller has already computed `global_norm(grads)` (to
    check it is finite before touching the parameters). With `pool` (an executor) the parameters
    are updated on its threads, each with a scratch buffer of its own; the update is elementwise,
    so the numbers are the same to the bit.
    """
    missing = set(params) ^ set(grads)
    if missing:
        raise ValueError(f"AdamW: parameters and gradients differ in {sorted(missing)[:3]}")
    grad_norm = global_norm(grads, pool) if grad_norm is None else grad_norm
    clip = clip_coefficient(grad_norm, config.grad_clip)
    state.step += 1
    update = partial(_update, params, grads, state, lr, config, clip)
    parts = [(name, block) for name in params for block in _blocks(params[name], pool)]
    for _ in (pool.map if pool is not None else map)(lambda part: update(*part), parts):
        pass
    return {"grad_norm": grad_norm, "clip": clip}


UPDATE_BLOCK = 1 << 20  # elements of one parameter one thread updates at a time, with a pool


def _blocks(p, pool) -> list:
    """The parts of p's elements updated as one: with a pool, blocks of UPDATE_BLOCK of a contiguous
    parameter (the threads share a large one, and each thread's scratch stays small); else all of it."""
    if pool is None or p.size <= UPDATE_BLOCK or not p.flags.c_contiguous:
        return [None]
    return [slice(start, min(start + UPDATE_BLOCK, p.size)) for start in range(0, p.size, UPDATE_BLOCK)]


@dataclass(frozen=True)
class AdamWScalars:
    """The numbers one parameter's update at step t multiplies and adds, as Python floats: the array
    code of `_update` and the CUDA kernel (npllama/kernels/adamw.cu) each round them to the arrays' dtype,
    so the two compute the same."""

    beta1: float
    beta2: float
    g_scale: float  # m gets (1 - beta1) c g
    g2_scale: float  # v gets (1 - beta2) (c g)^2
    decay: float  # 1 - lr wd for a decayed parameter, else 1
    inv_bias2: float  # 1 / (1 - beta2^t)
    eps: float
    step_size: float  # lr / (1 - beta1^t)


def update_scalars(config: AdamWConfig, lr: float, clip: float, step: int, decay: bool) -> AdamWScalars:
    """The scalars of step `step` (counting from 1) with clip factor `clip`, for a parameter that
    decays (a matrix) or not (a norm gain)."""
    beta1, beta2 = config.betas
    return AdamWScalars(beta1=beta1, beta2=beta2, g_scale=(1.0 - beta1) * clip, g2_scale=(1.0 - beta2) * clip * clip,
                        decay=1.0 - lr * config.weight_decay if decay else 1.0, inv_bias2=1.0 / (1.0 - beta2**step),
                        eps=config.eps, step_size=lr / (1.0 - beta1**step))


def _update(params: dict, grads: dict, state: AdamWState, lr: float, config: AdamWConfig, clip: float,
            name: str, block: slice | None = None) -> None:
    """One parameter's AdamW update (of its flat elements `block`, when given), at step state.step
    (already counted). The update is elementwise, so a block's numbers are the whole's. On CuPy it is
    one kernel (npllama/kernels/adamw.cu), which gives the same numbers in one pass."""
    p, m, v, g = params[name], state.m[name], state.v[name], grads[name]
    decay = bool(config.weight_decay and decays(p))
    if block is not None:  # views of the contiguous p, m and v: written in place
        p, m, v, g = (array.reshape(-1)[block] for array in (p, m, v, g))
    s = update_scalars(config, lr, clip, state.step, decay)
    if is_cupy_array(p) and cuda_adamw.supports(p, m, v, g):
        cuda_adamw.update(p, m, v, g, s)
        return
    xp = array_namespace(p)
    scratch = state.scratch_like(m)
    # m = beta1 m + (1 - beta1) c g
    m *= s.beta1
    xp.multiply(g, s.g_scale, out=scratch)
    m += scratch
    # v = beta2 v + (1 - beta2) (c g)^2
    v *= s.beta2
    xp.multiply(g, g, out=scratch)
    scratch *= s.g2_scale
    v += scratch
    # p = p - lr wd p   (decoupled decay, matrices only)
    if decay:
        p *= s.decay
    # p = p - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    xp.multiply(v, s.inv_bias2, out=scratch)
    xp.sqrt(scratch, out=scratch)
    scratch += s.eps
    xp.divide(m, scratch, out=scratch)
    scratch *= s.step_size
    p -= scratch if scratch.dtype == p.dtype else scratch.astype(p.dtype)


# --- Loss scaling, for mixed precision ------------------------------------------------------------

DEFAULT_LOSS_SCALE = 2.0**16  # the first scale, as PyTorch's GradScaler
GROWTH_INTERVAL = 2000  # finite steps in a row before the scale doubles (PyTorch's default too)
MIN_LOSS_SCALE = 1.0  # an overflow at this scale is a gradient beyond float16 itself: divergence


def is_power_of_two(value) -> bool:
    """True for a finite positive float 2^k: multiplying or dividing by it changes no bit of a
    mantissa, so scaling and unscaling are exact (short of overflow and of subnormals)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:  # an int beyond float's range (a JSON number of 400 digits, say) is no scale
        return math.isfinite(value) and value > 0 and math.frexp(value)[0] == 0.5
    except OverflowError:
        return False


def is_loss_scale(value) -> bool:
    """A power of two of at least MIN_LOSS_SCALE: what a loss scale may be."""
    return is_power_of_two(value) and value >= MIN_LOSS_SCALE


@dataclass(frozen=True)
class LossScale:
    """The loss scale of a mixed-precision run and its counters, saved with every checkpoint so
    that a resumed run scales as the uninterrupted one would have."""

    scale: float = DEFAULT_LOSS_SCALE
    good_steps: int = 0  # finite steps in a row since the scale last changed
    skipped: int = 0  # steps skipped in the whole run (their gradients overflowed)

    def __post_init__(self):
        if not is_loss_scale(self.scale):
            raise ValueError(f"the loss scale must be a power of two of at least {MIN_LOSS_SCALE:g}, got "
                             f"{self.scale!r:.40}")
        for name in ("good_steps", "skipped"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"the loss scale's {name} must be a whole number >= 0, got {value!r:.40}")
        if self.good_steps >= GROWTH_INTERVAL:
            raise ValueError(f"the loss scale's good_steps must be below {GROWTH_INTERVAL}, got {self.good_steps}")


def next_loss_scale(current: LossScale, finite: bool) -> LossScale | None:
    """The scale after a step whose gradients were all finite (`finite`), or not: halved after an
    overflow (the step is skipped), doubled after GROWTH_INTERVAL finite steps in a row. None when
    the gradients overflowed at MIN_LOSS_SCALE already: they exceed float16 unscaled (divergence)."""
    if not finite:
        if current.scale <= MIN_LOSS_SCALE:
            return None
        return LossScale(current.scale / 2, 0, current.skipped + 1)
    if current.good_steps + 1 == GROWTH_INTERVAL:
        return LossScale(current.scale * 2, 0, current.skipped)
    return LossScale(current.scale, current.good_steps + 1, current.skipped)


def float16_copy(params: dict) -> dict:
    """The float16 weights a mixed-precision step runs forward and backward on (each rounded to
    nearest; beyond 65504 they become inf, and the step overflows)."""
    return {name: p.astype("float16") for name, p in params.items()}


def unscaled(grad, scale: float, dtype="float32"):
    """grad / scale in `dtype` (float32: the master weights'); exact for a power-of-two scale,
    except where the result falls below float32's normal numbers. `grad` may be overwritten when it
    already has `dtype` (the caller's own buffer)."""
    master = grad.astype(dtype, copy=False)
    master *= 1.0 / scale
    return master
