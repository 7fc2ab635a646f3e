"""One way to name a backend, one way to find the namespace of arrays, one message when unavailable."""

import contextlib
import importlib.util
import subprocess
import sys

import numpy
import pytest

from conftest import cuda_unavailable_reason
from npllama import backend

CUPY_INSTALLED = importlib.util.find_spec("cupy") is not None
NO_CUPY = 'pip install "npllama[gpu]"'


class FakeCupyArray:
    """Looks like a CuPy array to the one check npllama makes (its type's module), with .get()."""

    __module__ = "cupy._core.core"

    def __init__(self, values):
        self.values = numpy.asarray(values)

    def get(self):
        return self.values.copy()


def test_numpy_by_name_is_the_numpy_module():
    assert backend.get_backend("numpy") is numpy


def test_an_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(backend.BackendError) as raised:
        backend.get_backend("jax")
    assert str(raised.value) == "--backend 'jax' is unknown; choose one of numpy, cupy"


def test_cupy_missing_is_refused_with_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy fails, as where it is not installed
    with pytest.raises(backend.BackendError) as raised:
        backend.get_backend("cupy")
    assert str(raised.value) == ('--backend cupy needs CuPy, which is not installed: pip install "npllama[gpu]" '
                                 "(or use --backend numpy)")


@pytest.mark.skipif(not CUPY_INSTALLED or cuda_unavailable_reason() is None,
                    reason="needs CuPy installed on a machine without a usable GPU (as in CI)")
def test_cupy_without_a_gpu_is_refused_with_the_reason_in_one_line():
    with pytest.raises(backend.BackendError) as raised:
        backend.get_backend("cupy")
    message = str(raised.value)
    assert message.startswith("--backend cupy: CuPy finds no usable GPU (") and "\n" not in message
    assert message.endswith("check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or use --backend numpy")


def fake_cupy(monkeypatch, fails: str):
    """A CuPy that imports, and then fails at one stage of what --backend cupy needs: `devices`
    (the driver raises), `none` (zero GPUs), `nvrtc` (the compiler library), `compile` (a kernel)."""
    import importlib.machinery
    import types

    def stage(name, result):
        def call(*args):
            if fails == name:
                raise RuntimeError(f"{name} failed\nsecond line")
            return result
        return call

    cupy = types.ModuleType("cupy")
    cupy.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=stage("devices", 0 if fails == "none" else 1)))
    cupy.arange = stage("compile", numpy.arange(2))
    nvrtc = types.SimpleNamespace(getVersion=stage("nvrtc", (12, 0)))
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.nvrtc = nvrtc
    for name, module in (("cupy", cupy), ("cupy_backends", types.ModuleType("cupy_backends")),
                         ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
                         ("cupy_backends.cuda.libs", libs)):
        monkeypatch.setitem(sys.modules, name, module)
    return cupy


@pytest.mark.parametrize("fails, message", [
    ("devices", "--backend cupy: CuPy finds no usable GPU (RuntimeError: devices failed); check the NVIDIA driver"),
    ("none", "--backend cupy: CuPy sees no GPU; check CUDA_VISIBLE_DEVICES"),
    ("nvrtc", "--backend cupy: CuPy cannot load NVRTC, which compiles npllama's kernels (RuntimeError: nvrtc "
              "failed)"),
    ("compile", "--backend cupy: CuPy cannot compile a kernel (RuntimeError: compile failed)"),
])
def test_each_thing_cupy_needs_that_is_missing_is_named_in_one_line(monkeypatch, fails, message):
    """Where CuPy imports but cannot run here, the first thing missing is named: no driver, no
    GPU, no NVRTC, no kernel compiler; with everything there CuPy is the backend."""
    fake_cupy(monkeypatch, fails)
    with pytest.raises(backend.BackendError) as refused:
        backend.get_backend("cupy")
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    assert backend.get_backend("numpy") is numpy
    cupy = fake_cupy(monkeypatch, fails="nothing")
    assert backend.get_backend("cupy") is cupy


def test_numpy_arrays_belong_to_numpy_and_a_cupy_array_is_recognised_without_importing_cupy():
    assert backend.array_namespace(numpy.zeros(2), numpy.ones(3)) is numpy
    assert backend.is_cupy_array(FakeCupyArray([1.0])) and not backend.is_cupy_array(numpy.zeros(1))


def test_to_host_copies_a_device_array_with_get_and_passes_numpy_through():
    host = backend.to_host(FakeCupyArray([1.0, 2.0]))
    assert isinstance(host, numpy.ndarray) and host.tolist() == [1.0, 2.0]
    array = numpy.arange(3.0)
    assert backend.to_host(array) is array


def test_reductions_run_in_at_least_float32():
    assert backend.compute_dtype(numpy, numpy.float16) == numpy.float32
    assert backend.compute_dtype(numpy, numpy.float64) == numpy.float64


ENTRY_POINTS = [["npllama.train", "--out", "{tmp}/run"], ["npllama.generate", "--checkpoint", "{tmp}/run"],
                ["npllama.audit"]]


def run_without_cupy(module, args):
    """python -m module args, in a Python where `import cupy` fails as if CuPy were not installed."""
    code = (f"import sys, runpy; sys.modules['cupy'] = None; sys.argv = [{module!r}, *{args!r}]; "
            f"runpy.run_module({module!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ENTRY_POINTS, ids=lambda command: command[0])
def test_every_entry_point_refuses_cupy_when_it_is_missing_in_one_line_writing_nothing(command, tmp_path):
    args = [arg.format(tmp=tmp_path) for arg in command[1:]]
    result = run_without_cupy(command[0], [*args, "--backend", "cupy"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --backend cupy needs CuPy") and NO_CUPY in lines[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not CUPY_INSTALLED or cuda_unavailable_reason() is None,
                    reason="needs CuPy installed on a machine without a usable GPU (as in CI)")
@pytest.mark.parametrize("command", ENTRY_POINTS, ids=lambda command: command[0])
def test_every_entry_point_refuses_cupy_without_a_gpu_in_one_line_writing_nothing(command, tmp_path):
    args = [arg.format(tmp=tmp_path) for arg in command[1:]]
    result = subprocess.run([sys.executable, "-m", command[0], *args, "--backend", "cupy"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --backend cupy: CuPy finds no usable GPU")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not CUPY_INSTALLED, reason="CuPy is not installed: pip install '.[test]' installs it")
@pytest.mark.parametrize("tf32", [True, False])
def test_float32_products_set_cupys_compute_type_for_the_block_and_restore_it_even_after_an_error(monkeypatch,
                                                                                                 tf32):
    """The compute type is CuPy's process-wide state (setting it asks the device, so it is recorded
    here by a stand-in): the block sets TF32 or full float32 for float32, never leaves it at CuPy's
    default (which CUPY_TF32 decides), sets float32 accumulation for float16 (never the PEDANTIC
    type, and never float16 accumulation), and puts back what was there."""
    import cupy
    from cupy._core import _routines_linalg as linalg

    before = {numpy.dtype("float32"): linalg.COMPUTE_TYPE_DEFAULT, numpy.dtype("float16"): linalg.COMPUTE_TYPE_FP16}
    calls, current = [], dict(before)
    reductions = []  # the cuBLAS handle's math mode needs a device: recorded, entered and left, by a stand-in

    @contextlib.contextmanager
    def float32_reductions():
        reductions.append("entered")
        try:
            yield
        finally:
            reductions.append("left")

    monkeypatch.setattr(backend, "float32_reductions", float32_reductions)
    monkeypatch.setattr(linalg, "get_compute_type", lambda dtype: current[numpy.dtype(dtype)])
    monkeypatch.setattr(linalg, "set_compute_type",
                        lambda dtype, kind: (calls.append((numpy.dtype(dtype), kind)),
                                                 current.update({numpy.dtype(dtype): kind})))
    with pytest.raises(RuntimeError, match="a step failed"):
        with backend.float32_products(cupy, tf32):
            assert current[numpy.dtype("float32")] == (linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_FP32)
            assert current[numpy.dtype("float16")] == linalg.COMPUTE_TYPE_FP32
            assert reductions == ["entered"]
            raise RuntimeError("a step failed")
    assert current == before and reductions == ["entered", "left"]
    assert sorted(dtype.name for dtype, _ in calls) == ["float16"] * 2 + ["float32"] * 2  # float64 is float64
    with backend.float32_products(numpy, tf32):  # NumPy: nothing to set
        assert len(calls) == 4


@pytest.mark.skipif(not CUPY_INSTALLED, reason="CuPy is not installed: pip install '.[test]' installs it")
def test_tf32_products_is_cupys_float32_compute_type_being_tf32(monkeypatch):
    """What ops/attention.py asks before it sends float32 to the TF32 tensor-core kernels: CuPy's own
    state (set by float32_products, or CUPY_TF32 through CuPy's default), read here through a stand-in
    (reading it may ask the device); never on NumPy."""
    import cupy
    from cupy._core import _routines_linalg as linalg

    current = {}
    monkeypatch.setattr(linalg, "get_compute_type", lambda dtype: current[numpy.dtype(dtype)])
    for kind, expected in ((linalg.COMPUTE_TYPE_TF32, True), (linalg.COMPUTE_TYPE_FP32, False),
                           (linalg.COMPUTE_TYPE_DEFAULT, False), (linalg.COMPUTE_TYPE_PEDANTIC, False)):
        current[numpy.dtype("float32")] = kind
        assert backend.tf32_products(cupy) is expected
    assert backend.tf32_products(numpy) is False
