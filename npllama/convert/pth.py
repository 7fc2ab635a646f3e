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
name refuses the file before anything is called. Storages are read from the archive by key, with
their sizes checked against what the tensors view.

bfloat16 has no NumPy dtype: its storages are read as their 16-bit patterns and widened to
float32 exactly (a bfloat16 is the upper half of a float32).
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy

from ..errors import NpllamaError

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


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2: a view of `storage` (offset, size, stride in elements), copied."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage of the archive")
    size, stride = tuple(size), tuple(stride)
    if not all(isinstance(n, int) and n >= 0 for n in (storage_offset, *size, *stride)) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"a tensor with offset {storage_offset}, size {size} and stride {stride}")
    if all(size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.elements.size:
            raise pickle.UnpicklingError(f"a tensor of size {size} reads past its storage of "
                                         f"{storage.elements.size} elements")
    itemsize = storage.elements.itemsize
    view = numpy.lib.stride_tricks.as_strided(storage.elements[storage_offset:], shape=size,
                                              strides=[s * itemsize for s in stride], writeable=False)
    array = numpy.array(view)  # a contiguous copy: it outlives the archive
    if storage.bfloat16:
        array = widen_bfloat16(array)
    return array


def widen_bfloat16(bits: numpy.ndarray) -> numpy.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: a bfloat16 is the upper half of a float32."""
    return (bits.astype(numpy.uint32) << 16).view(numpy.float32)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter: an nn.Parameter is its tensor."""
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Unpickles a state dict: the names in _ALLOWED, and nothing else, can be called."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.root, self.byteorder = archive, root, byteorder
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a file of tensors never needs "
                                         "(a pickle that would run code)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
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
        elements = numpy.frombuffer(self.archive.read(entry), dtype=dtype).astype(dtype.newbyteorder("="))
        return _Storage(elements, bfloat16=type_name == "BFloat16Storage")


def read_pth(path) -> Any:
    """The object a `torch.save` file holds (a state dict: names -> NumPy arrays), read without torch.

    Raises PthError, naming the file, for anything but a zip-format torch file of tensors: a legacy
    (pre-1.6) file, a pickle that names anything beyond tensors and their storages, a missing or
    short storage, a tensor that reads outside its storage.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise PthError(path, "not a zip archive (a torch.save file from PyTorch before 1.6, or not one at all)",
                       "re-save it with torch.save from PyTorch 1.6 or later") from None
    except OSError as error:
        raise PthError(path, f"cannot be read ({error.strerror or error})", "check the path") from None
    with archive:
        pickles = [name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise PthError(path, f"a zip archive with {len(pickles)} data.pkl entries, not a torch.save file")
        root = pickles[0][: -len("data.pkl")]
        if archive.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
            raise PthError(path, f"its data.pkl is larger than {MAX_PICKLE_BYTES >> 20} MiB")
        byteorder = "little"
        if f"{root}byteorder" in archive.namelist():
            byteorder = archive.read(f"{root}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise PthError(path, f"byteorder {byteorder!r}")
        unpickler = _TensorsOnlyUnpickler(archive.read(pickles[0]), archive, root, byteorder)
        try:
            return unpickler.load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise PthError(path, f"refused: {error}") from None
