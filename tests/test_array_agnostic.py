"""Nothing in npllama/ops calls NumPy directly: every array function comes from the input's namespace."""

import ast
import pathlib

import npllama.ops

OPS_DIR = pathlib.Path(npllama.ops.__file__).parent
NAMESPACE_HELPER = "_namespace.py"


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


def test_ops_never_call_numpy_on_array_data():
    files = sorted(OPS_DIR.glob("*.py"))
    assert len(files) >= 8
    offenders = {f.name: numpy_uses(f) for f in files if f.name != NAMESPACE_HELPER and numpy_uses(f)}
    assert not offenders, offenders


def test_the_namespace_helper_only_hands_numpy_back():
    uses = numpy_uses(OPS_DIR / NAMESPACE_HELPER)
    assert [what for _, what in uses] == ["import numpy"]


def test_the_checker_sees_a_numpy_call(tmp_path):
    """The scan is not vacuous: a file that calls np.exp is reported."""
    sample = tmp_path / "sample_op.py"
    sample.write_text("import numpy as np\n\ndef f(x):\n    return np.exp(x)\n")
    assert (4, "np.exp") in numpy_uses(sample)
