"""Rotary position embedding (Su et al., 2021) in Meta's convention: interleaved pairs.

Each head vector x in R^D is read as D/2 pairs (x[2i], x[2i+1]); the pair at position p is
rotated by the angle p * f_i with f_i = theta^(-2i/D):

Forward:   y[2i]   = x[2i] cos(p f_i) - x[2i+1] sin(p f_i)
           y[2i+1] = x[2i] sin(p f_i) + x[2i+1] cos(p f_i)
Backward:  a rotation is orthogonal, so dx is dy rotated by the opposite angle:
           dx[2i]   =  dy[2i] cos + dy[2i+1] sin
           dx[2i+1] = -dy[2i] sin + dy[2i+1] cos
Shapes:    x, y (B, T, H, D) with D even; cos, sin (T, D/2), from `frequencies` (a float16 model
           uses float32 tables: the rotation runs in float32 and is rounded to float16 once).
Scaling (`RopeScaling`, for checkpoints trained to longer contexts) changes only the frequencies
f_i, so forward and backward stay as above: `linear` divides every f_i by `factor` (positions
interpolated); `llama3` (Llama 3.1) keeps the high frequencies, divides the low ones by `factor`
and blends the band between them.
Hugging Face stores wq/wk with rows permuted for its rotate-half convention; npllama converts
checkpoints (convert.py) instead of supporting both here.
On CuPy arrays forward and backward run as one kernel each (npllama/kernels/rope.cu: these
operations in this order, each rounded once, x read through its strides), and this array code is
the reference it is tested against.
Derivation: reference/derivations.md#rope
"""

import math
from dataclasses import dataclass

from ..backend import array_namespace, compute_dtype, is_cupy_array
from ..kernels import rope as cuda_rope

ROPE_TYPES = ("linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How a checkpoint scales RoPE's frequencies: `linear` (factor) or `llama3` (factor, the low
    and high frequency factors and the context the model was first trained to)."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None  # llama3 only, as the next two
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RoPE scaling {self.rope_type!r} is not supported; npllama has {', '.join(ROPE_TYPES)}")
        if not _positive_finite(self.factor):
            raise ValueError(f"RoPE scaling factor must be a positive finite number, got {self.factor!r:.40}")
        if self.rope_type == "llama3":
            low, high, context = self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings
            if low is None or high is None or context is None or type(context) is not int or not (
                    _positive_finite(low) and _positive_finite(high) and _positive_finite(context) and low < high):
                raise ValueError("llama3 RoPE scaling needs 0 < low_freq_factor < high_freq_factor and a positive "
                                 f"original_max_position_embeddings, got {low}, {high}, {context}")


def _positive_finite(value) -> bool:
    """A real number (a JSON `true` is not one), finite and above zero."""
    return type(value) in (int, float) and math.isfinite(value) and value > 0


def inverse_frequencies(head_dim, theta, scaling: RopeScaling | None, xp):
    """f_i = theta^(-2i/D) for i < D/2, in float64 (an `xp` array), scaled as `scaling` says."""
    inv_freq = float(theta) ** (-xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":  # position p is rotated as position p / factor was
        return inv_freq / scaling.factor
    # llama3: by wavelength 2 pi / f against the original context L: short waves (< L / high) are
    # kept, long ones (> L / low) divided by factor, and in between blended by how many waves fit in L
    low, high, context = scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_max_position_embeddings
    assert low is not None and high is not None and context is not None  # RopeScaling checked them
    waves_in_context = context * inv_freq / (2 * math.pi)
    blend = (waves_in_context - low) / (high - low)
    blend = xp.clip(blend, 0.0, 1.0)
    return (1 - blend) * inv_freq / scaling.factor + blend * inv_freq


@dataclass(frozen=True)
class RopeCache:
    """What backward needs: the angles' cos and sin tables (T, D/2)."""

    cos: object
    sin: object


def frequencies(head_dim, positions, theta=10000.0, dtype=None, xp=None, scaling: RopeScaling | None = None):
    """Return (cos, sin), each (T, D/2), for integer `positions` (T,), with the frequencies of
    `inverse_frequencies` (scaled when `scaling` is given).

    The angles are computed in float64 and then cast to `dtype` (default float64), so a float32
    model and a float64 gradient check see the same angles up to the final rounding.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    xp = xp if xp is not None else array_namespace(positions)
    dtype = dtype if dtype is not None else xp.float64
    inv_freq = inverse_frequencies(head_dim, theta, scaling, xp)
    angles = xp.asarray(positions, dtype=xp.float64)[:, None] * inv_freq[None, :]
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def _rotate(x, cos, sin):
    """Rotate each interleaved pair of x (B, T, H, D) by the angles whose cos/sin are (T, D/2), in
    float32 or wider; the result has x's dtype, rounded to it once."""
    xp = array_namespace(x)
    ct = compute_dtype(xp, x.dtype)
    even, odd = x[..., 0::2].astype(ct, copy=False), x[..., 1::2].astype(ct, copy=False)
    cos = cos[:, None, :].astype(ct, copy=False)  # broadcast over heads: (T, 1, D/2)
    sin = sin[:, None, :].astype(ct, copy=False)
    y = xp.empty_like(x)
    y[..., 0::2] = even * cos - odd * sin
    y[..., 1::2] = even * sin + odd * cos
    return y


def forward(x, cos, sin):
    """Return (y, cache): x rotated pairwise by the angles of its positions."""
    if is_cupy_array(x) and cuda_rope.supports(x, cos, sin):
        return cuda_rope.rotate(x, cos, sin, inverse=False), RopeCache(cos, sin)
    return _rotate(x, cos, sin), RopeCache(cos, sin)


def backward(dy, cache):
    """Return dx: dy rotated back (the transpose of a rotation is its inverse)."""
    # forward was: y = R(angle) x, with R = [[cos, -sin], [sin, cos]] on each pair
    # so dx = R(angle)^T dy = R(-angle) dy: same cos, negated sin
    if is_cupy_array(dy) and cuda_rope.supports(dy, cache.cos, cache.sin):
        return cuda_rope.rotate(dy, cache.cos, cache.sin, inverse=True)
    return _rotate(dy, cache.cos, -cache.sin)
