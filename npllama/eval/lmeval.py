"""npllama as a model of lm-evaluation-harness, so that the harness people trust can judge it.

    import lm_eval, npllama.eval.lmeval
    lm = npllama.eval.lmeval.NpllamaLM(checkpoint="runs/mine")
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

    python -m npllama.eval.lmeval --model_args checkpoint=runs/mine --tasks arc_easy --limit 100

lm-eval cannot import a model from outside its package by name, so `python -m npllama.eval.lmeval`
registers this one as `npllama` and runs lm-eval's own command line (`--model npllama` is implied;
every other flag is lm-eval's). The three requests are served by npllama.eval.scoring, the same code
`python -m npllama.eval` scores with:

    loglikelihood(context, continuation)   -> (log-likelihood, whether greedy decoding gives it)
    loglikelihood_rolling(text)            -> log-likelihood of the whole text, BOS first, in windows
                                              of the model's context length
    generate_until(context, {until, max_gen_toks})  -> the greedy continuation, cut at `until`

lm-eval (`pip install lm_eval`) is optional: only this module imports it.
"""

from __future__ import annotations

import sys

from ..cli import fail

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    if __name__ == "__main__":
        sys.exit(fail("python -m npllama.eval.lmeval runs lm-evaluation-harness, which is not installed; "
                      "pip install \"lm_eval[hf]\""))
    raise ImportError("npllama.eval.lmeval needs lm-evaluation-harness: pip install \"lm_eval[hf]\"") from None

from ..convert.load import load
from . import scoring

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until


@register_model("npllama")
class NpllamaLM(LM):
    """An lm-eval model backed by `npllama.load(checkpoint)` (any kind npllama reads)."""

    def __init__(self, checkpoint=None, backend: str = "numpy", batch_size=32, model=None) -> None:
        super().__init__()
        if model is None and checkpoint is None:
            raise ValueError("NpllamaLM needs checkpoint=PATH (or an npllama.load model as model=)")
        self.model = model if model is not None else load(checkpoint, backend=backend, flag="checkpoint")
        if self.model.tokenizer is None:
            raise ValueError(f"{self.model.path}: the model has no tokenizer.model")
        self.batch_size = int(batch_size)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> NpllamaLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> NpllamaLM:
        """lm-eval's command line adds its own settings (device, batch_size, max_batch_size); of
        those npllama takes a numeric batch size. The device follows `backend=` (numpy or cupy)."""
        extra = additional_config or {}
        batch_size = extra.get("batch_size")
        if batch_size not in (None, "auto") and "batch_size" not in arg_dict:
            arg_dict = {**arg_dict, "batch_size": batch_size}
        return cls(**arg_dict)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [request.args for request in requests]
        scored = scoring.loglikelihoods(self.model, pairs, batch_size=self.batch_size)
        return [(result.logprob, result.greedy) for result in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        tokenizer, max_seq_len = self.model.tokenizer, self.model.config.max_seq_len
        assert tokenizer is not None  # __init__ refuses a model without one
        windows, owners = [], []
        for owner, request in enumerate(requests):
            (text,) = request.args[:1]
            ids = tokenizer.encode(text)
            for window in get_rolling_token_windows(ids, prefix_token=tokenizer.bos_id, max_seq_len=max_seq_len,
                                                    context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, result in zip(owners, scoring.token_loglikelihoods(self.model, windows, self.batch_size)):
            totals[owner] += result.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy answers; requests with the same stop strings and length limit decode together."""
        by_settings: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            settings = dict(request.args[1])
            until = settings.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            limit = int(settings.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            by_settings.setdefault((until, limit), []).append(index)
        answers = [""] * len(requests)
        for (until, limit), indices in by_settings.items():
            contexts = [requests[index].args[0] for index in indices]
            for index, answer in zip(indices, scoring.greedy_until(self.model, contexts, stops=until,
                                                                    max_new_tokens=limit,
                                                                    batch_size=self.batch_size)):
                answers[index] = answer
        return answers


def main(argv=None) -> int:
    """lm-eval's command line with `--model npllama` (this module's model) filled in."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in argv:
        argv = ["--model", "npllama", *argv]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
