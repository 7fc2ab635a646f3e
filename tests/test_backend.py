"""One way to name a backend, one way to find the namespace of arrays, one message when unavailable."""

import subprocess
import sys

import numpy
import pytest

from npllama import backend


class FakeCupyArray:
    """Looks like a CuPy array to the one check npllama makes (its type's module), with .get()."""

    __module__ = "cupy._core.core"

    def __init__(self, values):
        self.values = numpy.asarray(values)

    def get(self):
        return self.values.copy()


def test_numpy_by_name_is_the_numpy_module():
    assert backend.get_backend("numpy") is numpy


@pytest.mark.parametrize("name, message", [
    ("cupy", "--backend cupy: the GPU backend is not available yet in this release; use --backend numpy"),
    ("jax", "--backend 'jax' is unknown; choose one of numpy, cupy"),
])
def test_a_backend_that_cannot_be_used_is_refused_in_one_line(name, message):
    with pytest.raises(backend.BackendError) as raised:
        backend.get_backend(name)
    assert str(raised.value) == message


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


@pytest.mark.parametrize("command", [["npllama.train", "--out", "{tmp}/run"],
                                     ["npllama.generate", "--checkpoint", "{tmp}"],
                                     ["npllama.audit"]], ids=lambda command: command[0])
def test_every_entry_point_refuses_an_unavailable_backend_with_the_same_line(command, tmp_path):
    args = [arg.format(tmp=tmp_path) for arg in command]
    result = subprocess.run([sys.executable, "-m", *args, "--backend", "cupy"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --backend cupy: the GPU backend is not available yet in this release; use --backend numpy"]
    assert not (tmp_path / "run").exists()
