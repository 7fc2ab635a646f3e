"""Checkpoints: bitwise round trips, one-line errors for every kind of damage, atomic saves.

The tests read and rewrite checkpoint files by hand, from the format documented in
npllama/checkpoint/format.py, without the package's private helpers: they are a second reader of the format.
"""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy
import pytest
import safetensors.numpy
from hypothesis import example, given
from hypothesis import strategies as st

from npllama import model, optim
from npllama import params as params_table
from npllama.checkpoint import (
    Checkpoint,
    CheckpointError,
    find_latest,
    load_checkpoint,
    save_checkpoint,
)
from strategies import rng_from, seeds, small_model_configs
from training import reseal

ROOT = Path(__file__).resolve().parents[1]
NANO = model.PRESETS["nano"]
DEAD_PID = 4_194_304 + 1  # above Linux's largest pid_max: never a running process


def nasty_params(config, dtype="float32", seed=0):
    """Random parameters with the values a lossy round trip would change: NaN with a payload,
    infinities, -0.0, subnormals."""
    rng = rng_from(seed)
    params = {name: rng.standard_normal(shape).astype(dtype)
              for name, shape in params_table.parameter_shapes(config).items()}
    bits = numpy.uint32 if dtype == "float32" else numpy.uint64
    payload_nan = numpy.array([0x7FC0_0123 if dtype == "float32" else 0x7FF8_0000_0000_0123], bits).view(dtype)[0]
    specials = [payload_nan, numpy.inf, -numpy.inf, -0.0, numpy.finfo(dtype).smallest_subnormal]
    for value, name in zip(specials, params):
        params[name].flat[rng.integers(params[name].size)] = value
    return params


def optimizer_state(params, seed=1, step=7):
    rng = rng_from(seed)
    state = optim.init_state(params)
    for name in params:
        state.m[name][...] = rng.standard_normal(params[name].shape)
        state.v[name][...] = rng.random(params[name].shape)
    state.step = step
    return state


def bitwise_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def save_nano(run_dir, step=100, **kwargs):
    params = kwargs.pop("params", None) or nasty_params(NANO)
    if "optimizer_state" not in kwargs:
        kwargs["optimizer_state"] = optimizer_state(params)
    kwargs.setdefault("state", {"step": step, "lr": 3e-4})
    kwargs.setdefault("tokenizer_model", b"\x00sentencepiece bytes\xff")
    return save_checkpoint(run_dir, step, config=NANO, params=params, **kwargs)


def rewrite_tensors(path, change):
    tensors = dict(safetensors.numpy.load_file(path))
    change(tensors)
    path.write_bytes(safetensors.numpy.save(tensors))
    reseal(path.parent)


def load_error(path, *needles, **kwargs) -> str:
    """Load `path`, expect a CheckpointError of one line that names the path and every needle."""
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    for needle in (str(path), *needles):
        assert str(needle) in message, message
    return message


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Round trips


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(
    config=small_model_configs(),
    dtype=st.sampled_from(["float32", "float64"]),
    seed=seeds,
    state=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    tokenizer=st.none() | st.binary(max_size=64),
    # AdamW's t after some steps (what bias correction needs back); drawn as a plain integer, since
    # with `none() | integers()` the ci profile's 12 examples may all be None (seed 0's are)
    optimizer_step=st.integers(1, 10**6),
)
def test_save_then_load_is_bitwise_for_params_moments_state_and_tokenizer(
    config, dtype, seed, state, tokenizer, optimizer_step
):
    params = nasty_params(config, dtype, seed)
    opt = optimizer_state(params, seed + 1, optimizer_step)
    state = {key: value for key, value in state.items() if key != "step"}
    with tempfile.TemporaryDirectory() as run_dir:
        saved = save_checkpoint(run_dir, 3, config=config, params=params, optimizer_state=opt,
                                state=state, tokenizer_model=tokenizer)
        loaded = load_checkpoint(run_dir, expected_config=config)
    assert isinstance(loaded, Checkpoint)
    assert loaded.path == saved and loaded.step == 3 and loaded.config == config
    assert list(loaded.params) == list(params)
    assert all(bitwise_equal(loaded.params[name], params[name]) for name in params)
    assert loaded.optimizer_state.step == optimizer_step
    for name in params:
        assert bitwise_equal(loaded.optimizer_state.m[name], opt.m[name])
        assert bitwise_equal(loaded.optimizer_state.v[name], opt.v[name])
    assert json.dumps(loaded.state) == json.dumps(state)  # also tells -0.0 from 0.0
    assert loaded.tokenizer_model == tokenizer


def test_a_checkpoint_without_optimizer_state_loads_without_one(tmp_path):
    """An exported model: weights only, no optimizer.safetensors, and load says so with None."""
    save_nano(tmp_path, optimizer_state=None)
    assert not (tmp_path / "step-00000100" / "optimizer.safetensors").exists()
    loaded = load_checkpoint(tmp_path)
    assert loaded.optimizer_state is None and loaded.step == 100


def test_adamw_step_count_comes_back_so_bias_correction_continues(tmp_path):
    """t = 7 after a round trip, not 0: a resumed run's first step divides by 1 - beta^8."""
    save_nano(tmp_path)
    assert load_checkpoint(tmp_path).optimizer_state.step == 7


def test_loaded_arrays_are_writable_so_training_can_update_them_in_place(tmp_path):
    save_nano(tmp_path)
    loaded = load_checkpoint(tmp_path)
    loaded.params["norm.weight"] += 1.0
    loaded.optimizer_state.m["norm.weight"] *= 0.5


def test_a_checkpoint_directory_holds_exactly_the_documented_files(tmp_path):
    directory = save_nano(tmp_path, step=42)
    assert directory == tmp_path / "step-00000042"
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "state.json", "tokenizer.model"]
    assert (tmp_path / "latest").read_text() == "step-00000042\n"
    config = json.loads((directory / "config.json").read_text())
    assert config == {"format": 1, **NANO.to_dict()}
    document = json.loads((directory / "state.json").read_text())
    assert document["step"] == 42 and document["optimizer_step"] == 7
    assert document["state"] == {"step": 42, "lr": 3e-4}
    for name, digest in document["checksums"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest
    saved_names = list(safetensors.numpy.load_file(directory / "model.safetensors"))
    assert saved_names == sorted(params_table.parameter_shapes(NANO))
    moments = safetensors.numpy.load_file(directory / "optimizer.safetensors")
    assert set(moments) == {f"{m}.{name}" for m in "mv" for name in params_table.parameter_shapes(NANO)}


def test_cupy_arrays_are_copied_to_the_host_with_get(tmp_path):
    class FakeCupyArray:
        """Stands in for cupy.ndarray: only `.get()` gives its values."""

        __module__ = "cupy._core.core"

        def __init__(self, host):
            self.host = host

        def get(self):
            return self.host.copy()

        def __array__(self, *args, **kwargs):
            raise AssertionError("a CuPy array must be copied with .get(), not numpy.asarray")

    params = nasty_params(NANO)
    save_checkpoint(tmp_path, 1, config=NANO, params={k: FakeCupyArray(v) for k, v in params.items()})
    loaded = load_checkpoint(tmp_path)
    assert all(bitwise_equal(loaded.params[name], params[name]) for name in params)


def test_non_contiguous_arrays_are_saved_by_value(tmp_path):
    params = nasty_params(NANO)
    params["output.weight"] = numpy.asfortranarray(params["output.weight"])
    save_checkpoint(tmp_path, 1, config=NANO, params=params)
    assert bitwise_equal(load_checkpoint(tmp_path).params["output.weight"],
                         numpy.ascontiguousarray(params["output.weight"]))


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: one line naming the file and what is wrong


def test_truncated_model_file_is_named(tmp_path):
    directory = save_nano(tmp_path)
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    load_error(tmp_path, file, "truncated", "delete")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "config.json", "tokenizer.model"])
def test_a_flipped_byte_in_the_middle_of_a_file_is_named(tmp_path, name):
    directory = save_nano(tmp_path)
    file = directory / name
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    load_error(tmp_path, file, "corrupted")


def test_a_changed_state_json_is_caught_by_its_own_checksum(tmp_path):
    directory = save_nano(tmp_path, step=100)
    file = directory / "state.json"
    file.write_text(file.read_text().replace('"lr": 0.0003', '"lr": 0.0004'))
    load_error(tmp_path, file, "corrupted")


@pytest.mark.parametrize(
    "name", ["config.json", "model.safetensors", "optimizer.safetensors", "state.json", "tokenizer.model"])
def test_a_missing_file_is_named(tmp_path, name):
    directory = save_nano(tmp_path)
    (directory / name).unlink()
    load_error(tmp_path, directory / name, "missing")


def test_garbage_config_json_is_named(tmp_path):
    directory = save_nano(tmp_path)
    (directory / "config.json").write_text("{not json")
    load_error(tmp_path, directory / "config.json", "corrupted")  # the checksum sees it first
    reseal(directory)
    load_error(tmp_path, directory / "config.json", "not a JSON object")


def test_a_config_json_that_is_no_llama_config_is_named(tmp_path):
    directory = save_nano(tmp_path)
    (directory / "config.json").write_text(json.dumps({"format": 1, **NANO.to_dict(), "n_heads": 5}))
    reseal(directory)
    load_error(tmp_path, directory / "config.json", "not a valid LlamaConfig", "n_heads 5")


@pytest.mark.parametrize("content", [b"\x00\x01 garbage", b"[" * 100_000 + b"]" * 100_000],
                         ids=["garbage", "nested-too-deep"])
def test_garbage_state_json_is_named(tmp_path, content):
    directory = save_nano(tmp_path)
    (directory / "state.json").write_bytes(content)
    load_error(tmp_path, directory / "state.json", "not valid JSON")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_a_file_that_is_not_safetensors_is_named_even_with_valid_checksums(tmp_path, name):
    directory = save_nano(tmp_path)
    (directory / name).write_bytes((directory / name).read_bytes()[:100])
    reseal(directory)
    load_error(tmp_path, directory / name, "not a valid safetensors file")


@given(changes=st.dictionaries(
    st.sampled_from(["dim", "n_layers", "vocab_size", "max_seq_len", "norm_eps", "rope_theta"]),
    st.integers(2, 5), min_size=1))
def test_a_checkpoint_of_another_config_names_every_differing_field(changes):
    with tempfile.TemporaryDirectory() as run_dir:
        save_checkpoint(run_dir, 1, config=NANO, params=model.init_params(NANO))
        this_run = model.LlamaConfig(**{**NANO.to_dict(), **{k: NANO.to_dict()[k] * v for k, v in changes.items()}})
        message = load_error(Path(run_dir), "config.json", "another model", expected_config=this_run)
    for field in changes:
        theirs, ours = NANO.to_dict()[field], this_run.to_dict()[field]
        assert f"checkpoint has {field}={theirs!r}, this run has {field}={ours!r}" in message
    assert "n_heads" not in message  # only the fields that differ


def test_the_other_config_example_from_the_issue(tmp_path):
    save_checkpoint(tmp_path, 1, config=NANO, params=model.init_params(NANO))
    wider = model.LlamaConfig(**{**NANO.to_dict(), "dim": 128})
    load_error(tmp_path, "checkpoint has dim=64, this run has dim=128", expected_config=wider)


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path):
    directory = save_nano(tmp_path)
    rewrite_tensors(directory / "model.safetensors",
                    lambda t: t.update({"layers.1.attention.wk.weight": numpy.zeros((64, 32), "float32")}))
    load_error(tmp_path, directory / "model.safetensors", "layers.1.attention.wk.weight", "(64, 32)", "(64, 64)")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    directory = save_nano(tmp_path)

    def change(tensors):
        del tensors["norm.weight"], tensors["layers.0.ffn_norm.weight"]
        tensors["lm_head.weight"] = tensors.pop("output.weight")

    rewrite_tensors(directory / "model.safetensors", change)
    load_error(tmp_path, directory / "model.safetensors",
               "missing 3 tensor(s)", "norm.weight", "layers.0.ffn_norm.weight", "output.weight",
               "1 unexpected tensor(s): lm_head.weight")


def test_many_missing_tensors_are_summarised_with_the_first_few(tmp_path):
    directory = save_nano(tmp_path)
    rewrite_tensors(directory / "model.safetensors", lambda t: [t.pop(k) for k in list(t)[1:]])
    message = load_error(tmp_path, directory / "model.safetensors", "missing 20 tensor(s)", "(17 more)")
    assert len(message) < 400


def test_a_missing_optimizer_moment_is_named(tmp_path):
    directory = save_nano(tmp_path)
    rewrite_tensors(directory / "optimizer.safetensors", lambda t: t.pop("v.norm.weight"))
    load_error(tmp_path, directory / "optimizer.safetensors", "v.norm.weight")


def test_float16_and_mixed_dtypes_are_named(tmp_path):
    directory = save_nano(tmp_path)
    file = directory / "model.safetensors"
    rewrite_tensors(file, lambda t: t.update({"norm.weight": t["norm.weight"].astype("float16")}))
    load_error(tmp_path, file, "norm.weight is float16", "float32 or float64")
    rewrite_tensors(file, lambda t: t.update({"norm.weight": t["norm.weight"].astype("float64")}))
    load_error(tmp_path, file, "mixed dtypes", "float64 (norm.weight)")


def test_a_failed_load_changes_nothing_on_disk(tmp_path):
    directory = save_nano(tmp_path)
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1])
    before = snapshot(tmp_path)
    load_error(tmp_path, file)
    assert snapshot(tmp_path) == before


def test_a_path_without_a_checkpoint_gives_one_line(tmp_path):
    load_error(tmp_path / "nowhere", "no such file or folder")
    load_error(tmp_path, "no checkpoint here")


# ---------------------------------------------------------------------------------------------
# The run directory: latest, pruning, leftovers of crashes


def test_latest_names_the_newest_complete_checkpoint(tmp_path):
    assert find_latest(tmp_path) is None and find_latest(tmp_path / "absent") is None
    for step in (10, 20, 30):
        path = save_nano(tmp_path, step=step, keep_last=None)
        assert find_latest(tmp_path) == path
        assert load_checkpoint(tmp_path).step == step
    assert load_checkpoint(tmp_path / "step-00000020").step == 20


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_keep_last_keeps_only_the_newest_checkpoints(tmp_path, keep_last):
    for step in range(1, 7):
        save_nano(tmp_path, step=step, keep_last=keep_last)
    expected = [f"step-{s:08d}" for s in range(7 - keep_last, 7)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", *expected]


def test_keep_last_none_keeps_everything(tmp_path):
    for step in range(1, 5):
        save_nano(tmp_path, step=step, keep_last=None)
    assert len(list(tmp_path.glob("step-*"))) == 4


def test_saving_an_older_step_after_a_resume_points_latest_at_it_and_keeps_it(tmp_path):
    for step in (100, 200):
        save_nano(tmp_path, step=step)
    save_nano(tmp_path, step=150)  # resumed from an older checkpoint
    assert load_checkpoint(tmp_path).step == 150
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000150", "step-00000200"]
    # pruning to the newest 2 keeps the one just saved too, though two newer steps exist
    save_nano(tmp_path, step=300, keep_last=2)
    save_nano(tmp_path, step=120, keep_last=2)
    assert load_checkpoint(tmp_path).step == 120
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000120", "step-00000200", "step-00000300"]


def test_re_saving_a_step_replaces_it_and_leaves_no_leftovers(tmp_path):
    save_nano(tmp_path, step=5, state={"run": "first"})
    save_nano(tmp_path, step=5, state={"run": "second"})
    assert load_checkpoint(tmp_path).state == {"run": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000005"]


def test_a_stale_tmp_dir_from_a_crash_is_ignored_by_load_and_removed_by_the_next_save(tmp_path):
    save_nano(tmp_path, step=1)
    stale = tmp_path / f".tmp-step-00000002-{DEAD_PID}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    (tmp_path / f".tmp-latest-{DEAD_PID}").write_text("step-00000002\n")
    assert load_checkpoint(tmp_path).step == 1
    assert find_latest(tmp_path) == tmp_path / "step-00000001"
    save_nano(tmp_path, step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001", "step-00000003"]


def test_a_tmp_dir_of_a_running_process_is_left_alone(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".tmp-step-00000009-{other.pid}"
        busy.mkdir()
        save_nano(tmp_path, step=1)
        assert busy.is_dir()
    finally:
        other.kill()
        other.wait()


def test_a_kill_between_the_renames_of_a_re_save_leaves_the_old_version_loadable(tmp_path):
    """Re-saving step 5 renames the old step-00000005 aside before the new one takes its name."""
    old = save_nano(tmp_path, step=5, state={"run": "first"})
    aside = tmp_path / f".old-step-00000005-{DEAD_PID}"
    old.rename(aside)  # the state of the disk if the process died between the two renames
    (tmp_path / f".tmp-step-00000005-{DEAD_PID}").mkdir()
    assert find_latest(tmp_path) == aside
    assert load_checkpoint(tmp_path).state == {"run": "first"}
    assert load_checkpoint(tmp_path / "step-00000005").state == {"run": "first"}
    save_nano(tmp_path, step=6, keep_last=None)  # the next save puts it back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000005", "step-00000006"]
    assert load_checkpoint(tmp_path / "step-00000005").state == {"run": "first"}


@given(steps=st.sets(st.integers(0, 10**10), min_size=1, max_size=6))
@example(steps={99_999_999, 100_000_000})  # a nine-digit step sorts before an eight-digit one by name
def test_without_latest_the_highest_step_is_found(steps):
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder)
        for step in steps:
            (run / f"step-{step:08d}").mkdir()
        (run / "step-123").mkdir()  # fewer than eight digits: not a checkpoint's name
        (run / f"step-{max(steps) + 1:08d}.tmp").mkdir()
        assert find_latest(run) == run / f"step-{max(steps):08d}"


@pytest.mark.parametrize("content", ["", "../../etc\n", "step-00000099\n"])
def test_a_latest_that_names_nothing_usable_is_an_error(tmp_path, content):
    save_nano(tmp_path, step=1)
    (tmp_path / "latest").write_text(content)
    with pytest.raises(CheckpointError, match="latest"):
        find_latest(tmp_path)
    load_error(tmp_path, "latest")


# ---------------------------------------------------------------------------------------------
# Saving refuses bad input before touching the disk


@pytest.mark.parametrize("bad", [
    {"params": {"norm.weight": numpy.ones(64, "float32")}},
    {"params": {**model.init_params(NANO), "norm.weight": numpy.ones(32, "float32")}},
    {"params": model.init_params(NANO, dtype="float16")},
    {"state": {"when": object()}},
    {"state": {"loss": float("nan")}},
    {"state": {"step": 4}},
    {"tokenizer_model": "not bytes"},
])
def test_bad_arguments_to_save_raise_before_anything_is_written(tmp_path, bad):
    save_nano(tmp_path, step=1)
    before = snapshot(tmp_path)
    kwargs = {"config": NANO, "params": model.init_params(NANO), **bad}
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 5, **kwargs)
    assert snapshot(tmp_path) == before


def test_numpy_scalars_in_state_are_stored_as_json_numbers(tmp_path):
    save_checkpoint(tmp_path, 1, config=NANO, params=model.init_params(NANO),
                    state={"epoch": numpy.int64(3), "loss": numpy.float32(0.5)})
    assert load_checkpoint(tmp_path).state == {"epoch": 3, "loss": 0.5}


def test_an_unwritable_output_directory_gives_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError) as caught:
        save_nano(tmp_path / "file" / "run")
    assert "cannot write checkpoint" in str(caught.value) and "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# A crash at every file-system call of a save

CRASHED = 86
FILE_SYSTEM_CALLS = ("mkdir", "rename", "replace", "fsync", "unlink", "rmdir")


def save_in_a_child_that_dies_at_call(n, save):
    """Fork; in the child, run `save()` but die (os._exit, as abrupt as SIGKILL for the files)
    just before its n-th file-system call. Returns True if the child died, False if it finished."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            calls = iter(range(n + 1))

            def dying(function):
                def call(*args, **kwargs):
                    if next(calls, None) is None:
                        os._exit(CRASHED)
                    return function(*args, **kwargs)
                return call

            for name in FILE_SYSTEM_CALLS:
                setattr(os, name, dying(getattr(os, name)))
            save()
            os._exit(0)
        finally:
            os._exit(1)
    deadline = time.monotonic() + 20
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked save hung")
        time.sleep(0.001)
    code = os.waitstatus_to_exitcode(status[1])
    assert code in (0, CRASHED), f"the forked save failed with status {code}"
    return code == CRASHED


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("new_step", [3, 2], ids=["a new step", "a re-saved step"])
def test_a_crash_at_any_file_system_call_of_a_save_leaves_the_last_complete_checkpoint(
    tmp_path, monkeypatch, new_step
):
    """Exhaustive over the save's mkdir/rename/replace/fsync/unlink/rmdir calls: after a crash
    before the n-th one, the run loads, as the old or the new checkpoint (old, then once latest
    moved, new: never back), and the next save cleans up every leftover."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # a crash point still; durability is not tested here
    params = nasty_params(NANO)
    base = tmp_path / "base"
    save_nano(base, step=1, params=params, state={"run": "old"})
    save_nano(base, step=2, params=params, state={"run": "old"})
    seen = []
    for n in range(1000):
        run_dir = tmp_path / f"crash-{n}"
        shutil.copytree(base, run_dir)
        died = save_in_a_child_that_dies_at_call(
            n, lambda run_dir=run_dir: save_nano(run_dir, step=new_step, params=params, state={"run": "new"}))
        loaded = load_checkpoint(run_dir)
        seen.append((loaded.step, loaded.state["run"]))
        assert seen[-1] in [(2, "old"), (new_step, "new")]
        assert seen == sorted(seen, key=lambda s: s[1] == "new"), "latest went back to the old checkpoint"
        save_nano(run_dir, step=10, params=params)
        assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
        for directory in run_dir.glob("step-*"):
            load_checkpoint(directory)
        if not died:
            break
    assert n > 10 and seen[0][1] == "old" and seen[-1] == (new_step, "new")



# ---------------------------------------------------------------------------------------------
# SIGKILL during writes

WRITER = r"""
import sys
import numpy
from npllama import checkpoint, model, optim
from npllama import params as params_table

run_dir = sys.argv[1]
config = model.LlamaConfig(dim=256, n_layers=2, n_heads=4, vocab_size=4096, multiple_of=32, max_seq_len=64)
step = 0 if checkpoint.find_latest(run_dir) is None else checkpoint.load_checkpoint(run_dir).step + 1
shapes = params_table.parameter_shapes(config)
params = {name: numpy.empty(shape, "float32") for name, shape in shapes.items()}
moments = optim.AdamWState({n: numpy.empty(s, "float32") for n, s in shapes.items()},
                           {n: numpy.empty(s, "float32") for n, s in shapes.items()})
while True:
    # Every value says which step it belongs to, so a mixed-up checkpoint would show.
    for name in shapes:
        params[name].fill(step)
        moments.m[name].fill(-step)
        moments.v[name].fill(2 * step)
    moments.step = step
    checkpoint.save_checkpoint(run_dir, step, config=config, params=params, optimizer_state=moments,
                               state={"step": step}, tokenizer_model=b"tok%d" % step)
    step += 1
"""


@pytest.mark.slow
def test_sigkill_at_random_moments_of_writes_leaves_the_newest_complete_checkpoint_loadable(tmp_path):
    """Five writer processes are killed (SIGKILL) at random moments after a write has begun; after
    each kill the checkpoint `latest` names loads, complete and checksum-valid, and is newer than
    the one before. The writer spends nearly all its time inside save_checkpoint (~0.3 s a save:
    serialise, write and fsync the files, rename, update latest, prune). Kills alternate between
    the first 30 ms after the temporary directory appears (inside the file writes) and anywhere in
    the next 350 ms (any phase of this save or the next)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    delays = random.Random(20230224)
    previous, kills_mid_write = -1, 0

    def latest_step():
        try:
            return int((run_dir / "latest").read_text().strip().split("-")[1])
        except (FileNotFoundError, IndexError, ValueError):
            return -1

    for kill in range(5):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir)], env=env, cwd=ROOT,
                                  stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            # Wait for this writer's first complete checkpoint, then for its next write to begin.
            while not (latest_step() > previous and any(run_dir.glob(f".tmp-step-*-{writer.pid}"))):
                assert writer.poll() is None, writer.stderr.read().decode()
                assert time.monotonic() < deadline, "the writer made no checkpoint in 30 s"
                time.sleep(0.001)
            time.sleep(delays.uniform(0.0, 0.03 if kill % 2 == 0 else 0.35))
        finally:
            writer.kill()  # SIGKILL
            writer.wait()
            writer.stderr.close()
        kills_mid_write += any(p.name.startswith((".tmp-", ".old-")) for p in run_dir.iterdir())

        named = (run_dir / "latest").read_text().strip()
        loaded = load_checkpoint(run_dir)
        assert loaded.step == int(named.split("-")[1]) > previous
        assert loaded.state == {"step": loaded.step} and loaded.tokenizer_model == b"tok%d" % loaded.step
        assert loaded.optimizer_state.step == loaded.step
        for name, p in loaded.params.items():
            assert (p == loaded.step).all() and (loaded.optimizer_state.m[name] == -loaded.step).all()
            assert (loaded.optimizer_state.v[name] == 2 * loaded.step).all()
        previous = loaded.step
    assert kills_mid_write >= 1, "no kill landed inside a write"
    config = load_checkpoint(run_dir).config
    save_checkpoint(run_dir, previous + 1, config=config, params=model.init_params(config))
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")], "the next save cleans up"
