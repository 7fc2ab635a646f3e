"""Reading torch.save files without torch and without running their pickles: the tensors torch
wrote come back exactly, and a file whose pickle would run code is refused before it runs."""

import math
import os
import pickle
import sys
import zipfile
from pathlib import Path

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --- files from strangers: no state kept between loads, memory bounded by the file, one line ---------

def storage_pickle(storage: bytes, numel: int, size: tuple, stride: tuple, offset: int = 0,
                   storage_type: bytes = b"FloatStorage") -> bytes:
    """data.pkl of {"w": a tensor of `size`/`stride` at `offset` viewing storage "0" of `numel` elements,
    written opcode by opcode as torch.save writes it (protocol 2), so any size or stride can be declared."""
    def ints(values):
        return b"(" + b"".join(b"J" + int(v).to_bytes(4, "little", signed=True) if abs(v) < 2**31
                              else b"\x8a\x08" + int(v).to_bytes(8, "little", signed=True) for v in values) + b"t"
    persistent = (b"(X\x07\x00\x00\x00storagec" + b"torch\n" + storage_type
                  + b"\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu" + b"J" + numel.to_bytes(4, "little") + b"tQ")
    return (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(" + persistent
            + b"J" + offset.to_bytes(4, "little") + ints(size) + ints(stride) + b"\x89ccollections\nOrderedDict\n)R"
            + b"tRs.")


def write_pth(path, payload: bytes, storage: bytes, compression=zipfile.ZIP_STORED, byteorder="little"):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", byteorder)
        archive.writestr("archive/version", "3\n")
        archive.writestr(zipfile.ZipInfo("archive/data/0"), storage, compress_type=compression)
    return path


def test_the_hand_written_pickle_is_what_torch_reads(tmp_path):
    """The helper above writes real torch files: torch itself loads them as the tensors declared."""
    path = write_pth(tmp_path / "w.pth", storage_pickle(b"", 6, (2, 3), (3, 1)), numpy.arange(6, dtype="<f4").tobytes())
    assert torch.load(path, weights_only=True)["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert read_pth(path)["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


# storage class -> (NumPy dtype of its elements, torch dtype), for the property below
STORAGES = {"FloatStorage": ("f4", torch.float32), "DoubleStorage": ("f8", torch.float64),
            "HalfStorage": ("f2", torch.float16), "BFloat16Storage": ("u2", torch.bfloat16),
            "LongStorage": ("i8", torch.int64), "IntStorage": ("i4", torch.int32), "ShortStorage": ("i2", torch.int16),
            "CharStorage": ("i1", torch.int8), "ByteStorage": ("u1", torch.uint8), "BoolStorage": ("?", torch.bool)}


@st.composite
def storage_views(draw):
    """A view (offset, size, stride) of a storage of `numel` elements, and `reach`: the storage
    elements it needs (offset + 1 + its last element's distance), which numel may exactly equal.
    A storage never holds fewer elements than its view (npllama's bound on memory, not torch's)."""
    size = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    stride = tuple(draw(st.lists(st.integers(0, 6), min_size=len(size), max_size=len(size))))
    offset = draw(st.integers(0, 9))
    reach = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride)) if math.prod(size) else 0
    return offset, size, stride, max(reach + draw(st.integers(0, 3)), math.prod(size)), reach


@settings(max_examples=60, deadline=None)
@given(storage_type=st.sampled_from(sorted(STORAGES)), byteorder=st.sampled_from(["little", "big"]),
       view=storage_views(), seed=st.integers(0, 2**16))
def test_any_view_of_any_storage_in_either_byte_order_reads_as_torch_reads_it(tmp_path_factory, storage_type,
                                                                             byteorder, view, seed):
    """Files this machine's torch.save never writes: big-endian storages, views at any offset with
    any strides (repeating elements with stride 0), views ending exactly at the storage's last
    element. torch.load is the oracle; bfloat16 compares widened to float32, bit for bit."""
    offset, size, stride, numel, reach = view
    kind, torch_dtype = STORAGES[storage_type]
    rng = numpy.random.default_rng(seed)
    if kind in ("f4", "f8", "f2"):
        values = (rng.standard_normal(numel) * 100).astype(kind)
    elif kind == "u2":  # bfloat16 patterns of finite numbers: the upper halves of float32s
        values = (rng.standard_normal(numel).astype("<f4").view("<u4") >> 16).astype("u2")
    elif kind == "?":
        values = rng.integers(0, 2, numel).astype("?")
    else:
        info = numpy.iinfo(kind)
        values = rng.integers(info.min, info.max, numel, endpoint=True).astype(kind)
    storage = values.astype(numpy.dtype(kind).newbyteorder("<" if byteorder == "little" else ">")).tobytes()
    folder = tmp_path_factory.mktemp("view")
    path = write_pth(folder / "w.pth", storage_pickle(b"", numel, size, stride, offset, storage_type.encode()),
                     storage, byteorder=byteorder)
    expected = torch.load(path, weights_only=True)["w"]
    expected = (expected.float() if torch_dtype == torch.bfloat16 else expected).numpy()
    read = read_pth(path)["w"]
    assert read.shape == expected.shape and read.dtype == expected.dtype
    assert read.tobytes() == numpy.ascontiguousarray(expected).tobytes()
    if numel == reach and numel - 1 >= math.prod(size):  # the view ends at the storage's last element: one
        # element fewer, and the same view reads past the end
        short = write_pth(folder / "short.pth", storage_pickle(b"", numel - 1, size, stride, offset,
                                                              storage_type.encode()),
                          storage[:len(storage) - values.itemsize], byteorder=byteorder)
        assert "reads past its storage" in one_line_refusal(short)


def test_a_refused_file_cannot_change_what_the_next_load_reads(tmp_path):
    """A BUILD on a stand-in the pickle named (torch.FloatStorage's) sets its attributes; the
    stand-ins are made afresh for each load, so the next file's float32 tensor stays float32."""
    rewrites = tmp_path / "rewrites.pth"
    write_torch_like_zip(rewrites, b"\x80\x02ctorch\nFloatStorage\n}X\x04\x00\x00\x00nameX\x0a\x00\x00\x00IntStorages"
                                   b"b0ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__defaults__"
                                   b"(J\x07\x00\x00\x00tsb0N.")
    try:
        read_pth(rewrites)
    except PthError:
        pass
    good = tmp_path / "good.pth"
    torch.save({"norm": torch.full((3,), 1.5)}, good)
    read = read_pth(good)["norm"]
    assert read.dtype == numpy.float32 and read.tolist() == [1.5, 1.5, 1.5]


def one_line_refusal(path) -> str:
    with pytest.raises(PthError) as refused:
        read_pth(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


def test_a_view_of_more_elements_than_its_storage_is_refused_before_it_is_made(tmp_path):
    """A 559-byte file declaring a 16384 x 16384 view (stride 0) of a 4-element storage."""
    path = write_pth(tmp_path / "w.pth", storage_pickle(b"", 4, (16384, 16384), (0, 0)), bytes(16))
    assert "views 268435456 elements of a storage of 4" in one_line_refusal(path)


@pytest.mark.parametrize("size, stride, offset", [
    ((2, 2), (2**62, 1), 0), ((2,), (1,), 2**31 - 1), ((2, -1), (1, 1), 0),
], ids=["huge-stride", "offset-past-the-end", "negative-size"])
def test_sizes_strides_and_offsets_outside_the_storage_are_one_line(tmp_path, size, stride, offset):
    path = write_pth(tmp_path / "w.pth", storage_pickle(b"", 4, size, stride, offset), bytes(16))
    assert "refused: a tensor" in one_line_refusal(path)


def test_an_empty_tensor_with_huge_strides_is_an_empty_array(tmp_path):
    path = write_pth(tmp_path / "w.pth", storage_pickle(b"", 4, (0, 2), (2**62, 2**62)), bytes(16))
    assert read_pth(path)["w"].shape == (0, 2)


def test_a_compressed_storage_is_refused_without_inflating_it(tmp_path):
    """torch.save stores storages uncompressed; a deflated one is what a zip bomb is made of. Its
    256 MiB of zeros are never inflated: the loading process stays small (measured in a child)."""
    numel = 64 * 2**20
    path = write_pth(tmp_path / "bomb.pth", storage_pickle(b"", numel, (numel,), (1,)), bytes(4 * numel),
                     zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 2**20
    # VmHWM, the peak resident memory of this process image (ru_maxrss would keep the parent's peak
    # across the fork and exec)
    code = ("import re, sys; from npllama.convert.pth import read_pth, PthError\n"
            "try:\n    read_pth(sys.argv[1])\nexcept PthError as error:\n    print(error)\n"
            "status = open('/proc/self/status').read()\n"
            "print(int(re.search(r'VmHWM:\\s*(\\d+) kB', status).group(1)) // 1024)")
    import subprocess

    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    message, peak_mib = result.stdout.splitlines()
    assert "storage 0 is compressed, which torch.save never does" in message
    assert int(peak_mib) < 200, peak_mib  # Python and NumPy take ~40 MiB; the storage would take 256


def damaged(tmp_path, change) -> Path:
    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(64)}, path)
    data = bytearray(path.read_bytes())
    change(data)
    path.write_bytes(bytes(data))
    return path


def flip_a_storage_byte(data):
    at = data.index(numpy.ones(4, "<f4").tobytes())
    data[at] ^= 0xFF


def unknown_compression(data):
    for header in (b"PK\x03\x04", b"PK\x01\x02"):  # local and central headers: the method field
        at = data.index(header)
        while at >= 0:
            offset = at + (8 if header == b"PK\x03\x04" else 10)
            data[offset:offset + 2] = (99).to_bytes(2, "little")
            at = data.find(header, at + 4)


def encrypted(data):
    for header, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(header)
        while at >= 0:
            data[at + flag_at] |= 1
            at = data.find(header, at + 4)


@pytest.mark.parametrize("change, expected", [
    (flip_a_storage_byte, "Bad CRC-32"), (unknown_compression, "compress"), (encrypted, "encrypted"),
], ids=["bad-crc", "unknown-compression", "encrypted"])
def test_a_damaged_archive_is_one_line(tmp_path, change, expected):
    assert expected in one_line_refusal(damaged(tmp_path, change))


@pytest.mark.parametrize("make", [os.mkfifo, os.mkdir], ids=["FIFO", "folder"])
def test_a_fifo_or_folder_named_like_a_shard_is_named_for_what_it_is_and_never_opened(tmp_path, make):
    path = tmp_path / "consolidated.00.pth"
    make(path)
    message = one_line_refusal(path)
    assert ("a FIFO" if make is os.mkfifo else "a folder") in message


def test_a_local_file_name_that_is_not_utf8_is_one_line(tmp_path):
    """torch.save marks names UTF-8; a damaged byte in a local header's name (the central directory
    intact) fails only when the entry is read (found by tests/test_fuzz_files.py)."""
    path = damaged(tmp_path, lambda data: data.__setitem__(data.index(b"data.pkl") + 7, 0x80))
    assert "a damaged zip archive" in one_line_refusal(path)
