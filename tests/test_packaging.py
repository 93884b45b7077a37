"""The built wheel holds the `visalign` namespace only, and works installed (not editable) in a fresh venv."""

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, check=True, **kwargs)


def test_the_wheel_installs_visalign_only_and_runs(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "outputs", "runs",
                                                                  "__pycache__", "*.egg-info", ".pytest_cache"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", source)
    (wheel,) = (tmp_path / "dist").glob("visalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"visalign", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "visalign/assets/world/base.safetensors" in names  # the shipped base model travels with it

    # A fresh venv with the wheel, not editable; its dependencies come from this environment's site-packages
    # (a .pth line adds them; that directory's own .pth files, the checkout's editable hook among them, do not run).
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = run(python, "-c", "import visalign.rewards, visalign.trainers, visalign.demo, visalign; "
                              "print(visalign.__file__)", cwd=tmp_path).stdout
    assert where.startswith(str(site)), where
    listed = run(env_dir / "bin" / "visalign", "rewards", "list", cwd=tmp_path).stdout
    assert "world-verifier" in listed and "pickscore" in listed
    assert "quickstart" in run(env_dir / "bin" / "visalign", "--help", cwd=tmp_path).stdout
    for old in ("rewards", "trainers", "demo"):  # the old top-level names are gone
        assert not (site / old).exists()
