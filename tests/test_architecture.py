"""The shape of the package: imports flow one way, private names stay home, modules stay small."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "refusal"
# Modules allowed over 300 lines, with the reason stated in ARCHITECTURE.md.
LONG_MODULES = {"organism.py", "settings.py"}


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in SRC.glob("*.py")}


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) for every relative import in the file, at any depth (function-level imports count too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.append((node.module.split(".")[0], [a.name for a in node.names]))
            else:
                out.extend((a.name, []) for a in node.names)
    return out


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: {m for m, _ in _imports(tree) if m in modules and m != name} for name, tree in modules.items() if name != "__init__"}
    graph = {k: {m for m in v if m != "__init__"} for k, v in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_private_name_is_used_outside_its_module():
    offenders = [
        f"{name}.py imports {module}.{n}"
        for name, tree in _modules().items()
        for module, names in _imports(tree)
        for n in names
        if n.startswith("_") and n != "__version__"
    ]
    for path in list((SRC.parents[1] / "tests").glob("*.py")) + list((SRC.parents[1] / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refusal"):
                offenders += [f"{path.name} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders


def test_modules_stay_small_unless_a_reason_is_stated():
    architecture = (SRC.parents[1] / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for path in SRC.glob("*.py"):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if path.name in LONG_MODULES:
            assert f"**{path.name}**" in architecture and "over 300 lines" in architecture.lower()
        else:
            assert lines <= 320, f"{path.name} has {lines} lines; split it or state the reason in ARCHITECTURE.md"


def test_the_cli_reads_no_run_file_and_calls_one_library_function_per_command():
    tree = _modules()["cli"]
    text = (SRC / "cli.py").read_text(encoding="utf-8")
    for needle in ("read_json", "open(", "json.load", "read_text", "RunDir", "safe_open"):
        assert needle not in text, f"cli.py uses {needle}: reading run files belongs in the library"
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_"):
            imported = [n for sub in ast.walk(node) if isinstance(sub, ast.ImportFrom) for n in sub.names]
            assert len(imported) <= 2, f"{node.name} imports {[a.name for a in imported]}"


def test_the_public_api_names_exist():
    import refusal

    missing = [name for name in refusal.__all__ if not hasattr(refusal, name)]
    assert not missing, f"refusal.__all__ lists names the package does not define: {missing}"
