"""The layer contract (`.importlinter`) holds on the tree, and breaks on a planted upward import or cycle."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # The copy comes first on the path, ahead of the editable install of the checkout.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), str(root / ".importlinter"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy(tmp_path):
    """The package's Python files and the contract, in a temporary directory to plant imports in."""
    shutil.copytree(ROOT / "visalign", tmp_path / "visalign",
                    ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    return tmp_path


def plant(root: Path, module: str, line: str) -> None:
    path = root / module
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_tree_keeps_the_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_it(copy):
    assert lint_imports(copy).returncode == 0  # the unmodified copy keeps it
    plant(copy, "visalign/rewards/base.py", "import visalign.trainers.engine")
    result = lint_imports(copy)
    assert result.returncode == 1
    assert "visalign.rewards is not allowed to import visalign.trainers" in result.stdout


def test_generic_code_importing_the_world_breaks_it(copy):
    plant(copy, "visalign/trainers/common.py", "from visalign.world.grammar import TEMPLATES")
    result = lint_imports(copy)
    assert result.returncode == 1
    assert "visalign.trainers is not allowed to import visalign.world" in result.stdout


def test_a_cycle_within_a_layer_breaks_it(copy):
    # methods imports core and drift; core importing methods closes a loop inside one package.
    plant(copy, "visalign/steering/core.py", "import visalign.steering.methods")
    result = lint_imports(copy)
    assert result.returncode == 1
    assert "No import cycles BROKEN" in result.stdout
