"""The layer order of STYLE.md §1 is checked, not remembered: import-linter's contracts in pyproject.toml
hold, they name every app, and the two disguised ways round them (the app registry, another app's
internal models) are refused here."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# The run log's internals: other apps go through traces.services / selectors / signals.
TRACES_INTERNAL_MODELS = {"IngestBatch", "SpanUpdate", "DeadRecord"}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    # --no-cache: the cache would land in the working tree (and, in a copy, could hide the change).
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _contracts() -> list[dict]:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["importlinter"]["contracts"]


def _layer_names(layer: str) -> set[str]:
    """``"(budgets) | (approvals)"`` -> ``{"budgets", "approvals"}`` (optional layers in parentheses)."""
    return {part.strip().strip("()").strip() for part in layer.replace(":", "|").split("|")}


def _python_files(*roots: str):
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


def _relative(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def test_lint_imports_keeps_every_contract():
    result = _lint_imports(ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in output, output


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract really bites: in a copy of the tree, common importing traces fails the lint."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("apps", "controlplane"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "apps" / "common" / "upward_probe.py").write_text("from apps.traces import selectors  # noqa\n")

    result = _lint_imports(tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "apps.common.upward_probe -> apps.traces.selectors" in output, output


def test_the_layers_contract_lists_every_app():
    apps_contracts = [c for c in _contracts() if c["type"] == "layers" and c.get("containers") == ["apps"]]
    assert len(apps_contracts) == 1, apps_contracts
    listed = set().union(*(_layer_names(layer) for layer in apps_contracts[0]["layers"]))
    apps = {path.parent.name for path in (ROOT / "apps").glob("*/apps.py")}
    assert apps, "no app found under apps/"
    assert apps - listed == set(), "apps missing from [tool.importlinter] layers in pyproject.toml"


def test_controlplane_sits_above_every_app():
    root_contracts = [c for c in _contracts() if c["type"] == "layers" and not c.get("containers")]
    assert [c["layers"] for c in root_contracts] == [["controlplane", "apps"]]


def test_no_app_reaches_another_through_the_app_registry():
    """``apps.get_model("projects", "Project")`` is an import that import-linter cannot see. Migrations
    are exempt: their historical registry is the only correct way for them to reach models."""
    offenders = []
    for path in _python_files("apps"):
        if "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get_model":
                offenders.append(_relative(path, node))
    assert offenders == []


def test_only_the_run_log_touches_its_internal_models():
    offenders = []
    for path in _python_files("apps", "controlplane"):
        if path.is_relative_to(ROOT / "apps" / "traces"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = {alias.name for alias in node.names}
                if (node.module == "apps.traces.models" and names & (TRACES_INTERNAL_MODELS | {"*"})) or (
                    node.module == "apps.traces" and "models" in names
                ):
                    offenders.append(_relative(path, node))
            elif isinstance(node, ast.Import):
                if any(alias.name == "apps.traces.models" for alias in node.names):
                    offenders.append(_relative(path, node))
    assert offenders == []


# What other apps may import of the run log: its public surface (CONTRIBUTING.md, "Where code goes").
TRACES_PUBLIC_MODULES = {"apps.traces.services", "apps.traces.selectors", "apps.traces.signals",
                         "apps.traces.records", "apps.traces.models"}


def test_other_apps_use_only_the_run_logs_public_surface():
    """Not its inbox, projection, admission or live internals: a higher app that reached into them
    would break the day they change, and skip what the public functions guarantee."""
    offenders = []
    for path in _python_files("apps", "controlplane"):
        if path.is_relative_to(ROOT / "apps" / "traces"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "apps.traces":
                    modules = {f"apps.traces.{alias.name}" for alias in node.names}
                elif node.module.startswith("apps.traces."):
                    modules = {node.module}
                else:
                    continue
            elif isinstance(node, ast.Import):
                modules = {alias.name for alias in node.names if alias.name.startswith("apps.traces.")}
            else:
                continue
            offenders += [f"{_relative(path, node)} {m}" for m in sorted(modules - TRACES_PUBLIC_MODULES)]
    assert offenders == []
