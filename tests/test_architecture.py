"""docs/architecture.md's import rules, checked by reading the package's imports (ast).

The layers are read from the document itself (its `layer N` lines), so the page and the check
cannot drift apart: an import that breaks a rule fails here, and so does a page that states a
layer the code does not keep. Every import counts, including those inside functions.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "npllama"
ARCHITECTURE = REPO / "docs" / "architecture.md"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(path, package): path for path in sorted(package.rglob("*.py"))}


def imported_modules(path: Path, known: dict[str, Path], package: Path = PACKAGE) -> set[str]:
    """The package's modules that `path` imports: `from . import x` names the submodule x when
    there is one, else the package whose __init__ defines x."""
    name = module_name(path, package)
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == package.name}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != package.name:
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return found - {name}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(package)
    return {name: imported_modules(path, known, package) for name, path in known.items()}


def is_command(path: Path) -> bool:
    """A command: a `__main__.py`, or a module whose job is a command line (it defines `main`)."""
    if path.name == "__main__.py":
        return True
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)


def unit(module: str) -> str:
    """The part of the package a module belongs to: `npllama.train.loop` -> `train`; the root -> `npllama`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def documented_layers(text: str) -> dict[str, int]:
    """{unit: layer} from the page's `layer N  unit unit ...` lines."""
    layers = {}
    for number, names in re.findall(r"^layer (\d+) +(.+)$", text, flags=re.MULTILINE):
        for name in names.split():
            layers[name] = int(number)
    return layers


def layer_violations(graph: dict[str, set[str]], commands: set[str], layers: dict[str, int]) -> list[str]:
    """Imports of a library module that reach its own layer's other units or a higher layer."""
    problems = []
    for module, imported in graph.items():
        if module in commands:
            continue
        for target in imported:
            if unit(target) == unit(module):
                continue
            if layers[unit(target)] >= layers[unit(module)]:
                problems.append(f"{module} (layer {layers[unit(module)]}) imports {target} "
                                f"(layer {layers[unit(target)]})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle found by a depth-first walk (each reported once, from where it closed)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def ops_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports of an op beyond the backend and the kernels."""
    return [f"{module} imports {target}" for module, imported in graph.items() if unit(module) == "ops"
            for target in imported if unit(target) not in ("ops", "backend", "kernels")]


def base_violations(graph: dict[str, set[str]], commands: set[str]) -> list[str]:
    """Imports of npllama by kernels (but its command), errors or params, which import nothing of it."""
    return [f"{module} imports {target}" for module, imported in graph.items()
            if unit(module) in ("kernels", "errors", "params") and module not in commands
            for target in imported if unit(target) != unit(module)]


def command_imports(graph: dict[str, set[str]], commands: set[str]) -> list[str]:
    return [f"{module} imports the command {target}" for module, imported in graph.items()
            for target in sorted(imported & commands)]


GRAPH = import_graph()
COMMANDS = {name for name, path in modules().items() if is_command(path)}
LAYERS = documented_layers(ARCHITECTURE.read_text())


def test_the_page_gives_every_part_of_the_package_a_layer():
    units = {unit(module) for module in GRAPH}
    assert units - set(LAYERS) == set(), "add these to docs/architecture.md's layers"
    assert set(LAYERS) - units == set(), "the page names parts the package does not have"


def test_library_modules_import_only_their_own_part_and_lower_layers():
    assert layer_violations(GRAPH, COMMANDS, LAYERS) == []


def test_nothing_imports_a_command():
    assert command_imports(GRAPH, COMMANDS) == []


def test_the_package_has_no_import_circle():
    assert cycles(GRAPH) == []


def test_ops_import_only_the_backend_and_the_kernels():
    assert ops_violations(GRAPH) == []


def test_kernels_errors_and_params_import_nothing_of_npllama():
    assert base_violations(GRAPH, COMMANDS) == []


def test_only_training_imports_the_distributed_module():
    assert [module for module, imported in GRAPH.items()
            if "npllama.train.distributed" in imported and unit(module) != "train"] == []


def test_the_commands_are_the_ones_the_page_names():
    """Every `__main__.py`, and these modules, each a command line and nothing else imports it."""
    top_level = {module for module in COMMANDS if not module.endswith("__main__")}
    assert top_level == {"npllama.generate", "npllama.presets", "npllama.eval.datasets", "npllama.eval.lmeval"}


# --- the checks can fail ---------------------------------------------------------------------------

@pytest.mark.parametrize("planted, check", [
    ({"model.py": "from .train import loop\n"}, "layers"),          # a lower layer imports a higher one
    ({"audit/ops.py": "from ..eval import scoring\n"}, "layers"),    # a part imports another of its layer
    ({"ops/linear.py": "from .. import files\n"}, "ops"),            # an op imports beyond backend/kernels
    ({"params.py": "from . import backend\n"}, "base"),              # the parameter table imports npllama
    ({"sampling.py": "from . import generate\n"}, "commands"),       # a library imports a command
    ({"model.py": "def f():\n    from . import optim\n", "optim.py": "from . import model\n"}, "circle"),
])
def test_a_planted_import_breaks_its_rule(tmp_path, planted, check):
    """Each rule fails on a copy of the package with one import that breaks it, inside a function too."""
    for path in PACKAGE.rglob("*.py"):
        copy = tmp_path / "npllama" / path.relative_to(PACKAGE)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text() + planted.get(path.relative_to(PACKAGE).as_posix(), ""))
    package = tmp_path / "npllama"
    graph = import_graph(package)
    commands = {module_name(path, package) for path in package.rglob("*.py") if is_command(path)}
    found = {"layers": lambda: layer_violations(graph, commands, LAYERS), "ops": lambda: ops_violations(graph),
             "base": lambda: base_violations(graph, commands), "commands": lambda: command_imports(graph, commands),
             "circle": lambda: cycles(graph)}[check]()
    assert len(found) == 1, found


def test_the_layers_are_read_from_the_page():
    assert documented_layers("layer 0  errors params\nlayer 3  model optim\n") == {
        "errors": 0, "params": 0, "model": 3, "optim": 3}
    assert LAYERS["ops"] < LAYERS["model"] < LAYERS["train"]


# --- functions of a screen or less -------------------------------------------------------------------

MAX_FUNCTION_LINES = 60  # a screen: a function longer than this does more than one thing


def long_functions(package: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions (decorators and docstring included) longer than `limit` lines."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                if node.end_lineno - start + 1 > limit:
                    found.append(f"{path.relative_to(package.parent)}:{start} {node.name} "
                                 f"({node.end_lineno - start + 1} lines)")
    return found


def test_no_function_is_longer_than_a_screen():
    assert long_functions() == []


def test_a_long_function_is_reported(tmp_path):
    (tmp_path / "npllama").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "npllama" / "long.py").write_text("def long():\n" + body)
    assert long_functions(tmp_path / "npllama") == [f"npllama/long.py:1 long ({MAX_FUNCTION_LINES + 1} lines)"]
