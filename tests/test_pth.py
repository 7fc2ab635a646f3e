"""Reading torch.save files without torch and without running their pickles: the tensors torch
wrote come back exactly, and a file whose pickle would run code is refused before it runs."""

import os
import pickle
import sys
import zipfile

import numpy
import pytest

from npllama.convert.pth import PthError, read_pth

torch = pytest.importorskip("torch", reason="torch writes the files read here: pip install '.[test]'")


def test_a_state_dict_saved_by_torch_reads_back_exactly_in_every_dtype_and_layout(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=generator)
    state = {
        "float32": base,
        "float16": base.half(),
        "bfloat16": base.bfloat16(),
        "float64": base.double(),
        "int64": torch.arange(7),
        "transposed": base.t(),  # strides (1, 5): not contiguous
        "row_slice": base[2:4],  # a storage offset, sharing base's storage
        "parameter": torch.nn.Parameter(base[:, :2].clone()),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "consolidated.00.pth"
    torch.save(state, path)
    read = read_pth(path)
    assert list(read) == list(state)
    for name, tensor in state.items():
        expected = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
        assert read[name].shape == expected.shape and read[name].dtype == expected.dtype, name
        assert read[name].tobytes() == numpy.ascontiguousarray(expected).tobytes(), name  # bit for bit


class RunsCode:
    """A pickle that calls os.system when loaded: what a malicious checkpoint holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_torch_like_zip(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize("make_payload", [
    lambda marker: pickle.dumps({"tok_embeddings.weight": RunsCode(marker)}, protocol=2),
    lambda marker: pickle.dumps(RunsCode(marker), protocol=2),
    lambda marker: b"cbuiltins\nexec\n(Vopen(%r, 'w').close()\ntR." % str(marker).encode(),
], ids=["inside-a-state-dict", "at-the-root", "builtins-exec"])
def test_a_pth_whose_pickle_would_run_code_is_refused_and_the_code_does_not_run(tmp_path, make_payload):
    marker = tmp_path / "the-code-ran"
    path = tmp_path / "consolidated.00.pth"
    write_torch_like_zip(path, make_payload(marker))
    with pytest.raises(PthError) as refused:
        read_pth(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: refused: it names ") and "\n" not in message
    assert "(a pickle that would run code)" in message
    assert not marker.exists()


def test_the_same_file_loaded_with_plain_pickle_would_have_run_the_code(tmp_path):
    """The refusal above is not vacuous: the payload does run when unpickled without restriction."""
    marker = tmp_path / "the-code-ran"
    pickle.loads(pickle.dumps(RunsCode(marker), protocol=2))
    assert marker.exists()


def test_a_storage_shorter_than_its_tensor_is_refused_naming_it(tmp_path):
    path = tmp_path / "short.pth"
    torch.save({"w": torch.ones(4, 4)}, path)
    truncated = tmp_path / "truncated.pth"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(truncated, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, data[:8] if "/data/" in item.filename else data)
    with pytest.raises(PthError, match=r"truncated.pth: refused: storage 0 holds 8 bytes, not the 16 x 4"):
        read_pth(truncated)


@pytest.mark.parametrize("content, problem", [
    (b"\x80\x02}q\x00.", "not a zip archive"),
    (b"", "not a zip archive"),
])
def test_a_file_that_is_not_a_torch_zip_is_refused_in_one_line(tmp_path, content, problem):
    path = tmp_path / "old.pth"
    path.write_bytes(content)
    with pytest.raises(PthError, match=problem) as refused:
        read_pth(path)
    assert "\n" not in str(refused.value)


def test_npllama_reads_pth_files_without_importing_torch(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(2)}, path)
    code = ("import sys; from npllama.convert.pth import read_pth; "
            f"assert read_pth({str(path)!r})['w'].tolist() == [1.0, 1.0]; assert 'torch' not in sys.modules")
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
