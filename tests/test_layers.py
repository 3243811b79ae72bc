"""The package's layers: lower ones never import higher ones, and no module imports itself back
through others -- counting the imports inside functions, which are dependencies all the same."""

from __future__ import annotations

import ast
import functools
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

import lomar

PACKAGE = Path(lomar.__file__).parent
LOWER = {"models", "tokenizers", "data", "checkpoints"}
HIGHER = {"methods", "train", "eval", "viz", "bench", "cli", "integrations"}
PENDING: set[str] = set()  # modules whose imports inside functions are not checked (none)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["lomar", *path.relative_to(PACKAGE).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: list[str], modules) -> set[str]:
    """The lomar modules an import statement names (``package``: the importing module's package)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
    return {t for t in targets if t in modules}


def _package(name: str, path: Path) -> list[str]:
    return name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]


def _called(func: ast.expr) -> str | None:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _dynamic_targets(node: ast.Call, modules) -> set[str]:
    """The lomar module an ``importlib.import_module(...)`` or ``__import__(...)`` call names by a literal:
    the deepest module the name starts with, and for an f-string the deepest one its literal beginning
    names (``f"lomar.methods.{name}"``, ``"lomar.methods." + name``: lomar.methods). A name held in a variable is
    not seen."""
    if _called(node.func) not in {"import_module", "__import__"} or not node.args:
        return set()
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        name = first.value
    elif isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant):
        name = str(first.values[0].value).rpartition(".")[0]  # the part after the last dot is cut by the {...}
    elif isinstance(first, ast.BinOp) and isinstance(first.left, ast.Constant) and isinstance(first.left.value, str):
        name = first.left.value.rpartition(".")[0]  # "lomar.train." + name
    else:
        return set()
    if name.startswith("."):  # import_module(".config", "lomar.train") / (..., package="lomar.train")
        package = node.args[1] if len(node.args) > 1 else next(
            (k.value for k in node.keywords if k.arg == "package"), None)
        if not (isinstance(package, ast.Constant) and isinstance(package.value, str)):
            return set()
        level = len(name) - len(name.lstrip("."))
        base = package.value.split(".")[:len(package.value.split(".")) - level + 1]
        name = ".".join(base + ([name.lstrip(".")] if name.lstrip(".") else []))
    parts = name.split(".")
    prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
    return {next((p for p in prefixes if p in modules), None)} - {None}


def module_imports(name: str, path: Path, source: str, modules) -> set[str]:
    """The lomar modules that module ``name`` imports anywhere in its source: import statements at the top or
    inside a function, and ``importlib.import_module`` / ``__import__`` calls naming a module by a literal."""
    package, found = _package(name, path), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _targets(node, package, modules)
        elif isinstance(node, ast.Call):
            found |= _dynamic_targets(node, modules)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    """module -> the lomar modules it imports anywhere in its source (:func:`module_imports`): a copy of its own, which
    a test may change."""
    return {name: set(targets) for name, targets in _parsed_graph().items()}


@functools.cache
def _parsed_graph() -> dict[str, frozenset[str]]:
    # every source file parsed once a session: a parse of the package takes over a second, and 16 tests read it
    modules = _modules()
    return {name: frozenset(module_imports(name, path, path.read_text(), modules)) for name, path in modules.items()}


def imports_inside_functions(name: str, source: str, modules) -> list[tuple[int, set[str], str]]:
    """(line, lomar modules imported, the reason comment or "") of each import of lomar's own modules
    inside a function of module ``name``. The reason: a comment on the statement's lines, or a
    comment line right above it."""
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    package = name.split(".") if name in modules and modules[name].name == "__init__.py" else name.split(".")[:-1]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                targets = _targets(child, package, modules)
                if targets:
                    own = [comments[n] for n in range(child.lineno, child.end_lineno + 1) if n in comments]
                    above = child.lineno - 1
                    if not own and above in comments and lines[above - 1].lstrip().startswith("#"):
                        own = [comments[above]]
                    found.append((child.lineno, targets, " ".join(own)))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(source), False)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle_even_through_imports_inside_functions():
    assert _cycles(import_graph()) == []


def upward_imports(graph: dict[str, set[str]], lower: set[str] = LOWER, higher: set[str] = HIGHER) -> list[str]:
    """"lower -> ... -> higher" for each module of a ``lower`` layer that reaches a ``higher`` one, directly or
    through any modules between (``lomar.dense`` re-exports ``lomar.integrations``, say): the shortest such chain."""
    found = []
    for start in sorted(m for m in graph if _layer(m) in lower):
        chains, seen = [[start]], {start}
        while chains:
            chain = chains.pop(0)
            if _layer(chain[-1]) in higher:
                found.append(" -> ".join(chain))
                break
            for nxt in sorted(graph.get(chain[-1], ())):
                if nxt not in seen:
                    seen.add(nxt)
                    chains.append([*chain, nxt])
    return found


def test_lower_layers_never_import_higher_ones():
    assert upward_imports(import_graph()) == []


def test_eval_never_imports_train():
    """Training runs evaluate (the k-NN monitor, ``--eval-only``, the finetuning encoder's read), never the other way
    round: what both use (the progress bar, the lr curve) lives below both, in :mod:`lomar.progress_bar` and
    :mod:`lomar.lr_schedule`."""
    assert upward_imports(import_graph(), lower={"eval"}, higher={"train"}) == []


def test_every_package_has_a_layer():
    """A new subpackage is placed in LOWER or HIGHER, or the layer test would not look at it."""
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages - LOWER - HIGHER == set()


def _crafted(source: str, importer: str = "lomar.models.vit") -> set[str]:
    modules = _modules()
    return module_imports(importer, modules[importer], source, modules)


@pytest.mark.parametrize("source", [
    "import lomar.train.config",
    "from lomar.train import config",
    "from ..train import config",
    "from .. import train",
    "def f():\n    from lomar.methods import get_method  # reason\n",
    "import importlib\nimportlib.import_module('lomar.train.config')",
    "from importlib import import_module\ndef f():\n    return import_module('lomar.cli.app').main",
    "import importlib\nimportlib.import_module('.config', package='lomar.train')",
    "import importlib\nimportlib.import_module(f'lomar.methods.{1}')",
    "import importlib\nimportlib.import_module('lomar.train.' + 'config')",
    "__import__('lomar.viz.curves')",
    "from lomar import dense",  # a top-level module re-exporting a higher layer
])
def test_the_layer_checker_sees_every_form_of_upward_import(source):
    graph = import_graph()
    graph["lomar.models.vit"] = _crafted(source)
    assert [chain for chain in upward_imports(graph) if chain.startswith("lomar.models.vit -> ")]


def test_the_layer_checker_leaves_imports_within_the_lower_layers_alone():
    assert _crafted("import importlib\nimportlib.import_module('lomar.models.attention')\nfrom . import relpos") == {
        "lomar.models.attention", "lomar.models", "lomar.models.relpos"}


def test_the_checker_sees_a_cycle_and_an_import_inside_a_function():
    graph = {"lomar.a": {"lomar.b"}, "lomar.b": {"lomar.a"}, "lomar.c": set()}
    assert _cycles(graph) == [["lomar.a", "lomar.b"]]
    assert "lomar.methods" in import_graph()["lomar.train.config"]  # imported inside functions there


def test_no_module_is_over_400_lines():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 400} == {}


def _deferred() -> dict[str, list[tuple[int, set[str], str]]]:
    modules = _modules()
    return {name: imports_inside_functions(name, path.read_text(), modules)
            for name, path in sorted(modules.items()) if name not in PENDING}


def test_every_import_inside_a_function_says_why():
    """An import of lomar's own modules is deferred into a function only for a reason (mostly: to keep
    torch out of ``--help``), and the line says which; anything else belongs at the module's top."""
    unexplained = [f"{name}:{line}" for name, found in _deferred().items() for line, _, reason in found if not reason]
    assert unexplained == []


@pytest.mark.slow
def test_only_what_help_does_not_load_is_deferred_for_it():
    """In a module that ``lomar --help`` / ``lomar CMD --help`` loads, deferring a module that --help
    loads anyway gains nothing; outside those modules, "not for --help" is not a reason."""
    code = ("import sys, lomar.cli.app as a; a.build_parser(); "
            "print(' '.join(m for m in sys.modules if m == 'lomar' or m.startswith('lomar.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    help_path = set(result.stdout.split())
    assert {"lomar.cli.app", "lomar.train.config", "lomar.train.settings"} <= help_path
    needless = [f"{name}:{line}" for name, found in _deferred().items() if name in help_path
                for line, targets, _ in found if targets <= help_path]
    misplaced = [f"{name}:{line}" for name, found in _deferred().items() if name not in help_path
                 for line, _, reason in found if "--help" in reason]
    assert needless == [] and misplaced == []


# What runs before torch is needed imports none: `lomar --help` and the commands' argument checks, the helpers below
# both eval and train, gpu_check.sh's test-set maker (a process of its own per set, within the set's limit), and
# lomar bench --task backbone's parent, which plans and starts a process per variant (each imports torch itself).
TORCH_FREE = ("lomar.values", "lomar.errors", "lomar.yaml_io", "lomar.progress_bar", "lomar.lr_schedule",
              "lomar.cli.app", "lomar.cli.command_lines", "lomar.cli.stop_signals", "lomar.cli.suggest",
              "lomar.cli.probe", "lomar.train.settings",
              "lomar.train.setting_names", "lomar.train.task_config", "lomar.train.settings_resume",
              "lomar.train.config_checks", "lomar.train.preemption", "lomar.train.process_count",
              "lomar.checkpoints.kinds", "lomar.checkpoints.file_names", "lomar.checkpoints.run_folder",
              "lomar.bench.testset", "lomar.bench.backbone_plan", "lomar.bench.report",
              "lomar.models", "lomar.models.vit_config", "lomar.models.attention_sizes",
              "lomar.data.demo_images", "lomar.data.image_names", "lomar.data.class_roots")


@pytest.mark.slow  # a python process: ~0.3 s
def test_the_torch_free_modules_import_no_torch():
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            "    if 'torch' in sys.modules:\n"
            "        sys.exit(f'{name} imports torch')\n")
    result = subprocess.run([sys.executable, "-c", code, *TORCH_FREE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# timm and torchvision import torch._dynamo (about a second) and matplotlib is slow to import: imported where a
# model, an image or a figure needs them, not by what loads a model, exports one, resolves settings or starts a
# pretraining run.
DEFERRED_PACKAGES = ("timm", "torchvision", "matplotlib")
COMMAND_PATHS = ("lomar.train.pretrain", "lomar.checkpoints.convert", "lomar.checkpoints.formats",
                 "lomar.methods.lomar", "lomar.methods.mae", "lomar.methods.beit")


@pytest.mark.slow  # a python process importing torch: a few seconds
def test_command_paths_leave_timm_torchvision_and_matplotlib_unimported(tmp_path):
    code = ("import contextlib, importlib, io, sys\n"
            "from lomar.cli.app import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['pretrain', '--print-config']) == 0\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({DEFERRED_PACKAGES!r}))))\n")
    result = subprocess.run([sys.executable, "-c", code, *COMMAND_PATHS], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []


def test_the_reason_checker_reads_comments_on_and_above_the_line():
    modules = {"lomar.a": PACKAGE / "a.py", "lomar.b": PACKAGE / "b.py"}
    source = ("import lomar.b\n\n\ndef f():\n    import lomar.b\n    import lomar.b  # torch: not for --help\n"
              "    # torch: not for --help\n    from lomar import b\n    import json\n")
    assert imports_inside_functions("lomar.a", source, modules) == [
        (5, {"lomar.b"}, ""), (6, {"lomar.b"}, "# torch: not for --help"), (8, {"lomar.b"}, "# torch: not for --help")]
