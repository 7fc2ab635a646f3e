"""python -m npllama.convert: Llama checkpoints between npllama, Hugging Face, Meta's layout and GGUF.

    python -m npllama.convert import llama/7B --out runs/llama-7b          # Meta's, Hugging Face's, GGUF -> npllama
    python -m npllama.convert export runs/mine --out hf/mine [--dtype bfloat16]  # any -> Hugging Face

`import` writes an npllama run folder (its checkpoint at step 0, with the tokenizer when the
source has one), which `npllama.generate` and `npllama.load` read. A checkpoint holds a
SentencePiece tokenizer.model only: a byte-level BPE tokenizer (a GGUF file's "gpt2" vocabulary)
is left out, and the command says so.
`export` writes a directory that transformers' `LlamaForCausalLM.from_pretrained` loads, with the
tokenizer as tokenizer.model (SentencePiece) or tokenizer.json and tokenizer_config.json (BPE).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..checkpoint import save_checkpoint
from ..cli import OneLineParser, command
from ..errors import NpllamaError
from ..files import write_atomically
from ..tokenizer import BOS_ID, EOS_ID, Tokenizer
from ..tokenizer.bpe import BpeTokenizer
from .hf import export_hf
from .load import WHAT_LOADS, Model, load

EXPORT_DTYPES = ("float32", "float16", "bfloat16")


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m npllama.convert",
                           description="Convert Llama checkpoints between npllama, Hugging Face, Meta's layout "
                                       "and GGUF.")
    commands = parser.add_subparsers(dest="command", required=True)
    to_npllama = commands.add_parser("import", help="a Hugging Face or Meta directory or a GGUF file -> an npllama "
                                     "run folder")
    to_npllama.add_argument("source", help="a Hugging Face Llama directory, Meta's (params.json + .pth shards) or a "
                                           ".gguf file")
    to_npllama.add_argument("--out", required=True, help="the npllama run folder to create (must not hold a run)")
    to_hf = commands.add_parser("export", help="any model directory npllama reads -> a Hugging Face directory")
    to_hf.add_argument("source", help=WHAT_LOADS)
    to_hf.add_argument("--out", required=True, help="the directory to write (must be empty or new)")
    to_hf.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32", help="the weights' dtype (default float32)")
    return parser


def _empty_or_new(out: Path, what: str):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NpllamaError(f"--out {out} already exists and is not an empty folder; choose a new --out for the "
                           f"{what}")


def _sentencepiece_bytes(model: Model) -> bytes | None:
    return model.tokenizer.model_bytes if isinstance(model.tokenizer, Tokenizer) else None


@command
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if args.command == "import":
        _empty_or_new(out, "npllama run")
        model = load(args.source, flag="source")
        tokenizer = _sentencepiece_bytes(model)
        path = save_checkpoint(out, 0, config=model.config, params=model.params, tokenizer_model=tokenizer,
                               state={"imported_from": str(Path(args.source).resolve()), "kind": model.kind})
        said = ", with its tokenizer" if tokenizer else ", no tokenizer.model found" if model.tokenizer is None else \
            ", its byte-level BPE tokenizer left out (a checkpoint holds a SentencePiece tokenizer.model only)"
        print(f"{model.kind} model {args.source} -> {path} ({model.config.n_params():,} parameters{said})")
    else:
        _empty_or_new(out, "Hugging Face directory")
        model = load(args.source, flag="source")
        export_hf(out, model.config, model.params, tokenizer_model=_sentencepiece_bytes(model), dtype=args.dtype,
                  special_ids=_special_ids(model.tokenizer))
        if isinstance(model.tokenizer, BpeTokenizer):
            model.tokenizer.save(out / "tokenizer.json")
            config = {**model.tokenizer.tokenizer_config(), "tokenizer_class": "PreTrainedTokenizerFast"}
            write_atomically(out / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())
        print(f"{model.kind} model {args.source} -> {out} (Hugging Face, {args.dtype})")
    return 0


def _special_ids(tokenizer) -> tuple[int | None, int | None]:
    """(BOS, EOS) for config.json: the tokenizer's (None where it has none), else npllama's own."""
    if tokenizer is None:
        return BOS_ID, EOS_ID
    return (tokenizer.bos_id if tokenizer.bos_id >= 0 else None, tokenizer.eos_id if tokenizer.eos_id >= 0 else None)


if __name__ == "__main__":
    sys.exit(main())
