"""`python -m npllama.audit` (the console script `npllama-audit`): gradients against finite differences.

    python -m npllama.audit [--seed N] [--json] [--backend numpy] [--only OP ...]
    python -m npllama.audit compare MODEL_DIR --batch B.npy --grads THEIRS.safetensors [--tolerance T] [--json]
    python -m npllama.audit reference MODEL_DIR --batch B.npy --out REFERENCE.safetensors [--names hf]

Without a subcommand it checks every backward of npllama (npllama/audit/ops.py): exit 1 on any
failure. `compare` checks another implementation's gradients against npllama's float64 reference
(npllama/audit/compare.py): exit 1 on any failure; `reference` writes that reference. Bad input:
one line and exit status 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy

from ..backend import BACKENDS, get_backend
from ..cli import OneLineParser, command, integer, real
from ..convert.hf import read_safetensors
from ..convert.load import WHAT_LOADS, load
from . import compare
from .ops import OPS, format_table, run_audit


def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m npllama.audit",
        description="Check every hand-derived gradient of npllama against finite differences (float64), or "
                    "another implementation's gradients against npllama's (compare, reference).")
    parser.add_argument("--seed", type=integer(minimum=0), default=0,
                        help="seed for inputs, directions and entries (default 0)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--backend", default="numpy",
                        help=f"array backend: {' or '.join(BACKENDS)} (cupy: a CUDA GPU, with npllama's kernels)")
    parser.add_argument("--only", nargs="+", metavar="OP", help=f"check only these ops: {', '.join(OPS)}")
    subcommands = parser.add_subparsers(dest="command", metavar="{compare,reference}")
    for name, help_text in (("compare", "another implementation's gradients against npllama's float64 ones"),
                            ("reference", "write npllama's float64 loss, gradients and hidden states")):
        sub = subcommands.add_parser(name, help=help_text, description=compare.__doc__.split("\n\n")[0])
        sub.add_argument("model", help=WHAT_LOADS)
        sub.add_argument("--batch", required=True, help="token ids (B, T + 1): .npy or .safetensors")
        if name == "compare":
            sub.add_argument("--grads", required=True, help="the other implementation's gradients (.safetensors)")
            sub.add_argument("--tolerance", type=real(minimum=0, above=True), default=compare.DEFAULT_TOLERANCE,
                             help=f"largest relative error that passes (default {compare.DEFAULT_TOLERANCE:g})")
            sub.add_argument("--json", dest="compare_json", action="store_true", help="print JSON instead of a table")
        else:
            sub.add_argument("--out", required=True, help="the .safetensors file to write")
            sub.add_argument("--names", choices=["meta", "hf"], default="meta", help="the naming to write")
    return parser


@command
def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is not None:
        _refuse_op_audit_options(parser, args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "reference":
        return _reference(args)
    xp = get_backend(args.backend)
    unknown = sorted(set(args.only or ()) - set(OPS))
    if unknown:
        parser.error(f"--only: unknown op {', '.join(unknown)}; choose from {', '.join(OPS)}")
    results = run_audit(args.seed, xp, args.only)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2, allow_nan=False))
    else:
        print(format_table(results))
    return 0 if all(r.passed for r in results) else 1


def _refuse_op_audit_options(parser: OneLineParser, args) -> None:
    """The op audit's options given before `compare` or `reference` would be silently unused."""
    given = [flag for flag, value, default in (("--seed", args.seed, 0), ("--json", args.json, False),
                                               ("--backend", args.backend, "numpy"), ("--only", args.only, None))
             if value != default]
    if given:
        parser.error(f"{', '.join(given)}: an option of the op audit, not of {args.command}; give {args.command}'s "
                     f"options after it (python -m npllama.audit {args.command} --help)")


def _reference(args) -> int:
    model = load(args.model, dtype="float64", flag="model")
    loss, grads, states = compare.reference(model, compare.read_batch(args.batch))
    compare.write_reference(args.out, model.config, loss, grads, states, args.names)
    print(f"wrote {args.out}: loss {loss:.10f}, {len(grads)} gradients ({args.names} names), "
          f"{len(states)} hidden states, float64")
    return 0


def _compare(args) -> int:
    model = load(args.model, dtype="float64", flag="model")
    loss, grads, states = compare.reference(model, compare.read_batch(args.batch))
    theirs = read_safetensors(Path(args.grads))
    their_grads, naming = compare.to_meta_names(theirs, model.config, args.grads)
    rows = compare.compare_rows(grads, their_grads, args.tolerance, args.grads)
    diverging = compare.first_diverging_layer(states, theirs, args.tolerance)
    first_wrong = compare.first_diverging_gradients(rows)
    key = compare.LOSS_KEY
    if key in theirs and numpy.size(theirs[key]) != 1:
        raise compare.CompareError(f"--grads {args.grads}: its loss holds {numpy.size(theirs[key])} numbers, not one")
    their_loss = float(numpy.asarray(theirs[key]).reshape(-1)[0]) if key in theirs else None
    _report(args, rows, naming, loss, their_loss, diverging, first_wrong)
    return 0 if all(row.passed for row in rows) else 1


def _report(args, rows, naming, loss, their_loss, diverging, first_wrong):
    failed = [row for row in rows if not row.passed]
    if args.compare_json:
        print(json.dumps({"naming": naming, "loss": loss, "their_loss": their_loss, "tolerance": args.tolerance,
                          "first_diverging_layer": None if diverging is None else diverging[0],
                          "first_diverging_gradients": first_wrong,
                          "rows": [asdict(row) for row in rows], "passed": not failed}, indent=2))
        return
    print(f"{'parameter':<40} {'rel err':>10} {'cosine':>10} {'max abs err':>12}  result")
    for row in rows:
        print(f"{row.name:<40} {row.rel_err:>10.2e} {row.cosine:>10.6f} {row.max_abs_err:>12.3e}  "
              f"{'pass' if row.passed else 'FAIL'}")
    if their_loss is not None:
        print(f"loss: npllama {loss:.10f}, theirs {their_loss:.10f} (relative difference "
              f"{abs(their_loss - loss) / abs(loss):.2e})")
    if diverging is not None:
        where = "the embeddings" if diverging[0] == 0 else f"layer {diverging[0] - 1} (hidden_states.{diverging[0]})"
        print(f"the first output that diverges: {where}, relative error {diverging[1]:.2e}")
    if first_wrong:
        print(f"the first gradients that diverge in the backward pass: {', '.join(first_wrong)}")
    verdict = f"{len(rows) - len(failed)} of {len(rows)} gradients agree within {args.tolerance:g} ({naming} names)"
    print(verdict + ("" if not failed else f"; FAILED: {', '.join(row.name for row in failed[:4])}"
                     + (f" and {len(failed) - 4} more" if len(failed) > 4 else "")))


if __name__ == "__main__":
    sys.exit(main())
