"""Reading PyTorch `.pth` checkpoints (Meta's `consolidated.NN.pth`) without torch and without
running any code they hold.

A `.pth` written by `torch.save` (PyTorch 1.6 and later) is a zip archive:

    <root>/data.pkl        a pickle of the object saved (for a state dict: names -> tensors)
    <root>/data/<key>      the raw bytes of each storage the tensors view
    <root>/byteorder       "little" or "big" (absent in older files: little)

A pickle is a program: loading one with `pickle.load` (or `torch.load(weights_only=False)`) can
call any function it names, `os.system` included. This module unpickles with a restricted
unpickler that can name exactly five things: `collections.OrderedDict`, torch's two tensor
rebuilders (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`), and the typed storage classes
(`torch.FloatStorage`, ...), each replaced by a stand-in of ours that builds a NumPy array. Any other
name refuses the file before anything is called. The stand-ins are made afresh for each load, so
nothing a pickle does to them (BUILD sets attributes) outlives that load or changes the next.

Memory is bounded by the file: storages must be stored uncompressed, as torch.save writes them
(so a small file cannot inflate), each is read by key with its size checked against what its
tensors declare, a tensor may not view more elements than its storage holds, and all the tensors
together may not hold more than twice the file's bytes (two names sharing one storage, as tied
weights do, take twice). Offsets, sizes and strides are checked as Python integers before any
array is made. A damaged archive (a bad CRC, an unknown compression, an encrypted entry) is a
one-line error too.

bfloat16 has no NumPy dtype: its storages are read as their 16-bit patterns and widened to
float32 exactly (a bfloat16 is the upper half of a float32).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy

from ..errors import NpllamaError
from ..files import regular_file_problem

MAX_PICKLE_BYTES = 64 * 2**20  # data.pkl holds names and shapes, never the weights themselves

# torch's typed storage classes, as the pickle names them, and the NumPy dtype of their elements
STORAGE_DTYPES = {
    "DoubleStorage": numpy.float64, "FloatStorage": numpy.float32, "HalfStorage": numpy.float16,
    "BFloat16Storage": numpy.uint16,  # read as bit patterns, widened to float32 below
    "LongStorage": numpy.int64, "IntStorage": numpy.int32, "ShortStorage": numpy.int16,
    "CharStorage": numpy.int8, "ByteStorage": numpy.uint8, "BoolStorage": numpy.bool_,
}


class PthError(NpllamaError):
    """A .pth file that cannot be read safely or correctly, in one line: which file, what, what to do."""

    def __init__(self, path, problem: str, fix: str = "re-save it with torch.save from a state dict of tensors"):
        super().__init__(f"{path}: {problem}; {fix}")


@dataclass(frozen=True)
class _StorageType:
    """Stands in for torch.FloatStorage and its kin inside the pickle."""

    name: str


@dataclass(frozen=True)
class _Storage:
    """One storage's elements, read from the archive (bfloat16 still as 16-bit patterns)."""

    elements: numpy.ndarray
    bfloat16: bool


def _rebuild_tensor(storage, storage_offset, size, stride, budget: list[int]):
    """torch._utils._rebuild_tensor_v2: a view of `storage` (offset, size, stride in elements), copied.
    `budget` holds the bytes the load may still materialise; the copy is taken from it."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage of the archive")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"a tensor with size {size!r:.60} and stride {stride!r:.60}")
    size, stride = tuple(size), tuple(stride)
    if not all(type(n) is int and n >= 0 for n in (storage_offset, *size, *stride)):
        raise pickle.UnpicklingError(f"a tensor with offset {storage_offset!r:.40}, size {size!r:.60} and stride "
                                     f"{stride!r:.60}")
    numel = math.prod(size)
    if numel:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.elements.size:
            raise pickle.UnpicklingError(f"a tensor of size {size} reads past its storage of "
                                         f"{storage.elements.size} elements")
    if numel > storage.elements.size:
        raise pickle.UnpicklingError(f"a tensor of size {size} views {numel} elements of a storage of "
                                     f"{storage.elements.size} (strides {stride} that repeat elements)")
    itemsize = storage.elements.itemsize
    if numel * itemsize > budget[0]:
        raise pickle.UnpicklingError("its tensors would take more than twice the file's size")
    budget[0] -= numel * itemsize
    if not numel:
        stride = (0,) * len(size)
    view = numpy.lib.stride_tricks.as_strided(storage.elements[storage_offset:], shape=size,
                                              strides=[s * itemsize for s in stride], writeable=False)
    array = numpy.array(view)  # a contiguous copy: it outlives the archive
    if storage.bfloat16:
        array = widen_bfloat16(array)
    return array


def widen_bfloat16(bits: numpy.ndarray) -> numpy.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: a bfloat16 is the upper half of a float32."""
    return (bits.astype(numpy.uint32) << 16).view(numpy.float32)


def _allowed(budget: list[int]) -> dict:
    """What the pickle may name, made afresh for one load: a pickle can set attributes of what it
    names (BUILD), and nothing of one load may reach another. OrderedDict is a built-in type,
    which refuses new attributes."""
    def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                          metadata=None):
        return _rebuild_tensor(storage, storage_offset, size, stride, budget)

    def rebuild_parameter(data, requires_grad=False, backward_hooks=None):
        return data  # torch._utils._rebuild_parameter: an nn.Parameter is its tensor

    return {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
    }


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Unpickles a state dict: the names `_allowed` gives, and nothing else, can be called."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, byteorder: str, budget: int):
        super().__init__(io.BytesIO(data))
        self.archive, self.root, self.byteorder = archive, root, byteorder
        self.storages: dict[str, _Storage] = {}
        self.allowed = _allowed([budget])

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a file of tensors never needs "
                                         "(a pickle that would run code)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and pid[1].name in STORAGE_DTYPES
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"an unknown persistent reference {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            self.storages[key] = self._read_storage(storage_type.name, key, numel)
        return self.storages[key]

    def _read_storage(self, type_name: str, key: str, numel: int) -> _Storage:
        dtype = numpy.dtype(STORAGE_DTYPES[type_name]).newbyteorder("<" if self.byteorder == "little" else ">")
        entry = f"{self.root}data/{key}"
        try:
            info = self.archive.getinfo(entry)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key} is missing from the archive ({entry})") from None
        if info.file_size != numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} holds {info.file_size} bytes, not the "
                                         f"{numel} x {dtype.itemsize} its tensors expect")
        if info.compress_type != zipfile.ZIP_STORED:
            raise pickle.UnpicklingError(f"storage {key} is compressed, which torch.save never does")
        elements = numpy.frombuffer(self.archive.read(entry), dtype=dtype).astype(dtype.newbyteorder("="))
        return _Storage(elements, bfloat16=type_name == "BFloat16Storage")


def read_pth(path) -> Any:
    """The object a `torch.save` file holds (a state dict: names -> NumPy arrays), read without torch.

    Raises PthError, naming the file, for anything but a zip-format torch file of tensors: a legacy
    (pre-1.6) file, a pickle that names anything beyond tensors and their storages, a missing or
    short storage, a tensor that reads outside its storage.
    """
    path = Path(path)
    problem = regular_file_problem(path)
    if problem is not None:
        raise PthError(path, problem, "pass Meta's consolidated.NN.pth files")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise PthError(path, "not a zip archive (a torch.save file from PyTorch before 1.6, or not one at all)",
                       "re-save it with torch.save from PyTorch 1.6 or later") from None
    except OSError as error:
        raise PthError(path, f"cannot be read ({error.strerror or error})", "check the path") from None
    except (ValueError, NotImplementedError, RuntimeError, EOFError) as error:
        raise PthError(path, f"a damaged zip archive ({_one_line(error)})") from None
    with archive:
        try:
            return _read_archive(path, archive)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, OSError,
                UnicodeDecodeError) as error:  # bad CRC, compression, encryption, a file cut short, a bad name
            raise PthError(path, f"a damaged zip archive ({_one_line(error)})") from None


def _read_archive(path: Path, archive: zipfile.ZipFile):
    """read_pth's work inside the opened archive."""
    pickles = [name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise PthError(path, f"a zip archive with {len(pickles)} data.pkl entries, not a torch.save file")
    root = pickles[0][: -len("data.pkl")]
    if archive.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
        raise PthError(path, f"its data.pkl is larger than {MAX_PICKLE_BYTES >> 20} MiB")
    byteorder = "little"
    if f"{root}byteorder" in archive.namelist():
        if archive.getinfo(f"{root}byteorder").file_size > 16:
            raise PthError(path, "its byteorder entry is not 'little' or 'big'")
        byteorder = archive.read(f"{root}byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise PthError(path, f"byteorder {byteorder!r}")
    budget = 2 * path.stat().st_size
    unpickler = _TensorsOnlyUnpickler(archive.read(pickles[0]), archive, root, byteorder, budget)
    try:
        return unpickler.load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError) as error:
        raise PthError(path, f"refused: {_one_line(error)}") from None


def _one_line(error) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__
