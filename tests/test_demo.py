"""The demo (`make demo`) end to end at a small size: eager and fused agree, both throughputs and
the metrics table are printed."""

from __future__ import annotations

import re

from interformer.__main__ import main


def test_demo_prints_agreement_throughputs_and_metrics(capsys):
    main(["demo", "--train-samples", "512", "--test-samples", "256", "--batch-size", "128", "--no-progress"])
    out = capsys.readouterr().out
    m = re.search(r"rel\. diff logits (\S+), loss (\S+), worst parameter gradient (\S+)", out)
    assert m, out
    logits, loss, grad = (float(v) for v in m.groups())
    # DESIGN §5 fp32 model-level tolerance on the CPU (interpreter) path
    assert logits < 1e-4 and loss < 1e-4 and grad < 1e-4, out
    m = re.search(r"eager ([\d,.]+) samples/s, fused ([\d,.]+) samples/s", out)
    assert m and all(float(v.replace(",", "")) > 0 for v in m.groups()), out
    import torch

    if not torch.cuda.is_available():  # the note on what CPU (interpreter) throughput means
        assert "interpreter" in out
    row = re.search(r"^\s+eager\s+(\S+)\s+(\S+)\s+([\d,]+)\s+([\d,]+)$", out, re.M)
    assert row, out
    auc, ll = float(row.group(1)), float(row.group(2))
    assert 0.0 <= auc <= 1.0 and ll > 0


def test_demo_progress_bar_only_where_it_renders(monkeypatch):
    """The epoch bar draws on a terminal; with stderr a pipe or file (a CI log would get every
    redraw as text), or with ``--no-progress``, there is no bar at all: the batches come back as
    they are, so the loop reads no loss back for a postfix."""
    import io
    import sys

    from interformer.demo import _progress
    from utils import TerminalStream as Terminal

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)  # not inside Jupyter (which draws)
    batches = range(3)
    for stream, no_progress, drawn in ((Terminal(), False, True), (io.StringIO(), False, False), (Terminal(), True, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = _progress(batches, 3, "epoch", no_progress)
        assert (bar is not batches) == drawn, (type(stream).__name__, no_progress)
        assert list(bar) == [0, 1, 2]
        assert bool(stream.getvalue()) == drawn, (type(stream).__name__, no_progress, stream.getvalue())
