"""lm-evaluation-harness as the outside judge: on 30 real items of each log-likelihood benchmark,
lm-eval's own task definitions, run through npllama's adapter and through lm-eval's `hf` model on
the same weights, give the prompts, per-choice log-likelihoods, acc and acc_norm that
`python -m npllama.eval` gives.

lm-eval reads the same rows from local JSON files (its `datasets` never goes online); the only
change to its task configs is where the data come from. BoolQ's rows get the integer `label`
lm-eval's super_glue config reads, from the published boolean `answer`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npllama
from conftest import TASK_FIXTURES, save_random_run
from npllama import model as llama
from npllama.checkpoint import load_checkpoint
from npllama.eval.report import evaluate_task
from npllama.eval.tasks import load_task

pytestmark = pytest.mark.oracle
lm_eval = pytest.importorskip("lm_eval", reason="the outside judge is lm-evaluation-harness: pip install '.[test]'")

LOGLIKELIHOOD_TASKS = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "siqa", "winogrande"]
LM_EVAL_NAMES = {"siqa": "social_iqa"}


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {key: os.environ.get(key) for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({key: "1" for key in saved})
    yield
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """A random 2-layer model with a 512-piece tokenizer, as an npllama checkpoint."""
    _, tokenizer_path = corpus
    config = llama.LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=512, multiple_of=16, max_seq_len=512)
    return save_random_run(tmp_path_factory.mktemp("lmeval-run"), tokenizer_path, config, seed=3, std=0.2)


@pytest.fixture(scope="module")
def model(run):
    return npllama.load(run, dtype="float64")


@pytest.fixture(scope="module")
def task_manager(lm_eval_task_manager):
    return lm_eval_task_manager


def lm_eval_task(name, task_manager, folder: Path) -> dict:
    """lm-eval's own config of `name`, reading our fixture rows (validation) and pool (train)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    files = {}
    for split, lm_split in (("validation", "validation"), ("fewshot", "train")):
        rows = [json.loads(line) for line in (TASK_FIXTURES / name / f"{split}.jsonl").read_text().splitlines()]
        for row in rows if name == "boolq" else []:
            row["label"] = int(row["answer"])
        files[lm_split] = str(folder / f"{name}-{split}.jsonl")
        Path(files[lm_split]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_yaml(task_manager.task_index[LM_EVAL_NAMES.get(name, name)].yaml_path, resolve_func=True)
    config.update({"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files},
                   "test_split": None, "fewshot_split": "train"})
    return config


def judge(lm, name, task_manager, folder, shots):
    """lm-eval's per-sample records for task `name`, in document order."""
    results = lm_eval.simple_evaluate(model=lm, tasks=[lm_eval_task(name, task_manager, folder)],
                                      num_fewshot=shots, log_samples=True, task_manager=task_manager,
                                      verbosity="ERROR")
    return sorted(results["samples"][LM_EVAL_NAMES.get(name, name)], key=lambda sample: sample["doc_id"])


def compare(ours, samples, tolerance):
    """Prompts equal, each choice's log-likelihood within `tolerance`, acc and acc_norm equal."""
    assert len(samples) == len(ours["examples"]) == 30
    for sample, example in zip(samples, ours["examples"]):
        prompts = example["prompt"] if isinstance(example["prompt"], list) else [example["prompt"]] * len(
            sample["arguments"])
        assert [argument[0] for argument in sample["arguments"]] == prompts
        theirs = [response[0] for response in sample["filtered_resps"]]
        numpy.testing.assert_allclose(example["logprobs"], theirs, rtol=0, atol=tolerance)
        for metric in ("acc", "acc_norm"):
            if metric in sample:
                assert sample[metric] == example[metric], (metric, sample["doc_id"])


@pytest.mark.parametrize("shots", [0, 3])
@pytest.mark.parametrize("name", LOGLIKELIHOOD_TASKS)
def test_lm_eval_through_the_adapter_builds_our_prompts_and_gets_our_scores(
        name, shots, model, task_manager, tmp_path):
    from npllama.eval.lmeval import NpllamaLM

    samples = judge(NpllamaLM(model=model), name, task_manager, tmp_path, shots)
    ours = evaluate_task(model, load_task(name, TASK_FIXTURES), shots=shots, progress=False)
    # the adapter scores with the same code and weights: only the batches' makeup can differ,
    # which moves a float64 sum by a few ulps
    compare(ours, samples, tolerance=1e-9)


@pytest.fixture(scope="module")
def hf_directory(run, tmp_path_factory):
    from npllama.convert.hf import export_hf

    checkpoint = load_checkpoint(run)
    return export_hf(tmp_path_factory.mktemp("lmeval-hf"), checkpoint.config, checkpoint.params,
                     checkpoint.tokenizer_model)


@pytest.fixture(scope="module")
def hf_model(hf_directory):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate: pip install '.[test]'")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_directory), dtype="float64", device="cpu", batch_size=16)


@pytest.mark.parametrize("name", LOGLIKELIHOOD_TASKS)
def test_lm_eval_with_transformers_on_the_same_weights_gets_our_scores(name, model, hf_model, task_manager,
                                                                       tmp_path):
    samples = judge(hf_model, name, task_manager, tmp_path, shots=0)
    ours = evaluate_task(model, load_task(name, TASK_FIXTURES), shots=0, progress=False)
    # transformers computes LlamaRMSNorm (and its attention softmax) in float32 even in a float64
    # model, so its sums carry float32 rounding: up to 6e-6 seen on these items; 1e-4 leaves room
    # for other BLAS builds while a wrong token, position or mask moves a sum by far more than 0.01
    compare(ours, samples, tolerance=1e-4)


def test_the_adapters_rolling_log_likelihood_is_the_whole_texts_in_windows(model):
    from lm_eval.api.instance import Instance

    from npllama.eval.lmeval import NpllamaLM

    rows = (TASK_FIXTURES / "boolq" / "validation.jsonl").read_text().splitlines()
    text = " ".join(json.loads(line)["passage"] for line in rows)[:6000]
    request = Instance("loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (total,) = NpllamaLM(model=model).loglikelihood_rolling([request])
    ids = model.tokenizer.encode(text)
    assert len(ids) > 2 * model.config.max_seq_len  # three windows at least
    # window by window, each one forward pass: BOS then the first 512 tokens; then each next (up
    # to) 512 tokens, read after the 512 tokens before the window's end (lm-eval's rolling windows)
    window = model.config.max_seq_len
    inputs_and_targets = [([model.tokenizer.bos_id] + ids[:window - 1], ids[:window])]
    for start in range(window, len(ids), window):
        end = min(start + window, len(ids))
        inputs_and_targets.append((ids[end - 1 - window:end - 1], ids[start:end]))
    expected = 0.0
    for inputs, targets in inputs_and_targets:
        logits = llama.forward(model.params, model.config, numpy.array([inputs]))[0, -len(targets):]
        top = logits.max(axis=-1, keepdims=True)
        logprobs = logits - top - numpy.log(numpy.exp(logits - top).sum(axis=-1, keepdims=True))
        expected += logprobs[numpy.arange(len(targets)), targets].sum()
    numpy.testing.assert_allclose(total, expected, rtol=1e-12)  # float64, other summation order


def test_the_adapters_generate_until_is_npllamas_greedy_answer(model):
    from lm_eval.api.instance import Instance

    from npllama.eval import scoring as evaluate
    from npllama.eval.lmeval import NpllamaLM

    contexts = ["Answer these questions:\nQ: who wrote hamlet?\nA:", "Q: what is 2+2?\nA:"]
    requests = [Instance("generate_until", doc={}, arguments=(context, {"until": ["\n", "."], "max_gen_toks": 8}),
                         idx=0) for context in contexts]
    assert NpllamaLM(model=model).generate_until(requests) == evaluate.greedy_until(
        model, contexts, stops=("\n", "."), max_new_tokens=8)


def test_lm_evals_command_line_runs_npllama_through_the_wrapper_module(run, tmp_path, task_manager):
    import yaml

    config = lm_eval_task("arc_easy", task_manager, tmp_path)
    config["task"] = "arc_easy_local"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "arc_easy_local.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "npllama.eval.lmeval", "--model_args", f"checkpoint={run}",
                           "--tasks", "arc_easy_local", "--include_path", str(tmp_path / "tasks"), "--limit", "5"],
                          capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "arc_easy_local" in done.stdout and "acc_norm" in done.stdout


def a_stop_of_two_characters_seen_apart_before(text: str) -> str | None:
    """A two-character piece of `text` whose first whole occurrence comes after one of its
    characters already did: cutting at the piece and cutting at either character differ there."""
    for k in range(1, len(text) - 1):
        piece = text[k:k + 2]
        if piece not in text[:k + 1] and (text[k] in text[:k] or text[k + 1] in text[:k]):
            return piece
    return None


@settings(max_examples=10, deadline=None)
@given(limits=st.lists(st.integers(1, 12), min_size=1, max_size=4), as_string=st.lists(st.booleans(), min_size=4,
                                                                                      max_size=4))
def test_generate_until_answers_each_request_with_its_own_stops_and_length_whatever_the_others(
        model, limits, as_string):
    """Requests of mixed settings in one call: each answer is npllama's greedy answer under its own
    `max_gen_toks` and its own `until`, which lm-eval may give as one string (a stop of several
    characters, not a set of one-character stops) or as a list."""
    from lm_eval.api.instance import Instance

    from npllama.eval import scoring as evaluate
    from npllama.eval.lmeval import NpllamaLM

    contexts = ["Q: who wrote hamlet?\nA:", "def add(a, b):\n", "The cat sat on", "Q: what is 2+2?\nA:"]
    requests, expected = [], []
    for index, limit in enumerate(limits):
        context = contexts[index]
        whole = evaluate.greedy_until(model, [context], stops=(), max_new_tokens=12)[0]
        stop = a_stop_of_two_characters_seen_apart_before(whole) or "\n\n"
        until = stop if as_string[index] else [stop]
        requests.append(Instance("generate_until", doc={}, arguments=(context, {"until": until, "max_gen_toks": limit}),
                                 idx=index))
        expected.append(evaluate.greedy_until(model, [context], stops=(stop,), max_new_tokens=limit)[0])
    assert NpllamaLM(model=model).generate_until(requests) == expected


def test_loglikelihood_answers_each_pair_with_its_log_likelihood_and_whether_greedy_decoding_writes_it(model):
    """lm-eval's (log-likelihood, is_greedy) for each request: a continuation of the token the
    model's greedy decoding writes next is greedy, another is not, and the log-likelihoods are
    npllama's."""
    from lm_eval.api.instance import Instance

    from npllama.eval import scoring as evaluate
    from npllama.eval.lmeval import NpllamaLM

    tokenizer, pairs = model.tokenizer, []
    for context in ["The cat sat on", "def add(a, b):", "Q: who wrote hamlet?\nA:", "import numpy", "x = 1"]:
        ids = tokenizer.encode(context, bos=tokenizer.add_bos_token)
        token = int(llama.forward(model.params, model.config, numpy.array([ids]))[0, -1].argmax())
        continuation = tokenizer.decode(ids + [token])[len(tokenizer.decode(ids)):]
        if evaluate.encode_pair(tokenizer, context, continuation)[1] == [token]:  # the text reads back as it
            pairs.append((context, continuation))
    assert len(pairs) >= 2
    pairs += [(context, " zebra" if continuation != " zebra" else " yak") for context, continuation in pairs]
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=index) for index, pair in enumerate(pairs)]
    answers = NpllamaLM(model=model).loglikelihood(requests)
    assert answers == [(result.logprob, result.greedy) for result in evaluate.loglikelihoods(model, pairs)]
    assert [is_greedy for _, is_greedy in answers] == [True] * (len(pairs) // 2) + [False] * (len(pairs) // 2)
