"""Fuzzing the readers of files from strangers: Hypothesis damages valid files (truncates them, flips
bytes, splices bytes in, overwrites 8 bytes with a huge little-endian number where a size or offset
may be, nests JSON deeply, swaps a JSON value for another kind) and every reader must keep its
promise on every example: a correct load, or one line (an NpllamaError); never another exception,
never more memory than the bound (NumPy's allocations are traced by tracemalloc), never a hang
(an alarm ends an example after 10 s).

Examples per reader: FUZZ_EXAMPLES (the `ci` profile's run takes a few seconds per reader).
"""

import json
import signal
import tracemalloc
import zipfile

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TASK_FIXTURES
from npllama.convert.hf import import_hf, read_safetensors
from npllama.convert.pth import read_pth
from npllama.errors import NpllamaError
from npllama.eval.tasks import load_task
from npllama.model import LlamaConfig

FUZZ_EXAMPLES = 60
MEMORY_LIMIT = 64 * 2**20  # bytes; every valid file here is under 100 KB and loads in under 1 MiB
SECONDS = 10
CONFIG = LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=32, hidden_dim=32, max_seq_len=32)
fuzzing = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Hung(Exception):
    pass


def keeps_the_promise(read) -> None:
    """`read()` loads or raises a one-line NpllamaError, within MEMORY_LIMIT and SECONDS."""
    def alarm(signum, frame):
        raise Hung(f"still reading after {SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    tracemalloc.start()
    signal.alarm(SECONDS)
    try:
        read()
    except NpllamaError as error:
        assert "\n" not in str(error), str(error)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= MEMORY_LIMIT, f"peak {peak:,} bytes"


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """`data` after one to three damages."""
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["truncate", "flip", "splice", "inflate"]))
        if kind == "truncate":
            data = data[:at]
        elif kind == "flip":
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:] if data else data
        elif kind == "splice":
            data = data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
        else:
            huge = draw(st.sampled_from([2**31 - 1, 2**32, 2**40, 2**62, 2**64 - 1]))
            data = data[:at] + huge.to_bytes(8, "little") + data[at + 8:]
    return data


@pytest.fixture(scope="module")
def pth_bytes(tmp_path_factory) -> bytes:
    torch = pytest.importorskip("torch", reason="torch writes the .pth files fuzzed here: pip install '.[test]'")
    path = tmp_path_factory.mktemp("pth") / "consolidated.00.pth"
    generator = torch.Generator().manual_seed(0)
    torch.save({"w": torch.randn(8, 4, generator=generator), "b": torch.randn(8, generator=generator).half(),
                "view": torch.arange(12.0)[2:8]}, path)
    return path.read_bytes()


@fuzzing
@given(data=st.data())
def test_a_damaged_pth_file_loads_or_is_refused_in_one_line(tmp_path, pth_bytes, data):
    path = tmp_path / "consolidated.00.pth"
    path.write_bytes(data.draw(damaged(pth_bytes)))
    keeps_the_promise(lambda: read_pth(path))


@fuzzing
@given(data=st.data())
def test_a_pth_file_with_a_damaged_pickle_loads_or_is_refused_in_one_line(tmp_path, pth_bytes, data):
    """The archive stays valid; only data.pkl, the program the unpickler runs, is damaged."""
    source, path = tmp_path / "source.pth", tmp_path / "consolidated.00.pth"
    source.write_bytes(pth_bytes)
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w") as copy:
        for item in original.infolist():
            content = original.read(item)
            copy.writestr(item, data.draw(damaged(content)) if item.filename.endswith("data.pkl") else content)
    keeps_the_promise(lambda: read_pth(path))


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory) -> bytes:
    from safetensors.numpy import save_file

    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    rng = numpy.random.default_rng(0)
    save_file({"a": rng.standard_normal((8, 4)).astype(numpy.float32), "b": numpy.ones(3, numpy.float16)}, str(path))
    return path.read_bytes()


@fuzzing
@given(data=st.data())
def test_a_damaged_safetensors_file_loads_or_is_refused_in_one_line(tmp_path, safetensors_bytes, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data.draw(damaged(safetensors_bytes)))
    keeps_the_promise(lambda: read_safetensors(path))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=3), max_leaves=8)


@st.composite
def damaged_json(draw, document: dict) -> str:
    """A JSON document with one field's value replaced (by any JSON value, or one nested 10^4 deep),
    or its text damaged."""
    kind = draw(st.sampled_from(["value", "deep", "text"]))
    if kind == "text":
        return draw(damaged(json.dumps(document).encode())).decode("utf-8", "surrogateescape")
    field = draw(st.sampled_from(sorted(document)))
    value = draw(json_values) if kind == "value" else "NESTED"
    text = json.dumps({**document, field: value}, allow_nan=True)
    return text.replace('"NESTED"', "[" * 10_000 + "]" * 10_000)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from npllama import model as llama
    from npllama.convert.hf import export_hf

    folder = export_hf(tmp_path_factory.mktemp("hf") / "model", CONFIG, llama.init_params(CONFIG, seed=0))
    return folder, json.loads((folder / "config.json").read_text())


@fuzzing
@given(data=st.data())
def test_a_damaged_config_json_loads_or_is_refused_in_one_line(hf_model, data):
    folder, config = hf_model
    (folder / "config.json").write_text(data.draw(damaged_json(config)), errors="surrogateescape")
    keeps_the_promise(lambda: import_hf(folder))


@pytest.fixture(scope="module")
def task_lines() -> list[str]:
    return (TASK_FIXTURES / "arc_easy" / "validation.jsonl").read_text().splitlines()[:5]


@fuzzing
@given(data=st.data())
def test_a_damaged_task_file_loads_or_is_refused_in_one_line(tmp_path, task_lines, data):
    line = data.draw(st.integers(0, len(task_lines) - 1))
    local = {"context": "Question: 2+2?\nAnswer:", "choices": ["4", "5"], "gold": 0}
    lines = [json.dumps(local)] * 3
    lines[line % 3] = data.draw(damaged_json(local))
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n", errors="surrogateescape")
    keeps_the_promise(lambda: load_task(str(path)))
