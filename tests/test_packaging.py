"""DESIGN §1: the distribution installs ``interformer`` with the kernels as ``interformer.kernels``
(from the top-level ``kernels/`` folder), and never a top-level module ``kernels`` (that name
belongs to another PyPI distribution)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_wheel_holds_interformer_and_its_kernels_only(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("interformer_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"interformer"}, tops
    shipped = {n.split("/")[-1] for n in names if n.startswith("interformer/kernels/")}
    assert shipped == {p.name for p in (ROOT / "kernels").glob("*.py")}, shipped
