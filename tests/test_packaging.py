"""The wheel (a non-editable install) carries the whole package: every module and every non-Python file
under llmstack/ (prompts, the guard's weights, the web UI, the labeling guide). An editable checkout
hides a missing ``package-data`` entry; this builds the wheel from a copy of the source and looks inside."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def source_files() -> set[str]:
    """Paths (``llmstack/...``) of the files a wheel must hold: everything under llmstack/ but bytecode."""
    return {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "llmstack").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_wheel_holds_every_file_under_the_package(tmp_path):
    # build from a copy: an in-tree build would rewrite llmstack.egg-info and leave build/ in the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT / "llmstack", src / "llmstack", ignore=JUNK)
    shutil.copy2(ROOT / "pyproject.toml", src)
    out = tmp_path / "dist"
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", build, str(out)], cwd=src, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = out / proc.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        inside = {name for name in zf.namelist() if name.startswith("llmstack/")}

    expected = source_files()
    assert {"llmstack/security/data/guard.json", "llmstack/rl/labeling.md"} <= expected  # the walk sees data
    missing = sorted(expected - inside)
    data_missing = [p for p in missing if not p.endswith(".py")]
    assert not data_missing, f"non-Python files left out of the wheel (pyproject package-data): {data_missing}"
    assert not missing, f"modules left out of the wheel (pyproject packages.find): {missing}"
    assert not [n for n in inside if "__pycache__" in n or n.endswith(".pyc")]
