"""The shape of the package: subpackages in layers, imports flow one way, private names stay home, modules stay small."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "refusal"
# The layers, bottom first: a module imports only from its own layer or those below (ARCHITECTURE.md, one paragraph each).
LAYERS = ["errors", "common", "settings", "model", "data", "residual", "engines", "direction", "edit", "checkpoint", "measure"]
LAYERS += ["search", "attack", "harden", "report", "run", "commands", "cli"]
TOP_LEVEL = {"__init__", "__main__", "errors", "settings"}  # the only modules outside a subpackage
# Modules allowed over 300 lines, with the reason stated in ARCHITECTURE.md.
LONG_MODULES = {"organism.py", "settings.py"}


def _modules() -> dict[str, ast.Module]:
    """Every module by its dotted name below ``refusal`` ("model.chat", "errors", "search.__init__")."""
    return {".".join(p.relative_to(SRC).with_suffix("").parts): ast.parse(p.read_text(encoding="utf-8")) for p in SRC.rglob("*.py")}


def _imports(name: str, tree: ast.Module, modules: dict) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import of the package's own modules, at any depth (function-level ones count)."""
    package = name.split(".")[:-1]  # the importing module's package, relative to refusal
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{target}.{a.name}" if target else a.name
                if sub in modules:
                    out.append((sub, []))
            if target in modules or f"{target}.__init__" in modules:
                out.append((target if target in modules else f"{target}.__init__", [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refusal."):
            out.append((node.module.removeprefix("refusal."), [a.name for a in node.names]))
    return out


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_every_module_but_a_few_lives_in_a_subpackage_of_the_layer_list():
    modules = _modules()
    top = {m for m in modules if "." not in m}
    assert top <= TOP_LEVEL, f"modules outside a subpackage: {sorted(top - TOP_LEVEL)}"
    packages = {m.split(".")[0] for m in modules if "." in m}
    assert packages <= set(LAYERS), f"subpackages missing from LAYERS: {sorted(packages - set(LAYERS))}"
    for package in packages:
        init = modules.get(f"{package}.__init__")
        assert init is not None, f"{package}/ has no __init__.py"
        assert all(isinstance(n, ast.Expr) for n in init.body), f"{package}/__init__.py holds more than its docstring"


def test_no_import_runs_back_up_a_layer():
    modules = _modules()
    upward = [
        f"{name} imports {target}"
        for name, tree in modules.items()
        if name not in ("__init__", "__main__")
        for target, _ in _imports(name, tree, modules)
        if target.split(".")[0] in LAYERS and _layer(target) > _layer(name)
    ]
    assert not upward, upward


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {
        name: {t for t, _ in _imports(name, tree, modules) if t != name and not t.endswith("__init__")}
        for name, tree in modules.items()
        if name != "__init__"
    }
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
    modules = _modules()
    offenders = [
        f"{name}.py imports {module}.{n}"
        for name, tree in modules.items()
        for module, names in _imports(name, tree, modules)
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
    for path in SRC.rglob("*.py"):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if path.name in LONG_MODULES:
            assert f"**{path.name}**" in architecture and "over 300 lines" in architecture.lower()
        else:
            assert lines <= 320, f"{path.relative_to(SRC)} has {lines} lines; split it or state the reason in ARCHITECTURE.md"


def test_architecture_md_has_a_paragraph_for_every_folder():
    architecture = (SRC.parents[1] / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [p.name for p in SRC.iterdir() if (p / "__init__.py").is_file() and f"`{p.name}/`" not in architecture]
    assert not missing, f"ARCHITECTURE.md does not describe: {missing}"


def test_the_cli_reads_no_run_file_and_calls_one_library_function_per_command():
    tree = _modules()["cli.main"]
    text = (SRC / "cli" / "main.py").read_text(encoding="utf-8")
    for needle in ("read_json", "open(", "json.load", "read_text", "RunDir", "safe_open"):
        assert needle not in text, f"cli/main.py uses {needle}: reading run files belongs in the library"
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_"):
            imported = [n for sub in ast.walk(node) if isinstance(sub, ast.ImportFrom) for n in sub.names]
            assert len(imported) <= 2, f"{node.name} imports {[a.name for a in imported]}"


def test_the_public_api_names_exist():
    import refusal

    missing = [name for name in refusal.__all__ if not hasattr(refusal, name)]
    assert not missing, f"refusal.__all__ lists names the package does not define: {missing}"


def test_importing_the_package_and_asking_its_version_load_no_torch():
    check = "import sys, refusal; assert 'torch' not in sys.modules, 'import refusal loaded torch'; print(refusal.__version__)"
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True)
    version = (
        "import sys\nfrom refusal.cli.main import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code in (0, None)\n"
        "assert 'torch' not in sys.modules, 'refusal --version loaded torch'"
    )
    done = subprocess.run([sys.executable, "-c", version], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
