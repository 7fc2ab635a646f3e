"""Auditing another implementation's gradients against npllama's float64 reference.

    python -m npllama.audit reference MODEL_DIR --batch batch.npy --out reference.safetensors [--names hf]
    python -m npllama.audit compare MODEL_DIR --batch batch.npy --grads theirs.safetensors [--json]

MODEL_DIR is any directory `npllama.load` reads (npllama's, Hugging Face's, Meta's). The batch
holds token ids (B, T + 1): the model reads the first T and the loss is the mean next-token
cross-entropy of the last T. The gradients file (safetensors) names each parameter as Hugging
Face or Meta does (detected); Hugging Face's wq/wk gradients have their rows permuted back to
Meta's layout, as the weights are. It may also hold `loss` (a scalar) and `hidden_states.0` ..
`hidden_states.L` (as transformers' `output_hidden_states` gives them): then the report names
the first layer whose output diverges, which is where a bug in the forward shows first. A bug in a
backward shows first where the backward pass first meets it: the report names the failing
gradients of the first part of the model the backward reaches (`first_diverging_gradients`).

npllama computes the same loss and gradients in float64 from the same weights and compares them
per parameter, in forward order (`compare_rows`): relative error |g - g_ref| / |g_ref| (Frobenius
norms), cosine similarity, max abs error, and pass/fail at the tolerance; the command
(npllama/audit/__main__.py) prints the rows and the verdict and exits 1 on any failure.
The default tolerance, 1e-4, is what a float32 implementation of a small model meets comfortably
(its rounding gives ~1e-6 .. 1e-5) and what a real bug (a wrong epsilon, a missing term) does not.
Deep trained models amplify float32 rounding: transformers' float32 gradients of SmolLM2-135M
(30 layers, an outlier channel of 2.4e4 in its residual stream) are within 1.6e-3 of the float64
truth, and a bug moves the gradients it touches by 0.1 or more; pass `--tolerance 1e-2` there.
`reference` writes npllama's own loss, gradients and hidden states in either naming, so that
another project can run the comparison in its own tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy

from .. import model as llama
from ..convert.hf import hf_rows_to_meta, meta_rows_to_hf, read_safetensors
from ..errors import NpllamaError
from ..files import regular_file_problem
from ..params import TOK_EMBEDDINGS, hf_names, parameter_shapes, rope_permuted_names

DEFAULT_TOLERANCE = 1e-4
LOSS_KEY = "loss"
HIDDEN_PREFIX = "hidden_states."


class CompareError(NpllamaError):
    """Inputs the comparison cannot use, in one line."""


@dataclass(frozen=True)
class Row:
    """One parameter's comparison."""

    name: str
    rel_err: float
    cosine: float
    max_abs_err: float
    passed: bool


def read_batch(path) -> numpy.ndarray:
    """Token ids (B, T + 1) from a .npy file or a safetensors file's only (or "tokens") tensor."""
    path = Path(path)
    problem = regular_file_problem(path)
    if problem is not None:
        raise CompareError(f"--batch {path}: {problem}; pass a .npy or .safetensors file")
    try:
        if path.suffix == ".npy":
            batch = numpy.load(path, allow_pickle=False)
        else:
            tensors = read_safetensors(path, integers=True)
            batch = tensors.get("tokens", next(iter(tensors.values()), None)) if tensors else None
    except (OSError, ValueError) as error:
        raise CompareError(f"--batch {path}: cannot be read ({error}); pass a .npy or .safetensors file") from None
    if batch is None or batch.ndim != 2 or batch.shape[1] < 2 or batch.dtype.kind not in "iu":
        shape = None if batch is None else (batch.shape, str(batch.dtype))
        raise CompareError(f"--batch {path}: expected integer token ids of shape (B, T + 1), got {shape}")
    return batch.astype(numpy.int64)


def reference(model, batch) -> tuple[float, dict, list]:
    """npllama's (loss, gradients under Meta's names, hidden states) for the batch, in the model's
    dtype: main() loads it in float64."""
    loss, grads = llama.loss_and_grads(model.params, model.config, batch[:, :-1], batch[:, 1:])
    states = llama.hidden_states(model.params, model.config, batch[:, :-1])
    return loss, grads, states


def to_meta_names(tensors: dict, config, source: str) -> tuple[dict, str]:
    """The gradients in `tensors` under Meta's names and rows, and which naming they came in."""
    names = hf_names(config)
    hf_found, meta_found = sum(hf in tensors for hf in names.values()), sum(meta in tensors for meta in names)
    naming = "huggingface" if hf_found > meta_found else "meta"
    missing = [(meta, hf) for meta, hf in names.items() if (hf if naming == "huggingface" else meta) not in tensors]
    if not hf_found and not meta_found:
        raise CompareError(f"--grads {source}: neither Meta's nor Hugging Face's names for every parameter "
                           f"(no {missing[0][0]!r} or {missing[0][1]!r}); it must hold one gradient per parameter")
    if missing:
        meta, hf = missing[0]
        raise CompareError(f"--grads {source}: no gradient of {hf if naming == 'huggingface' else meta!r} "
                           f"({len(missing)} of the {len(names)} parameters missing, {naming} names); it must hold "
                           "one gradient per parameter")
    shapes = parameter_shapes(config)
    for meta, hf in names.items():
        gradient = tensors[hf if naming == "huggingface" else meta]
        if gradient.shape != shapes[meta]:
            raise CompareError(f"--grads {source}: {hf if naming == 'huggingface' else meta} has shape "
                               f"{gradient.shape}, the model's is {shapes[meta]}")
    if naming == "meta":
        return {name: tensors[name] for name in names}, "meta"
    permuted = rope_permuted_names(config)
    return ({meta: hf_rows_to_meta(tensors[hf], config) if meta in permuted else tensors[hf]
             for meta, hf in names.items()}, "huggingface")


def compare_rows(ours: dict, theirs: dict, tolerance: float, source: str) -> list[Row]:
    """One row per parameter; a NaN or an infinity in theirs makes its row's relative error non-finite,
    which fails it (and is reported as it is, without NumPy's warnings about the arithmetic)."""
    with numpy.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return [_row(name, reference_grad, theirs[name], tolerance, source) for name, reference_grad in ours.items()]


def _row(name: str, reference_grad, theirs, tolerance: float, source: str) -> Row:
    other = numpy.asarray(theirs, dtype=numpy.float64)
    if other.shape != reference_grad.shape:
        raise CompareError(f"--grads {source}: {name} has shape {other.shape}, the model's is "
                           f"{reference_grad.shape}")
    difference = other - reference_grad
    norm_ref, norm_other = numpy.linalg.norm(reference_grad), numpy.linalg.norm(other)
    rel = float(numpy.linalg.norm(difference) / norm_ref) if norm_ref else float(numpy.linalg.norm(difference))
    cosine = float(numpy.vdot(other, reference_grad) / (norm_ref * norm_other)) if norm_ref and norm_other \
        else float("nan")
    max_abs = float(numpy.abs(difference).max()) if difference.size else 0.0
    return Row(name, rel, cosine, max_abs, bool(math.isfinite(rel) and rel <= tolerance))


def first_diverging_layer(ours: list, theirs: dict, tolerance: float):
    """(index, relative error) of the first hidden state beyond `tolerance`, or None; index 0 is
    the embeddings, i the output of block i (the last one after the final norm)."""
    for index, state in enumerate(ours):
        other = theirs.get(f"{HIDDEN_PREFIX}{index}")
        if other is None:
            return None
        if numpy.shape(other) != state.shape:
            raise CompareError(f"{HIDDEN_PREFIX}{index} has shape {numpy.shape(other)}, the batch's hidden states "
                               f"{state.shape}; write them for the same batch")
        rel = float(numpy.linalg.norm(numpy.asarray(other, numpy.float64) - state) / numpy.linalg.norm(state))
        if not rel <= tolerance:
            return index, rel
    return None


def first_diverging_gradients(rows: list[Row]) -> list[str]:
    """The failing parameters of the first part of the model the backward pass reaches that has any:
    the final norm and output head, then the blocks from the last to the first, then the embedding.
    Gradients upstream of a wrong derivative are wrong too, so this is where to look for it (a bug
    in a block's key/value backward fails that block's wk and wv while its wq and MLP still pass)."""
    def backward_order(row: Row) -> tuple[int, int]:
        parts = row.name.split(".")
        if parts[0] == "layers" and parts[1].isdigit():
            return 1, -int(parts[1])  # block i is reached after the blocks above it
        return (2, 0) if row.name == TOK_EMBEDDINGS else (0, 0)  # the final norm and head come first
    failed = [row for row in rows if not row.passed]
    if not failed:
        return []
    first = min(backward_order(row) for row in failed)
    return [row.name for row in failed if backward_order(row) == first]


def write_reference(path, config, loss: float, grads: dict, states: list, names: str = "meta") -> None:
    """Write npllama's loss, gradients and hidden states to the safetensors file `path`, the
    gradients under Meta's names or Hugging Face's (`names="hf"`, wq/wk rows permuted)."""
    from safetensors.numpy import save_file

    if names == "hf":
        hf, permuted = hf_names(config), rope_permuted_names(config)
        grads = {hf[name]: meta_rows_to_hf(g, config) if name in permuted else g for name, g in grads.items()}
    tensors = {name: numpy.ascontiguousarray(g) for name, g in grads.items()}
    tensors[LOSS_KEY] = numpy.asarray(loss, dtype=numpy.float64)
    tensors.update({f"{HIDDEN_PREFIX}{i}": numpy.ascontiguousarray(h) for i, h in enumerate(states)})
    save_file(tensors, path)
