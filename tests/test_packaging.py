"""DESIGN §1: the distribution installs ``interformer`` with the kernels as ``interformer.kernels``
(from the top-level ``kernels/`` folder), and never a top-level module ``kernels`` (that name
belongs to another PyPI distribution)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# never copied: build outputs (setuptools keeps stale files in build/lib, which would ship them),
# environments, caches and links made by tools (bench/gpu_session.sh's interformer/kernels)
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                 ".benchmarks", "results", ".whl", ".demo")


def test_the_wheel_holds_interformer_and_its_kernels_only(tmp_path):
    src = tmp_path / "src"  # a clean copy of the source: the build writes build/ and egg-info there
    shutil.copytree(ROOT, src, ignore=_IGNORE, symlinks=True)
    (src / "interformer" / "kernels").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", str(src), "-w", str(tmp_path / "wheel")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "wheel").glob("interformer_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"interformer"}, tops
    shipped = {n.split("/")[-1] for n in names if n.startswith("interformer/kernels/")}
    assert shipped == {p.name for p in (ROOT / "kernels").glob("*.py")}, shipped
