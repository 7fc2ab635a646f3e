"""A model someone actually trained, through npllama end to end, against transformers loading the
same file: SmolLM2-135M-Instruct's Q4_1 GGUF file (tests/real_model.py finds or downloads it; the
tests skip with the reason when it cannot be had). 30 layers, 9 query heads sharing 3 key/value
heads, tied embeddings, a byte-level BPE tokenizer.

- logits on some 400 tokens of English within 1e-4 of the largest logit, and 64 greedy tokens
  identical (both in float32);
- evaluation: for ARC-Easy and PIQA (8 real items each, tests/data/tasks), lm-eval's `hf` model
  on transformers' load of the file gives every choice's log-likelihood within 1e-4 of
  `npllama.eval`'s, and the same acc and acc_norm;
- audit: transformers' gradients on English text pass `python -m npllama.audit compare` (float32
  within 1e-2, float64 within 1e-10), and a planted fault in their grouped-query backward fails it,
  naming the key/value projections of the last block as the first gradients that go wrong.
"""

import copy
import importlib.util
from pathlib import Path

import numpy
import pytest
import real_model

import npllama
from conftest import TASK_FIXTURES
from npllama import model as llama
from npllama.audit import compare

pytestmark = [pytest.mark.oracle, pytest.mark.real_model]
torch = pytest.importorskip("torch", reason="the oracle is transformers on torch: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="the oracle is transformers: pip install '.[test]'")
pytest.importorskip("gguf", reason="GGUF files are read with gguf: pip install '.[test]'")

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hf_gradients", REPO / "reference" / "hf_gradients.py")
hf_gradients = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_gradients)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return real_model.smollm2_gguf()


@pytest.fixture(scope="module")
def ours(gguf_path):
    return npllama.load(gguf_path)


@pytest.fixture(scope="module")
def theirs(gguf_path):
    """transformers' LlamaForCausalLM from the same file (it dequantizes to float32)."""
    return transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                             dtype=torch.float32).eval()


# --- logits and generation --------------------------------------------------------------------------

def test_logits_equal_transformers_on_english_text(ours, theirs):
    ids = ours.tokenizer.encode(real_model.ENGLISH)[:400]
    assert len(ids) == 400 and ours.config.n_kv_heads == 3 and ours.config.tie_embeddings
    logits = llama.forward(ours.params, ours.config, numpy.array([ids]))
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits.numpy()
    difference = float(numpy.abs(logits - expected).max() / numpy.abs(expected).max())
    print(f"SmolLM2 logits on {len(ids)} tokens: max |npllama - transformers| / max |logit| = {difference:.2e}")
    # both float32 through 30 layers: 5.4e-6 measured; a wrong head, position or norm moves it past 1e-2
    assert difference <= 1e-4


def test_greedy_continuation_equals_transformers(ours, theirs):
    from npllama.sampling import decode, greedy

    prompt = ours.tokenizer.encode("Four score and seven years ago")
    chosen: list[int] = []

    def choose(logits):
        ids = greedy(logits)
        chosen.extend(ids)
        return ids

    text = decode(ours.params, ours.config, ours.tokenizer, [prompt], 64, choose)[0]
    with torch.no_grad():
        generated = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=64, do_sample=False, pad_token_id=ours.tokenizer.eos_id)
    print(f"SmolLM2 greedy continuation ({len(chosen)} tokens): {text!r}")
    assert chosen == generated[0, len(prompt):].tolist() and len(chosen) == 64


# --- evaluation against lm-eval's hf model -----------------------------------------------------------

@pytest.fixture(scope="module")
def lm_eval_judge(gguf_path, theirs, lm_eval_task_manager):
    """(lm-eval's `hf` model on transformers' load of the file, in float64; lm-eval's task manager)."""
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate: pip install '.[test]'")
    from lm_eval.models.huggingface import HFLM

    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return HFLM(pretrained=copy.deepcopy(theirs).double(), tokenizer=tokenizer, batch_size=16), lm_eval_task_manager


ITEMS = 8  # of the 30 real items of each task in tests/data/tasks (32 and 16 choices): the two tasks in 40 s


@pytest.mark.parametrize("name", ["arc_easy", "piqa"])
def test_lm_evals_hf_model_on_transformers_load_gets_our_log_likelihoods_and_answers(
        name, ours64, lm_eval_judge, tmp_path, monkeypatch):
    import lm_eval
    from test_lmeval import lm_eval_task

    from npllama.eval.report import evaluate_task
    from npllama.eval.tasks import load_task

    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    judge_model, task_manager = lm_eval_judge
    results = lm_eval.simple_evaluate(model=judge_model, tasks=[lm_eval_task(name, task_manager, tmp_path)],
                                      num_fewshot=0, limit=ITEMS, log_samples=True, task_manager=task_manager,
                                      verbosity="ERROR")
    samples = sorted(results["samples"][name], key=lambda sample: sample["doc_id"])
    ours = evaluate_task(ours64, load_task(name, TASK_FIXTURES), shots=0, limit=ITEMS, progress=False)
    assert len(samples) == len(ours["examples"]) == ITEMS
    for sample, example in zip(samples, ours["examples"]):
        assert [argument[0] for argument in sample["arguments"]] == [example["prompt"]] * len(sample["arguments"])
        # both in float64 but for transformers' RMSNorm, which computes in float32 whatever the model's
        # dtype: up to 1.5e-5 measured on these items; a wrong token, position or mask moves a sum by > 0.01
        numpy.testing.assert_allclose(example["logprobs"], [response[0] for response in sample["filtered_resps"]],
                                      rtol=0, atol=1e-4)
        assert (sample["acc"], sample["acc_norm"]) == (example["acc"], example["acc_norm"]), sample["doc_id"]


# --- audit compare ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch_file(ours, tmp_path_factory) -> Path:
    """(1, 129) token ids of English: the model reads 128 and predicts the next of each."""
    path = tmp_path_factory.mktemp("real-audit") / "batch.npy"
    numpy.save(path, numpy.array([ours.tokenizer.encode(real_model.ENGLISH)[:129]]))
    return path


def their_gradients(model, batch_file: Path, name: str) -> Path:
    from safetensors.numpy import save_file

    tensors = hf_gradients.hf_gradients(model, numpy.load(batch_file))
    path = batch_file.parent / f"{name}.safetensors"
    save_file({key: numpy.ascontiguousarray(value) for key, value in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def ours64(gguf_path):
    return npllama.load(gguf_path, dtype="float64")


@pytest.fixture(scope="module")
def audit_compare(gguf_path, batch_file, ours64):
    """`python -m npllama.audit compare GGUF --batch ... --grads G --tolerance X` run in this process,
    as (exit status, output). The command's loading and reference are npllama.load and
    compare.reference, each tested on its own; here they run once and every run reuses them."""
    from npllama.audit import __main__ as audit_command

    reference = compare.reference(ours64, numpy.load(batch_file))

    def run(grads: Path, tolerance: float, capsys) -> tuple[int, str]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(audit_command, "load", lambda *args, **kwargs: ours64)
            patch.setattr(compare, "reference", lambda model, batch: reference)
            status = audit_command.main(["compare", str(gguf_path), "--batch", str(batch_file), "--grads", str(grads),
                                         "--tolerance", str(tolerance)])
        return status, capsys.readouterr().out

    return run


# transformers' float32 gradients of SmolLM2 are within 1.6e-3 of the float64 truth (relative, the worst
# parameter: layers.28.attention_norm.weight): torch's float32 cross-entropy over 49152 logits is off by
# 1e-5 (relative, in dlogits), and the backward amplifies it through the residual stream, whose outlier
# channel reaches 2.4e4 in blocks 12..28. npllama's own float32 gradients are within 3.7e-5. A planted
# bug moves the gradients it touches by 0.1 and more, so 1e-2 tells rounding from bugs on this model.
FLOAT32_TOLERANCE = 1e-2


def test_transformers_float32_gradients_of_the_real_model_pass_the_audit(theirs, batch_file, audit_compare, capsys):
    status, report = audit_compare(their_gradients(theirs, batch_file, "float32"), FLOAT32_TOLERANCE, capsys)
    assert status == 0, report
    assert report.strip().splitlines()[-1] == "272 of 272 gradients agree within 0.01 (huggingface names)"


def test_transformers_float64_gradients_of_the_real_model_equal_npllamas(theirs, batch_file, audit_compare, capsys):
    """In float64 throughout (transformers' RMSNorm and RoPE angles too), the two implementations
    agree to the last digits: the float32 differences above are rounding, not a different model."""
    from test_convert_hf import float64_throughout

    model = float64_throughout(copy.deepcopy(theirs).double())
    status, report = audit_compare(their_gradients(model, batch_file, "float64"), 1e-10, capsys)
    assert status == 0, report


class KeyValueHeadsCopiedWithoutSummingTheirGradients(torch.autograd.Function):
    """repeat_kv with a planted bug in its backward: each key/value head receives the gradient of the
    first query head of its group only, instead of the sum over the group."""

    @staticmethod
    def forward(ctx, states, group_size):
        ctx.group_size = group_size
        batch, heads, length, head_dim = states.shape
        return states[:, :, None].expand(batch, heads, group_size, length, head_dim).reshape(
            batch, heads * group_size, length, head_dim)

    @staticmethod
    def backward(ctx, grad):
        batch, query_heads, length, head_dim = grad.shape
        return grad.reshape(batch, query_heads // ctx.group_size, ctx.group_size, length, head_dim)[:, :, 0], None


def test_a_fault_in_transformers_grouped_query_backward_fails_the_audit_naming_wk_and_wv(
        theirs, batch_file, audit_compare, capsys, monkeypatch):
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, "repeat_kv", KeyValueHeadsCopiedWithoutSummingTheirGradients.apply)
    model = copy.deepcopy(theirs)
    model.set_attn_implementation("eager")  # the attention that calls modeling_llama.repeat_kv
    status, report = audit_compare(their_gradients(model, batch_file, "fault"), FLOAT32_TOLERANCE, capsys)
    assert status == 1, report
    assert "the first output that diverges" not in report  # the forward is right
    assert ("the first gradients that diverge in the backward pass: layers.29.attention.wk.weight, "
            "layers.29.attention.wv.weight, layers.29.attention_norm.weight") in report
    rows = {line.split()[0]: line.split()[-1] for line in report.splitlines() if line.startswith("layers.29.")}
    assert {name for name, verdict in rows.items() if verdict == "FAIL"} == {
        "layers.29.attention.wk.weight", "layers.29.attention.wv.weight", "layers.29.attention_norm.weight"}


def test_npllamas_own_float32_gradients_pass_the_audit_at_the_default_tolerance(ours, batch_file, audit_compare,
                                                                                  capsys, tmp_path):
    """npllama's float32 gradients of the same model are within 4e-5 of its float64 reference: the
    1e-2 above is room for torch's float32 rounding, not for npllama's."""
    from safetensors.numpy import save_file

    batch = numpy.load(batch_file)
    loss, grads = llama.loss_and_grads(ours.params, ours.config, batch[:, :-1], batch[:, 1:])
    save_file({**grads, "loss": numpy.asarray(loss)}, str(tmp_path / "npllama-float32.safetensors"))
    status, report = audit_compare(tmp_path / "npllama-float32.safetensors", compare.DEFAULT_TOLERANCE, capsys)
    assert status == 0, report
