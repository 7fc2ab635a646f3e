"""`gpu` tests skip, with the reason, where CuPy sees no CUDA device (as in CI)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cuda_unavailable_reason


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="this machine has a CUDA device: nothing to skip")
def test_a_gpu_test_is_skipped_with_the_reason_when_there_is_no_device(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text("import pytest\n\n\n@pytest.mark.gpu\ndef test_kernel():\n"
                                             "    assert False, 'a gpu test ran without a device'\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                             "-o", "markers=gpu: needs a CUDA device", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and f"gpu test: {cuda_unavailable_reason()}" in result.stdout
