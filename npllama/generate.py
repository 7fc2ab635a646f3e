"""`python -m npllama.generate` (the console script `npllama-generate`): text from a model.

    python -m npllama.generate --checkpoint RUN_OR_CHECKPOINT_DIR --prompt "def fib(n):"

The prompt is encoded with the model's own tokenizer (BOS first) and continued by
npllama.sampling's KV-cache decoding: temperature, then top-k, then top-p, then a seeded draw;
temperature 0 is greedy. Decoding stops at EOS or after --max-new-tokens. Text is streamed to
stdout as it is produced (byte-fallback pieces that make up one character appear together).
"""

from __future__ import annotations

import sys

from .backend import BACKENDS
from .cli import OneLineParser, fail, integer, real
from .convert.load import load
from .errors import NpllamaError
from .sampling import generate
from .tokenizer import TokenizerError


def _parser():
    parser = OneLineParser(prog="python -m npllama.generate",
                           description="Generate text from a Llama checkpoint with KV-cache decoding.")
    parser.add_argument("--checkpoint", required=True,
                        help="a training run's output folder or one checkpoint folder, a Hugging Face Llama "
                             "directory, or Meta's original layout (params.json + consolidated.NN.pth)")
    parser.add_argument("--prompt", default="", help="text to continue (default: empty, start from BOS)")
    parser.add_argument("--max-new-tokens", type=integer(minimum=1), default=200,
                        help="stop after this many tokens (default 200)")
    parser.add_argument("--temperature", type=real(minimum=0), default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=integer(minimum=1), default=None, help="keep only the k most likely tokens")
    parser.add_argument("--top-p", type=real(minimum=0, maximum=1, above=True), default=0.95,
                        help="nucleus sampling mass, in (0, 1] (default 0.95; 1 = off)")
    parser.add_argument("--seed", type=integer(minimum=0), default=0, help="sampling seed (default 0)")
    parser.add_argument("--backend", default="numpy",
                        help=f"array backend: {' or '.join(BACKENDS)} (cupy: a CUDA GPU, with npllama's kernels)")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    printed: list[bool] = []  # the prompt is printed with the first new text, after every check has passed

    def show(piece):
        if not printed:
            printed.append(True)
            print(args.prompt, end="", flush=True)
        print(piece, end="", flush=True)

    try:
        loaded = load(args.checkpoint, backend=args.backend, flag="--checkpoint")
        if loaded.tokenizer is None:
            raise TokenizerError(f"--checkpoint {loaded.path}: the model holds no tokenizer.model; pass a "
                                 "checkpoint written by npllama.train, or put the model's tokenizer.model beside it")
        generate(loaded.params, loaded.config, loaded.tokenizer, args.prompt, args.max_new_tokens,
                 args.temperature, args.top_k, args.top_p if args.top_p < 1 else None, args.seed, on_text=show)
        if not printed:
            show("")
        print()
    except NpllamaError as error:  # after streamed text, the error begins a line of its own
        return fail(error, prefix="\n" if printed else "")
    except KeyboardInterrupt:
        print()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
