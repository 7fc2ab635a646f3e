"""Hypothesis settings profiles, chosen by NPLLAMA_HYPOTHESIS_PROFILE (default: ci), the small
training corpus the training tests share, and the skip of `gpu` tests where CuPy sees no CUDA device.

ci        few examples per property: the whole suite stays well under 10 minutes on 2 cores
thorough  many examples; for a release or after touching an op
mutation  ci's examples without shrinking: scripts/mutation_check.py only needs to know that a
          planted bug fails a test, not its smallest example (shrinking a gradient check takes minutes)
"""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "ci", max_examples=12, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "mutation", max_examples=12, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow], phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.load_profile(os.environ.get("NPLLAMA_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A few standard-library files and a 512-piece tokenizer trained on them, made once."""
    from npllama import data
    from npllama.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("corpus")
    for path in data.default_corpus_files()[:40]:
        (folder / path.name).write_bytes(path.read_bytes())
    texts = (text for _, text in data.read_documents(data.find_documents([str(folder)])))
    tokenizer_path = folder.parent / "tokenizer-512.model"
    train_tokenizer(texts, 512).save(tokenizer_path)
    return folder, tokenizer_path


TASK_FIXTURES = Path(__file__).parent / "data" / "tasks"  # 30 real items of each benchmark, and 8 for its pool


@pytest.fixture(scope="session")
def lm_eval_task_manager():
    """lm-evaluation-harness's index of its task configs, built once (it reads every config: ~13 s)."""
    pytest.importorskip("lm_eval", reason="the outside judge is lm-evaluation-harness: pip install '.[test]'")
    from lm_eval.tasks import TaskManager

    return TaskManager()


def save_random_run(folder, tokenizer_path, config, seed: int, std: float):
    """`folder` as an npllama checkpoint of a randomly initialised model with the given tokenizer."""
    from npllama import model
    from npllama.checkpoint import save_checkpoint

    save_checkpoint(folder, 1, config=config, params=model.init_params(config, seed=seed, std=std),
                    tokenizer_model=Path(tokenizer_path).read_bytes())
    return folder


def cuda_unavailable_reason() -> str | None:
    """None when CuPy is installed and sees a CUDA device, else why not (the skip reason)."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install '.[gpu]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, no device: CuPy raises its own runtime errors
        return f"CuPy sees no CUDA device ({type(error).__name__}: {error})"
    return None if count else "CuPy sees no CUDA device"


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    reason = cuda_unavailable_reason() if gpu_tests else None
    for item in gpu_tests if reason else []:
        item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))
