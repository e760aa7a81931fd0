"""The package's shape: which layer may import which, and what the wheel installs.

Layers, bottom up: `infllm.config` and `infllm.errors`; the engine (`infllm.engine`); documents
(`infllm.documents`); then citations, runtime, session, snapshots and the public API; the command line
(`infllm.cli`) on top. Imports are read from the source with `ast` (function-level and TYPE_CHECKING imports
included), so a rule holds whether or not the import runs.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"core": "infllm", "infllm_cli": "infllm.cli", "prompts": "infllm.prompts"}  # pyproject's package-dir


def modules() -> dict[str, Path]:
    """Every module of the package by its installed name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """The infllm modules `name` imports (relative imports resolved against its package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    known = set(modules())
    return {m for m in out if m in known and m != name}


def under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


GRAPH = {name: imports(name, path) for name, path in modules().items()}


@pytest.mark.parametrize("layer, allowed", [
    ("infllm.engine", ("infllm.engine", "infllm.config", "infllm.errors")),
    ("infllm.documents", ("infllm.documents", "infllm.config", "infllm.errors")),
    ("infllm.config", ("infllm.errors",)),
    ("infllm.errors", ()),
])
def test_a_layer_imports_nothing_above_it(layer, allowed):
    broken = {f"{m} imports {dep}" for m, deps in GRAPH.items() if under(m, layer)
              for dep in deps if not under(dep, *allowed)}
    assert not broken, sorted(broken)


def test_the_library_never_imports_the_command_line():
    broken = {f"{m} imports {dep}" for m, deps in GRAPH.items() if not under(m, "infllm.cli")
              for dep in deps if under(dep, "infllm.cli")}
    assert not broken, sorted(broken)


PUBLIC = ("infllm", "infllm.api", "infllm.run", "infllm.batch", "infllm.estimate", "infllm.errors", "infllm.config",
          "infllm.reporting", "infllm.answer", "infllm.remote", "infllm.server")  # what the command line (and any other program) builds on


def test_the_command_line_imports_only_the_public_api():
    broken = {f"{m} imports {dep}" for m, deps in GRAPH.items() if under(m, "infllm.cli")
              for dep in deps if not under(dep, "infllm.cli") and dep not in PUBLIC}
    assert not broken, sorted(broken)


def test_help_and_usage_errors_import_no_torch():
    """`infllm --help` and a bad flag answer at once: the command line loads torch only once a command runs."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom infllm.cli.app import app\n"
            "r = CliRunner().invoke(app, ['ask', '--help'])\nassert r.exit_code == 0, r.output\n"
            "r = CliRunner().invoke(app, ['ask', '--window', '-1', 'a.txt', 'q'])\nassert r.exit_code == 2\n"
            "print(sorted(m for m in ('torch', 'transformers', 'pypdf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_module_imports_itself_back():
    """No import cycle between modules, lazy (function-level) imports included: a cycle makes the import order
    matter and the layers meaningless."""
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for dep in GRAPH[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    assert not [m for m in sorted(GRAPH) if m in reach(m)]


# Declared for what they do inside another dependency, never imported by the package itself.
USED_THROUGH = {"gguf": "transformers reads GGUF files with it"}


def test_every_declared_dependency_is_used():
    """A dependency nothing imports is installed for nothing (and may need what the run time lacks: a network)."""
    import re
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    imported = set()
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    names = {re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower().replace("-", "_") for spec in declared}
    assert sorted(names - imported - USED_THROUGH.keys()) == []


def test_the_wheel_installs_one_name_and_every_module(tmp_path):
    """`pip install infllm` puts `infllm` and its metadata in site-packages, nothing else, and every module and
    template of the three source folders is in it."""
    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("infllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"infllm", wheel.name.split("-py3")[0] + ".dist-info"}
    expected = {"/".join(m.split(".")) + ("/__init__.py" if p.name == "__init__.py" else ".py")
                for m, p in modules().items()}
    expected |= {f"infllm/prompts/{p.name}" for p in (REPO / "prompts").glob("*.txt")}
    assert expected <= set(names), sorted(expected - set(names))
