"""Nothing in npllama/ops calls NumPy directly: every array function comes from the input's namespace,
which npllama.backend (the one module that recognises a CuPy array) hands out."""

import ast
import pathlib

import npllama.ops

OPS_DIR = pathlib.Path(npllama.ops.__file__).parent
PACKAGE_DIR = OPS_DIR.parent


def numpy_uses(path):
    """(line, what) for every import of numpy and every attribute read off a numpy alias."""
    tree = ast.parse(path.read_text())
    aliases, uses = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for name in node.names:
                if name.name.split(".")[0] == "numpy":
                    aliases.add(name.asname or "numpy")
                    uses.append((node.lineno, f"import {name.name}"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "numpy":
            uses.append((node.lineno, f"from {node.module} import ..."))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            uses.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return uses


def npllama_imports(path):
    """The npllama modules a file imports, as written (`..backend`, `.linear`, ...)."""
    tree = ast.parse(path.read_text())
    return {"." * node.level + (node.module or "") for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level > 0}


def test_ops_never_call_numpy_on_array_data():
    files = sorted(OPS_DIR.glob("*.py"))
    assert len(files) >= 8
    offenders = {f.name: numpy_uses(f) for f in files if numpy_uses(f)}
    assert not offenders, offenders


# the ops with a CUDA kernel of their own hand CuPy arrays to it
KERNEL_MODULES = {"attention.py": {"..kernels"}, "embedding.py": {"..kernels"}, "swiglu.py": {"..kernels"},
                  "rmsnorm.py": {"..kernels"}, "rope.py": {"..kernels"},
                  "cross_entropy.py": {"..kernels"}}


def test_ops_import_nothing_of_npllama_but_the_backend_and_their_kernels():
    imports = {f.name: npllama_imports(f) - {"..backend", "."} - KERNEL_MODULES.get(f.name, set())
               for f in OPS_DIR.glob("*.py")}
    assert not any(imports.values()), imports


def recognises_arrays(path):
    """Whether a file imports CuPy or reads a type's __module__: the two ways to tell a CuPy array."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(n.name.split(".")[0] == "cupy" for n in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "cupy":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "__module__":
            return True
    return False


def test_only_the_backend_module_recognises_a_cupy_array():
    """The kernels' modules import CuPy to launch, but only ever receive CuPy arrays, and train/distributed.py
    imports CuPy's NCCL binding only for a world whose gradients live on GPUs: they tell nothing apart."""
    files = {f.relative_to(PACKAGE_DIR).as_posix() for f in PACKAGE_DIR.rglob("*.py") if recognises_arrays(f)}
    assert files - {"kernels/adamw.py", "kernels/attention.py", "kernels/attention_mma.py", "kernels/embedding.py",
                    "kernels/swiglu.py", "kernels/rmsnorm.py", "kernels/rope.py", "kernels/cross_entropy.py",
                    "train/distributed.py"} == \
        {"backend.py"}, files


def test_the_checker_sees_a_numpy_call(tmp_path):
    """The scan is not vacuous: a file that calls np.exp is reported."""
    sample = tmp_path / "sample_op.py"
    sample.write_text("import numpy as np\n\ndef f(x):\n    return np.exp(x)\n")
    assert (4, "np.exp") in numpy_uses(sample)
