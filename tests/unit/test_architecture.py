"""The architecture's rules, checked on the source (no imports of the code under test):

1. Outside ``engine/tasks/`` (and the job schema's ``Task`` literal) no code names a task or compares a
   job's task: it asks the task (``get_task(job.model.task).<attribute>``). Outside ``engine/tasks/`` and
   ``cluster/modalities/`` no code compares a modality: it asks the modality object (``modality_of(job)``).
2. No two modules of ``engine/`` and ``cluster/`` import each other, directly or around a longer cycle,
   counting imports inside functions (those under ``if TYPE_CHECKING:`` are not imports at run time).
3. ``peft`` is imported only in the ``engine/adapters/`` package (PEFT wrapping and the fused LoRA path),
   ``deepspeed`` only in ``engine/backends/deepspeed.py``.
4. ``engine/`` and ``cluster/`` are grouped by concern: every module sits in its concern's folder (``engine/errors.py``
   aside), and the layout table (README.md or CONTRIBUTING.md) names every folder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "cluster")
ALLOWED_TASK_NAMES = {"engine/config/sections.py"}  # the schema's own Literal of task names
MODALITY_HOMES = ("engine/tasks/", "cluster/modalities/")


def task_names() -> set[str]:
    """Every registered task's name (``engine.tasks.base.TASK_MODULES``, read from its source)."""
    tree = ast.parse((ROOT / "engine/tasks/base.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "TASK_MODULES":
            return {key.value for key in node.value.keys}
    raise AssertionError("engine/tasks/base.py defines no TASK_MODULES")


TASK_NAMES = task_names()


def source_files() -> dict[str, Path]:
    """Module name -> file, for every module of the packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def task_name_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of every task name spelled as a string and every comparison of a ``task`` value."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in TASK_NAMES:
            found.append((node.lineno, f"names the task '{node.value}'"))
        elif isinstance(node, ast.Compare) and not all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            for side in (node.left, *node.comparators):
                if (isinstance(side, ast.Attribute) and side.attr == "task") or (isinstance(side, ast.Name) and side.id == "task"):
                    found.append((node.lineno, f"compares the task: {ast.unparse(node)}"))
    return sorted(found)


def test_task_names_are_compared_only_inside_engine_tasks():
    from engine.tasks import TASK_MODULES

    assert set(TASK_MODULES) == TASK_NAMES and len(TASK_NAMES) >= 6  # this test knows every task
    offences = []
    for path in source_files().values():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("engine/tasks/") or rel in ALLOWED_TASK_NAMES:
            continue
        offences += [f"{rel}:{line}: {what}" for line, what in task_name_uses(ast.parse(path.read_text()))]
    assert not offences, "ask the task (engine.tasks.get_task) instead:\n" + "\n".join(offences)


def modality_comparisons(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of every comparison of a ``modality`` value (an attribute or a name)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and not all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            for side in (node.left, *node.comparators):
                if (isinstance(side, ast.Attribute) and side.attr == "modality") or (isinstance(side, ast.Name) and side.id == "modality"):
                    found.append((node.lineno, f"compares the modality: {ast.unparse(node)}"))
    return sorted(found)


def test_modalities_are_compared_only_inside_the_task_and_modality_modules():
    offences = []
    for path in source_files().values():
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(MODALITY_HOMES):
            offences += [f"{rel}:{line}: {what}" for line, what in modality_comparisons(ast.parse(path.read_text()))]
    assert not offences, "ask the modality object (cluster.modalities.modality_of) instead:\n" + "\n".join(offences)


def test_the_modality_scan_finds_comparisons():
    tree = ast.parse("if get_task(t).modality == 'audio':\n    pass\nx = MODALITIES[task.modality]\ny = modality != 'text'\n")
    assert [line for line, _ in modality_comparisons(tree)] == [1, 4]


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    return skipped


def imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """The package modules a module imports anywhere in it (functions included)."""
    skipped = type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    return {name: imported_modules(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


def test_no_two_modules_import_each_other():
    graph = import_graph()
    cycles = import_cycles(graph)
    described = []
    for group in cycles:
        edges = [f"{a} -> {b}" for a in group for b in sorted(graph[a]) if b in group]
        described.append(", ".join(edges))
    assert not cycles, "import cycles (move what both need into a module below them):\n" + "\n".join(described)


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_task_name_scan_finds_literals_and_comparisons():
    tree = ast.parse("if job.model.task == x:\n    y = {'ctc': 1}\nz = task in names\nok = get_task(name).modality == 'audio'\n")
    assert [line for line, _ in task_name_uses(tree)] == [1, 2, 3]


def third_party_imports(tree: ast.AST, top: str) -> list[int]:
    """Lines that import ``top`` or one of its submodules (anywhere, functions included)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == top or a.name.startswith(top + ".") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (node.module == top or node.module.startswith(top + ".")):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize(("library", "home"), [("peft", "engine/adapters/"), ("deepspeed", "engine/backends/deepspeed.py")])
def test_a_library_is_imported_in_one_place_only(library, home):
    offences = []
    for path in source_files().values():
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(home):
            offences += [f"{rel}:{line}" for line in third_party_imports(ast.parse(path.read_text()), library)]
    assert not offences, f"{library} is imported outside {home}:\n" + "\n".join(offences)


def test_the_import_scan_finds_imports_in_functions():
    tree = ast.parse("import peft\ndef f():\n    from peft.tuners import x\nimport peftish\nfrom other import peft\n")
    assert third_party_imports(tree, "peft") == [1, 3]


# Each package's folders, one per concern; a new one is added here and to the layout table.
CONCERNS = {
    "engine": {
        "config": "the job schema", "tasks": "what each task is", "preprocessing": "modality preprocessing",
        "models": "loading and surgery", "adapters": "PEFT", "backends": "DDP and DeepSpeed", "perf": "speed",
        "loop": "the per-worker recipe", "checkpoints": "checkpoints and exports", "evaluation": "metrics and generation",
        "safeguards": "forgetting, drift, negative transfer",
    },
    "cluster": {
        "cli": "the command line", "preflight": "checks before Ray starts", "modalities": "what a modality is on the driver",
        "ingest": "Ray Data reading and preprocessing", "run": "a training run: Ray, the TorchTrainer, console, reports",
        "tune": "the search", "remote": "Jobs API, the local cluster", "datagen": "offline demo data",
    },
}
LOOSE = {"engine": {"__init__.py", "errors.py"}, "cluster": {"__init__.py"}}


def layout_tables() -> str:
    """The text of the documents that hold the layout table."""
    return "\n".join((ROOT / name).read_text() for name in ("README.md", "CONTRIBUTING.md") if (ROOT / name).is_file())


@pytest.mark.parametrize("package", sorted(CONCERNS))
def test_each_package_is_grouped_by_concern_and_the_layout_table_names_each_folder(package):
    root = ROOT / package
    folders = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    loose = {p.name for p in root.glob("*.py")}
    assert folders == set(CONCERNS[package]), f"{package}/ folders {sorted(folders)} differ from the concerns {sorted(CONCERNS[package])}"
    assert loose == LOOSE[package], f"modules outside a concern's folder: {sorted(loose - LOOSE[package])}"
    missing = [name for name in CONCERNS[package] if f"| `{package}/{name}/` |" not in layout_tables()]
    assert not missing, f"the layout table has no row for {package}/{missing}"
