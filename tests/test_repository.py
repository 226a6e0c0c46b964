"""What git tracks is the same on every machine: no path of this checkout, no local store."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

LOCAL_STORE = re.compile(r"sqlite:/{4}")  # an SQLite store at an absolute path


def test_no_tracked_file_holds_a_path_of_this_checkout_or_a_local_store():
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    offenders = []
    for name in names:
        path = ROOT / name
        if path.is_file() and not path.is_symlink():
            text = path.read_bytes().decode(errors="ignore")
            if str(ROOT) in text or LOCAL_STORE.search(text):
                offenders.append(name)
    assert offenders == []


def _imported_files(module: str) -> set[str]:
    """The project files `module` imports, following every `pipeline` import in each file
    (function-level ones too: they run when the stage calls that function)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        relative = str(path.relative_to(ROOT))
        if relative in seen:
            continue
        seen.add(relative)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for imported in names:
                file = ROOT / (imported.replace(".", "/") + ".py")
                package = ROOT / imported.replace(".", "/") / "__init__.py"
                if imported.split(".")[0] in ("pipeline", "stages") and (
                    file.exists() or package.exists()
                ):
                    todo.append(imported)
    return seen


def _covered(file: str, deps: list[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("dvc_file", ["dvc.yaml", "tune/dvc.yaml"])
def test_every_stage_depends_on_every_project_file_it_imports(dvc_file):
    """Otherwise an edit to a file a stage imports leaves its outputs stale while `dvc status`
    calls them up to date."""
    stages = yaml.safe_load((ROOT / dvc_file).read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        module = stage["cmd"].split("-m ", 1)[1].split()[0]
        base = Path(dvc_file).parent / stage.get("wdir", ".")
        deps = [os.path.normpath(base / dep) for dep in stage.get("deps", [])]
        gaps = sorted(f for f in _imported_files(module) if not _covered(f, deps))
        if gaps:
            missing[name] = gaps
    assert missing == {}


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_help_and_version_load_neither_torch_ray_nor_mlflow(option):
    """They answer in a fraction of a second: the CLI's top level and its error handling are
    free of the heavy libraries, which each command imports when it runs."""
    check = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from pipeline.cli import main\n"
        f"result = CliRunner().invoke(main, ['{option}'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\n"
        "print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.rstrip().endswith("[]"), out
    assert ("Usage:" if option == "--help" else "boostpipe ") in out


def test_the_library_has_no_import_cycles():
    """Modules layered one way: following the imports between pipeline modules (function-level
    ones included) never leads back to the module it started from."""
    graph: dict[str, set[str]] = {}
    for file in (ROOT / "pipeline").rglob("*.py"):
        module = ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                graph[module].add(node.module)
                if node.module == "pipeline":  # from pipeline import tracking
                    graph[module] |= {f"pipeline.{alias.name}" for alias in node.names}
    in_cycles = []
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen and module in graph:
                seen.add(module)
                todo += graph[module]
        if start in seen:
            in_cycles.append(start)
    assert in_cycles == []
