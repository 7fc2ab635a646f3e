"""Rotary position embedding (Su et al., 2021) in Meta's convention: interleaved pairs.

Each head vector x in R^D is read as D/2 pairs (x[2i], x[2i+1]); the pair at position p is
rotated by the angle p * f_i with f_i = theta^(-2i/D):

Forward:   y[2i]   = x[2i] cos(p f_i) - x[2i+1] sin(p f_i)
           y[2i+1] = x[2i] sin(p f_i) + x[2i+1] cos(p f_i)
Backward:  a rotation is orthogonal, so dx is dy rotated by the opposite angle:
           dx[2i]   =  dy[2i] cos + dy[2i+1] sin
           dx[2i+1] = -dy[2i] sin + dy[2i+1] cos
Shapes:    x, y (B, T, H, D) with D even; cos, sin (T, D/2), from `frequencies`.
Hugging Face stores wq/wk with rows permuted for its rotate-half convention; npllama converts
checkpoints (convert.py) instead of supporting both here.
Derivation: reference/derivations.md#rope
"""

from dataclasses import dataclass

from ..backend import array_namespace


@dataclass(frozen=True)
class RopeCache:
    """What backward needs: the angles' cos and sin tables (T, D/2)."""

    cos: object
    sin: object


def frequencies(head_dim, positions, theta=10000.0, dtype=None, xp=None):
    """Return (cos, sin), each (T, D/2), for integer `positions` (T,).

    The angles are computed in float64 and then cast to `dtype` (default float64), so a float32
    model and a float64 gradient check see the same angles up to the final rounding.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    xp = xp if xp is not None else array_namespace(positions)
    dtype = dtype if dtype is not None else xp.float64
    inv_freq = float(theta) ** (-xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim)
    angles = xp.asarray(positions, dtype=xp.float64)[:, None] * inv_freq[None, :]
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def _rotate(x, cos, sin):
    """Rotate each interleaved pair of x (B, T, H, D) by the angles whose cos/sin are (T, D/2)."""
    xp = array_namespace(x)
    even, odd = x[..., 0::2], x[..., 1::2]
    cos = cos[:, None, :]  # broadcast over heads: (T, 1, D/2)
    sin = sin[:, None, :]
    y = xp.empty_like(x)
    y[..., 0::2] = even * cos - odd * sin
    y[..., 1::2] = even * sin + odd * cos
    return y


def forward(x, cos, sin):
    """Return (y, cache): x rotated pairwise by the angles of its positions."""
    return _rotate(x, cos, sin), RopeCache(cos, sin)


def backward(dy, cache):
    """Return dx: dy rotated back (the transpose of a rotation is its inverse)."""
    # forward was: y = R(angle) x, with R = [[cos, -sin], [sin, cos]] on each pair
    # so dx = R(angle)^T dy = R(-angle) dy: same cos, negated sin
    return _rotate(dy, cache.cos, -cache.sin)
