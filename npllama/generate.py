"""`python -m npllama.generate` (the console script `npllama-generate`): text from a model.

    python -m npllama.generate --checkpoint RUN_OR_CHECKPOINT_DIR --prompt "def fib(n):"

    python -m npllama.generate --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --chat --prompt "Hi!"

The prompt is encoded with the model's own tokenizer (BOS first where the tokenizer adds one) and
continued by npllama.sampling's KV-cache decoding: temperature, then top-k, then top-p, then a
seeded draw; temperature 0 is greedy. Decoding stops at EOS or after --max-new-tokens. Text is
streamed to stdout as it is produced (byte-fallback pieces that make up one character appear
together).

With --chat the prompt is a user's message: the model's own chat template (npllama.tokenizer.chat,
rendered in jinja2's sandbox) wraps it, after --system's message if given, and opens the
assistant's turn; only the reply is printed. Without --prompt, --chat reads one message per line
from standard input and keeps the conversation, until end of input; when it outgrows the model's
context the oldest exchanges are left out (said on stderr), the --system message kept.
"""

from __future__ import annotations

import sys

from .backend import BACKENDS
from .cli import OneLineParser, fail, integer, real
from .convert.load import WHAT_LOADS, load
from .errors import NpllamaError
from .sampling import GenerateError, generate
from .tokenizer import TokenizerError
from .tokenizer.chat import ChatTemplateError, render_chat


def _parser():
    parser = OneLineParser(prog="python -m npllama.generate",
                           description="Generate text from a Llama checkpoint with KV-cache decoding.")
    parser.add_argument("--checkpoint", required=True,
                        help=WHAT_LOADS)
    parser.add_argument("--prompt", default="", help="text to continue (default: empty, start from BOS)")
    parser.add_argument("--max-new-tokens", type=integer(minimum=1), default=200,
                        help="stop after this many tokens (default 200)")
    parser.add_argument("--temperature", type=real(minimum=0), default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=integer(minimum=1), default=None, help="keep only the k most likely tokens")
    parser.add_argument("--top-p", type=real(minimum=0, maximum=1, above=True), default=0.95,
                        help="nucleus sampling mass, in (0, 1] (default 0.95; 1 = off)")
    parser.add_argument("--seed", type=integer(minimum=0), default=0, help="sampling seed (default 0)")
    parser.add_argument("--chat", action="store_true",
                        help="treat --prompt as a user's message in the model's own chat template (instruct "
                             "models); without --prompt, chat line by line from standard input")
    parser.add_argument("--system", default=None, help="with --chat: a system message first")
    parser.add_argument("--backend", default="numpy",
                        help=f"array backend: {' or '.join(BACKENDS)} (cupy: a CUDA GPU, with npllama's kernels)")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    for flag, text in (("--prompt", args.prompt), ("--system", args.system or "")):
        bad = next((at for at, char in enumerate(text) if "\ud800" <= char <= "\udfff"), None)
        if bad is not None:  # the shell passed bytes that are not UTF-8 (Python keeps them as surrogates)
            parser.error(f"{flag}: not UTF-8 text (an undecodable byte at character {bad}); pass UTF-8 text")
    printed: list[bool] = []  # the prompt is printed with the first new text, after every check has passed

    def show(piece):
        if not printed:
            printed.append(True)
            print("" if args.chat else args.prompt, end="", flush=True)
        print(piece, end="", flush=True)

    try:
        loaded = load(args.checkpoint, backend=args.backend, flag="--checkpoint")
        if loaded.tokenizer is None:
            raise TokenizerError(f"--checkpoint {loaded.path}: the model holds no tokenizer; pass a checkpoint "
                                 "written by npllama.train, or put the model's tokenizer beside it")
        if args.chat and not args.prompt:
            return _chat_on_stdin(loaded, args)
        prompt = _chat_text(loaded, args, [{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        _continue(loaded, args, prompt, show)
        if not printed:
            show("")
        print()
    except NpllamaError as error:  # after streamed text, the error begins a line of its own
        return fail(error, prefix="\n" if printed else "")
    except KeyboardInterrupt:
        print()
        return 130
    return 0


def _continue(loaded, args, prompt: str, show) -> str:
    """The model's continuation of `prompt`, streamed to `show`; a chat's text already holds its BOS."""
    return generate(loaded.params, loaded.config, loaded.tokenizer, prompt, args.max_new_tokens, args.temperature,
                    args.top_k, args.top_p if args.top_p < 1 else None, args.seed, on_text=show,
                    bos=False if args.chat else None)


def _chat_text(loaded, args, turns: list[dict]) -> str:
    """The conversation (after --system's message) in the model's chat template, the assistant's turn open."""
    template = loaded.tokenizer.chat_template
    if not template:
        raise ChatTemplateError(f"--checkpoint {loaded.path}: the model has no chat template (not an instruct "
                                "model?); generate without --chat")
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return render_chat(template, system + turns, loaded.tokenizer.special_tokens())


def _chat_on_stdin(loaded, args) -> int:
    """A conversation: each line of standard input is the user's next message, each reply printed.
    In a terminal "> " asks for the message; from a pipe the message is printed after "> ", so
    that the output reads as the conversation."""
    turns: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError as error:
            raise GenerateError(f"standard input is not UTF-8 text ({error.reason}); send UTF-8 text") from None
        if not line:
            return 0
        message = line.rstrip("\n")
        if not interactive:
            print(f"> {message}")
        turns.append({"role": "user", "content": message})
        turns, text = _fitting(loaded, args, turns)
        reply = _continue(loaded, args, text, lambda piece: print(piece, end="", flush=True))
        print(flush=True)
        turns.append({"role": "assistant", "content": reply})


def _fitting(loaded, args, turns: list[dict]) -> tuple[list[dict], str]:
    """The latest turns of the conversation whose text leaves the model room for a reply, and that
    text: as the window slides, the oldest exchanges (a message and its reply) are left out, each
    said on stderr; the --system message stays. A last message too long alone is a GenerateError."""
    window = loaded.config.max_seq_len
    while True:
        text = _chat_text(loaded, args, turns)
        length = len(loaded.tokenizer.encode(text, bos=False))
        if length < window:
            return turns, text
        if len(turns) == 1:
            raise GenerateError(f"the message is {length} tokens in the chat template; the model's context is "
                                f"{window}; send a shorter message")
        turns = turns[2:]
        print(f"(the conversation outgrew the model's context of {window} tokens: its oldest exchange is left "
              "out)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
