"""Scoring as the Llama paper and GPT-3 define it: log-likelihoods computed by hand equal the
evaluator's, every normalisation picks what its formula picks, WinoGrande's partial scoring scores
the shared continuation, exact match normalises as SQuAD does, and few-shot prompts never show an
item its own answer."""

from pathlib import Path

import numpy
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from npllama import model as llama
from npllama.convert.load import Model
from npllama.eval import scoring as evaluate
from npllama.eval.scoring import Generation, MultipleChoice, Partial, Scored
from npllama.sampling import GenerateError, generate
from npllama.tokenizer import Tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "Answer:", "\n", "42", "déjà", "vu", " ", "Question:", "?"]


@pytest.fixture(scope="module")
def tiny(corpus):
    _, tokenizer_path = corpus
    config = llama.LlamaConfig(dim=16, n_layers=2, n_heads=2, vocab_size=512, multiple_of=8, max_seq_len=48)
    params = llama.init_params(config, seed=11, dtype="float64", std=0.3)
    return Model(config, params, Tokenizer.load(tokenizer_path), "npllama", Path("tiny"))


def log_softmax(logits):
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - numpy.log(numpy.exp(logits - top).sum(axis=-1, keepdims=True))


def by_hand(model, context, continuation):
    """log p(continuation | context) from one plain forward pass over the pair's tokens."""
    context_ids, continuation_ids = evaluate.encode_pair(model.tokenizer, context, continuation)
    sequence = context_ids + continuation_ids
    logprobs = log_softmax(llama.forward(model.params, model.config, numpy.array([sequence[:-1]]))[0])
    return sum(logprobs[len(context_ids) - 1 + j, token] for j, token in enumerate(continuation_ids))


# float64 weights: the evaluator's KV-cache runs and one full forward differ only in summation order
TOLERANCE = 1e-10


def test_a_two_choice_item_scores_what_a_hand_computation_gives(tiny):
    item = MultipleChoice("Question: where sat the cat?\nAnswer:", ("on a mat", "42"), gold=0, unconditional="Answer:")
    (example,) = evaluate.evaluate_items(tiny, [item])
    expected = [by_hand(tiny, item.context, " " + choice) for choice in item.choices]
    unconditional = [by_hand(tiny, "Answer:", " " + choice) for choice in item.choices]
    numpy.testing.assert_allclose(example.details["logprobs"], expected, rtol=TOLERANCE)
    numpy.testing.assert_allclose(example.details["unconditional_logprobs"], unconditional, rtol=TOLERANCE)
    assert example.metrics == {
        "acc": float(numpy.argmax(expected) == 0),
        "acc_norm": float(numpy.argmax(numpy.array(expected) / [8, 2]) == 0),
        "acc_uncond": float(numpy.argmax(numpy.subtract(expected, unconditional)) == 0)}


def strict_argmax(values):
    """The index of the largest value, or None when it is tied (then no choice is 'the' pick)."""
    order = numpy.argsort(values)
    return None if values[order[-1]] - values[order[-2]] < 1e-9 else int(order[-1])


@given(choices=st.lists(st.tuples(st.text("abc ", min_size=1, max_size=12), st.floats(-50, 0), st.integers(1, 10),
                                  st.floats(-50, 0)), min_size=2, max_size=5),
       shift=st.floats(-20, 20))
@example(choices=[("a", -2.0, 1, -1.0), ("bbbbbbbbbb", -5.0, 3, -6.0), ("cc", -3.0, 2, -1.5)], shift=-9.0)
def test_each_normalisation_credits_exactly_the_choice_its_formula_picks(choices, shift):
    """acc: the largest log P(choice | context); acc_norm: the largest per character of the choice
    (the paper's and lm-eval's, not per token); acc_uncond: the largest log P(choice | context) -
    log P(choice | "Answer:"). Each credits the gold choice exactly when it is that one; adding one
    constant to every unconditional log-probability changes nothing."""
    texts = tuple(text for text, *_ in choices)
    scored = [Scored(logprob, n_tokens, False) for _, logprob, n_tokens, _ in choices]
    lls = numpy.array([logprob for _, logprob, _, _ in choices])
    formulas = {"acc": lls, "acc_norm": lls / [len(text) for text in texts],
                "acc_uncond": lls - [unconditional for *_, unconditional in choices]}
    for gold in range(len(choices)):
        item = MultipleChoice("x", texts, gold=gold)
        for unconditional_shift in (0.0, shift):
            unconditional = [Scored(u + unconditional_shift, 1, False) for *_, u in choices]
            metrics, _ = evaluate.multiple_choice_metrics(item, scored, unconditional)
            for name, values in formulas.items():
                pick = strict_argmax(values if name != "acc_uncond" else values - unconditional_shift)
                if pick is not None:
                    assert metrics[name] == float(pick == gold), (name, gold, values)


def replace_gold(item, gold):
    return MultipleChoice(item.context, item.choices, gold, item.unconditional)


def test_partial_scoring_scores_the_shared_continuation_after_each_filled_in_context(tiny):
    item = Partial(("the cat sat on the mat because the cat", "the cat sat on the mat because the mat"),
                   "was tired", gold=0)
    (example,) = evaluate.evaluate_items(tiny, [item])
    expected = [by_hand(tiny, context, " was tired") for context in item.contexts]
    numpy.testing.assert_allclose(example.details["logprobs"], expected, rtol=TOLERANCE)
    assert example.metrics == {"acc": float(numpy.argmax(expected) == 0)}


texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)


@given(contexts=st.lists(texts, min_size=1, max_size=4),
       continuations=st.lists(texts, min_size=1, max_size=4), data=st.data())
def test_a_shared_context_run_gives_each_pair_the_log_likelihood_of_its_own_forward_pass(
        tiny, contexts, continuations, data):
    pairs = [(data.draw(st.sampled_from(contexts)), " " + continuation) for continuation in continuations]
    got = evaluate.loglikelihoods(tiny, pairs, batch_size=data.draw(st.integers(1, 3)))
    for (context, continuation), scored in zip(pairs, got):
        context_ids, continuation_ids = evaluate.encode_pair(tiny.tokenizer, context, continuation)
        if len(context_ids) + len(continuation_ids) - 1 <= tiny.config.max_seq_len:  # no truncation
            numpy.testing.assert_allclose(scored.logprob, by_hand(tiny, context, continuation), rtol=TOLERANCE)
        assert scored.n_tokens == len(continuation_ids)


# every kind of whitespace Python's str.rstrip (and so lm-eval's `hf` model) strips: ASCII, the
# no-break and ideographic spaces, line and paragraph separators, and runs of them mixed
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2007\u200a\u2028\u2029\u202f\u205f\u3000"


@given(context=texts, trailing=st.text(alphabet=WHITESPACE, min_size=1, max_size=4),
       continuation=st.text(alphabet="abc xyz", min_size=1, max_size=6))
def test_any_trailing_whitespace_of_the_context_moves_to_the_completion(tiny, context, trailing, continuation):
    """encode_pair(x + w, c) = encode_pair(x, w + c) for any run w of whitespace, and the ids are
    those of x + w + c read whole: the context's ids, then the completion's."""
    stripped = context.rstrip()
    moved = evaluate.encode_pair(tiny.tokenizer, stripped + trailing, continuation)
    assert moved == evaluate.encode_pair(tiny.tokenizer, stripped, trailing + continuation)
    context_ids, continuation_ids = moved
    whole = tiny.tokenizer.encode(stripped + trailing + continuation, bos=tiny.tokenizer.add_bos_token)
    assert context_ids + continuation_ids == whole


def test_a_completion_longer_than_the_window_is_scored_in_half_window_chunks(tiny):
    window = tiny.config.max_seq_len  # 48: chunks of 24 completion tokens, each read after 48 tokens
    context_ids, continuation_ids = [1, 300, 301], list(range(310, 370))
    sequence = context_ids + continuation_ids
    expected = 0.0
    for start, end in [(3, 27), (27, 51), (51, 63)]:
        inputs = sequence[max(0, end - 1 - window):end - 1]
        logprobs = log_softmax(llama.forward(tiny.params, tiny.config, numpy.array([inputs]))[0])
        expected += sum(logprobs[len(inputs) - (end - start) + j, sequence[start + j]] for j in range(end - start))
    (scored,) = evaluate.token_loglikelihoods(tiny, [(context_ids, continuation_ids)])
    numpy.testing.assert_allclose(scored.logprob, expected, rtol=TOLERANCE)
    assert scored.n_tokens == 60


def windowed_by_hand(model, context_ids, continuation_ids):
    """log p(continuation | context) as the documented rule reads it, one plain forward pass a chunk:
    a completion that fits in the window W is one chunk, read after the W tokens before its last;
    a longer one is cut into chunks of W // 2 tokens, each read after the W tokens before its last."""
    window, sequence = model.config.max_seq_len, context_ids + continuation_ids
    step = len(continuation_ids) if len(continuation_ids) <= window else window // 2
    total = 0.0
    for start in range(len(context_ids), len(sequence), step):
        end = min(start + step, len(sequence))
        inputs = sequence[max(0, end - 1 - window):end - 1]
        logprobs = log_softmax(llama.forward(model.params, model.config, numpy.array([inputs]))[0])
        total += sum(logprobs[len(inputs) - (end - start) + j, sequence[start + j]] for j in range(end - start))
    return total


@given(n_context=st.integers(0, 70), n_continuation=st.integers(1, 100), seed=st.integers(0, 2**16))
@example(n_context=48, n_continuation=1, seed=0)  # BOS and 48 tokens, then one: the last input that fits whole
@example(n_context=49, n_continuation=1, seed=0)  # one more: the oldest token is dropped
@example(n_context=2, n_continuation=48, seed=0)  # a completion of exactly the window: one chunk
@example(n_context=2, n_continuation=49, seed=0)  # one more: chunks of 24
def test_a_completion_is_scored_from_the_last_window_of_tokens_before_it_whatever_the_lengths(tiny, n_context,
                                                                                         n_continuation, seed):
    """Inputs of any length, across the points where the window starts to drop tokens and where a
    completion no longer fits in one: the evaluator's batched, cached runs and its truncated ones give
    the log-likelihood of plain forward passes over the window of tokens before each chunk."""
    rng = numpy.random.default_rng(seed)
    context_ids = [1, *rng.integers(3, 512, n_context).tolist()]
    continuation_ids = rng.integers(3, 512, n_continuation).tolist()
    (scored,) = evaluate.token_loglikelihoods(tiny, [(context_ids, continuation_ids)])
    numpy.testing.assert_allclose(scored.logprob, windowed_by_hand(tiny, context_ids, continuation_ids), rtol=TOLERANCE)
    assert scored.n_tokens == n_continuation


def greedy_by_hand(model, context, n_tokens):
    """The text of up to n_tokens argmax tokens after context, one full forward pass a token."""
    return greedy_ids_by_hand(model, model.tokenizer.encode(context, bos=True), n_tokens)


def greedy_ids_by_hand(model, prompt_ids, n_tokens):
    """The text of up to n_tokens argmax tokens after prompt_ids, one full forward pass a token,
    ending at EOS or where prompt and answer fill the model's window."""
    ids = list(prompt_ids)
    for _ in range(n_tokens):
        if len(ids) == model.config.max_seq_len:
            break
        next_id = int(llama.forward(model.params, model.config, numpy.array([ids]))[0, -1].argmax())
        if next_id == model.tokenizer.eos_id:
            break
        ids.append(next_id)
    return model.tokenizer.decode(ids)[len(model.tokenizer.decode(prompt_ids)):]


long_texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=70).map(" ".join)  # up to ~3 windows


@settings(max_examples=25, deadline=None)
@given(contexts=st.lists(long_texts, min_size=1, max_size=3), max_new_tokens=st.integers(1, 60))
def test_a_greedy_answer_continues_the_last_tokens_of_its_context_that_leave_room_for_it(
        tiny, contexts, max_new_tokens):
    """Any context, shorter or (up to three times) longer than the window of 48, any answer length
    up to beyond the window: the context keeps its last max(48 - max_new_tokens, 1) tokens and the
    answer is their greedy continuation until EOS, max_new_tokens or a full window."""
    window = tiny.config.max_seq_len
    expected = []
    for context in contexts:
        ids = tiny.tokenizer.encode(context, bos=True)[-max(window - max_new_tokens, 1):]
        expected.append(greedy_ids_by_hand(tiny, ids, max_new_tokens))
    assert evaluate.greedy_until(tiny, contexts, stops=(), max_new_tokens=max_new_tokens, batch_size=2) == expected


@settings(max_examples=25, deadline=None)
@given(prompt=long_texts, max_new_tokens=st.integers(1, 60))
def test_a_sampled_continuation_at_temperature_0_fills_the_window_at_most_and_a_prompt_that_fills_it_is_refused(
        tiny, prompt, max_new_tokens):
    """npllama.generate's path: a prompt of n < 48 tokens gets up to min(max_new_tokens, 48 - n)
    new tokens, the greedy ones at temperature 0; a prompt of 48 or more is refused, naming both."""
    ids = tiny.tokenizer.encode(prompt, bos=True)
    window = tiny.config.max_seq_len
    if len(ids) >= window:
        with pytest.raises(GenerateError, match=f"the prompt is {len(ids)} tokens; the model's context is {window}"):
            generate(tiny.params, tiny.config, tiny.tokenizer, prompt, max_new_tokens, temperature=0.0, bos=True)
        return
    assert generate(tiny.params, tiny.config, tiny.tokenizer, prompt, max_new_tokens, temperature=0.0,
                    bos=True) == greedy_ids_by_hand(tiny, ids, max_new_tokens)


def test_greedy_answers_are_token_by_token_argmax_cut_at_the_first_stop(tiny):
    contexts = ["Q: the cat?\nA:", "Q: a mat?\nA:", "Q: the cat?\nA:", "Question: 42"]
    whole = [greedy_by_hand(tiny, context, 6) for context in contexts]
    assert evaluate.greedy_until(tiny, contexts, stops=(), max_new_tokens=6, batch_size=2) == whole
    stops = tuple({text[len(text) // 2] for text in whole if text})  # each answer gets cut somewhere
    expected = [text[:min((text.find(stop) for stop in stops if stop in text), default=len(text))]
                for text in whole]
    assert evaluate.greedy_until(tiny, contexts, stops=stops, max_new_tokens=6, batch_size=2) == expected
    assert any(len(cut) < len(text) for cut, text in zip(expected, whole))


@pytest.mark.parametrize("prediction, answers, expected", [
    ("The Beatles", ["beatles"], 1.0),
    ("Sunset Blvd.", ["West Sunset Boulevard", "Sunset Blvd"], 1.0),
    ("  an   apple ", ["Apple"], 1.0),
    ("U.S.A.", ["usa"], 1.0),
    ("1,000", ["1000"], 1.0),
    ("Theatre", ["atre"], 0.0),  # articles go only as whole words
    ("cats", ["cat"], 0.0),
    ("", ["a"], 0.0),  # both normalise to nothing, but a blank answer answers nothing
    (" ", [""], 0.0),
    ("+-*/", ["+-*/"], 1.0),  # a gold answer that normalises to nothing is matched only by itself
    ("?", ["+-*/"], 0.0),
    ("Paris, France", ["Paris"], 0.0),
])
def test_exact_match_lowercases_and_drops_punctuation_articles_and_extra_spaces(prediction, answers, expected):
    assert evaluate.exact_match(prediction, answers) == expected


answer_words = st.lists(st.sampled_from(["The", "a", "Beatles", "an", "apple", "U.S.", "1,000", "rock'n'roll", "Paris",
                                         "theatre", "x"]), min_size=1, max_size=5)


@given(words=answer_words, gaps=st.lists(st.text(alphabet=WHITESPACE, min_size=1, max_size=3), min_size=5, max_size=5),
       edges=st.tuples(st.text(alphabet=WHITESPACE + "!?.,;:", max_size=3), st.text(alphabet=WHITESPACE + "!?.,;:",
                                                                                       max_size=3)),
       upper=st.booleans())
def test_an_answer_matches_itself_written_with_any_runs_of_whitespace_punctuation_around_and_any_case(
        words, gaps, edges, upper):
    """Between words, any run of any whitespace counts as one space; punctuation before and after,
    and the case of the letters, do not count; and normalising twice changes nothing."""
    gold = " ".join(words)
    written = edges[0] + words[0] + "".join(gap + word for gap, word in zip(gaps, words[1:])) + edges[1]
    written = written.upper() if upper else written
    assert evaluate.normalize_answer(written.strip()) == evaluate.normalize_answer(gold)
    assert evaluate.normalize_answer(evaluate.normalize_answer(gold)) == evaluate.normalize_answer(gold)
    if evaluate.normalize_answer(gold):  # an answer of articles alone normalises to nothing
        assert evaluate.exact_match(written, [gold]) == 1.0


items = st.lists(st.integers(0, 50), min_size=1, max_size=10, unique=True).map(
    lambda numbers: [Generation(f"Q: {n}?\nA:", (str(n),)) for n in numbers])


@given(evaluated=items, pool=items, shots=st.integers(0, 4), seed=st.integers(0, 2**32 - 1))
def test_few_shot_prompts_draw_from_the_pool_and_never_show_an_item_its_own_answer(evaluated, pool, shots, seed):
    available = min(len(pool) - (item in pool) for item in evaluated)
    if shots > available:
        with pytest.raises(evaluate.EvaluationError, match="ask for at most"):
            evaluate.few_shot_prompts(evaluated, pool, shots, seed)
        return
    prompted = evaluate.few_shot_prompts(evaluated, pool, shots, seed, description="Answer these questions:\n",
                                         separator="\n")
    assert prompted == evaluate.few_shot_prompts(evaluated, pool, shots, seed, "Answer these questions:\n", "\n")
    for item, prompt in zip(evaluated, prompted):
        assert prompt.context.startswith("Answer these questions:\n") and prompt.context.endswith(item.context)
        shown = prompt.context[len("Answer these questions:\n"):-len(item.context)].split("\n")[:-1]
        pairs = ["\n".join(shown[i:i + 2]) for i in range(0, len(shown), 2)]
        assert len(pairs) == shots and len(set(pairs)) == shots
        assert all(pair in {shot.shot() for shot in pool} for pair in pairs)
        assert item.shot() not in pairs


@pytest.mark.parametrize("seed", range(5))
def test_an_item_that_is_also_in_the_pool_is_never_its_own_shot(seed):
    item, other = Generation("Q: 1?\nA:", ("1",)), Generation("Q: 2?\nA:", ("2",))
    (prompted,) = evaluate.few_shot_prompts([item], [item, other], 1, seed)
    assert prompted.context == "Q: 2?\nA: 2\n\nQ: 1?\nA:"


def test_the_gpt3_join_puts_each_shot_with_its_answer_before_the_question():
    pool = [MultipleChoice("Question: 1+1?\nAnswer:", ("2", "3"), 0)]
    (prompted,) = evaluate.few_shot_prompts([MultipleChoice("Question: 2+2?\nAnswer:", ("4", "5"), 0)], pool, 1)
    assert prompted.context == "Question: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer:"
    winogrande = Partial(("Ann beat Bo, so Ann", "Ann beat Bo, so Bo"), "won.", 0)
    (prompted,) = evaluate.few_shot_prompts([winogrande], [Partial(("X or Y", "X or Z"), "is it.", 1)], 1)
    assert prompted.contexts == ("X or Z is it.\n\nAnn beat Bo, so Ann", "X or Z is it.\n\nAnn beat Bo, so Bo")


def test_the_standard_error_is_the_sample_deviation_over_root_n():
    assert evaluate.mean_and_stderr([1, 0, 1, 0]) == pytest.approx((0.5, numpy.std([1, 0, 1, 0], ddof=1) / 2))
    assert evaluate.mean_and_stderr([1.0]) == (1.0, 0.0)


class LettersWithoutBos:
    """A byte-level-BPE-like tokenizer that adds no BOS (SmolLM2's): one id per letter, EOS = 0."""

    add_bos_token, bos_id, eos_id = False, -1, 0

    def encode(self, text, bos=False):
        assert not bos
        return [1 + ord(c) % 50 for c in text]


def test_without_bos_the_context_is_its_own_tokens_and_an_empty_one_is_eos_as_in_lm_eval():
    tokenizer = LettersWithoutBos()
    assert evaluate.encode_pair(tokenizer, "ab ", "cd") == ([1 + ord("a") % 50, 1 + ord("b") % 50],
                                                          [1 + ord(c) % 50 for c in " cd"])
    assert evaluate.encode_pair(tokenizer, "", "cd") == ([0], [1 + ord(c) % 50 for c in "cd"])
