"""bench/report.py: plain and CUDA-graph providers are compared within their own kind.

A plain timing at the DESIGN shapes is mostly host time and a graphed one device time, so a
"speedup" of a graphed fused step over a plain eager one would mix the two; the table keeps them
apart. Rows here are written by hand (the report is pure bookkeeping over them).
"""

import importlib.util
import json
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(BENCH, "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(provider, ms, **extra):
    return {"op": "model-train", "shape": "taobao", "mode": "train", "provider": provider, "median_ms": ms,
            "device": "dev", "torch": "t", "triton": "tr", "commit": "c", "dtype": "bfloat16", **extra}


def _table_row(md: str, op: str) -> dict:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0] == op:
            return dict(zip(head, cells))
    raise AssertionError(f"no row for {op}")


def test_graphed_and_plain_are_compared_separately(report):
    rows = [_row("eager", 40.0, peak_extra_MiB=200.0), _row("compile", 30.0), _row("fused", 32.0, peak_extra_MiB=120.0),
            _row("fused-compile", 35.0), _row("eager-cudagraph", 20.0), _row("compile-reduce-overhead", 16.0),
            _row("fused-cudagraph", 8.0), _row("fused-compile-reduce-overhead", 10.0)]
    row = _table_row(report.markdown(rows), "model-train")
    assert row["fused vs eager"] == "1.25×"          # 40 / 32: best plain fused, not the graphed 8 ms
    assert row["fused vs compile"] == "0.94×"        # 30 / 32
    assert row["fused vs best other"] == "0.94× (compile)"
    assert row["graphed: fused vs best other"] == "2.00× (compile-reduce-overhead)"  # 16 / 8
    assert row["fused/eager peak mem"] == "0.60"
    assert row["fused-cudagraph"] == "8"


def test_missing_kinds_leave_dashes(report):
    row = _table_row(report.markdown([_row("eager", 2.0), _row("fused", 1.0)]), "model-train")
    assert row["fused vs eager"] == "2.00×"
    assert row["fused vs compile"] == "–"
    assert row["graphed: fused vs best other"] == "–"


def test_jsonl_rows_round_trip(report, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [_row("eager", 3.0), _row("fused-cudagraph", 1.0)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert report.load_rows([str(path)]) == rows
    assert report.is_graphed("fused-cudagraph") and report.is_graphed("compile-reduce-overhead")
    assert not report.is_graphed("fused-compile")


def test_header_names_every_commit_and_memory_follows_the_best_fused_variant(report):
    rows = [_row("eager", 40.0, peak_extra_MiB=200.0), _row("fused", 32.0, peak_extra_MiB=150.0),
            _row("fused-compile", 20.0, peak_extra_MiB=100.0, commit="d")]
    md = report.markdown(rows)
    assert "commit `c, d`" in md.splitlines()[0]
    row = _table_row(md, "model-train")
    assert row["fused vs eager"] == "2.00×"          # fused-compile, the fastest plain fused variant
    assert row["fused/eager peak mem"] == "0.50"     # ... and its memory, not plain fused's 0.75


def test_floor_multiple_is_taken_from_the_fastest_fused_row(report):
    rows = [_row("eager", 4.0, x_floor=40.0), _row("fused", 2.0, x_floor=20.0), _row("fused-cudagraph", 0.5, x_floor=5.0)]
    assert _table_row(report.markdown(rows), "model-train")["fused x floor"] == "5.0"


def test_compiled_rows_that_compiled_while_timed_or_broke_are_named(report):
    rows = [_row("eager", 10.0), _row("compile", 5.0, dynamo_frames=1, dynamo_frames_compiled=1, dynamo_frames_timed=0,
                                      graph_breaks=0),
            _row("fused-compile", 12.0, dynamo_frames=9, dynamo_frames_compiled=8, dynamo_frames_timed=8, graph_breaks=0),
            _row("fused-compile-inline", 4.0, dynamo_frames=2, dynamo_frames_compiled=2, dynamo_frames_timed=0,
                 graph_breaks=1),
            _row("compile-max-autotune", 9.0, dynamo_frames=1, dynamo_frames_compiled=0, dynamo_frames_timed=0,
                 graph_breaks=0),
            _row("fused", 8.0)]
    md = report.markdown(rows)
    uncompiled = [ln for ln in md.splitlines() if ln.startswith("**Not compiled**")]
    assert len(uncompiled) == 1 and "`compile-max-autotune`" in uncompiled[0] and "`compile`" not in uncompiled[0]
    timed = [ln for ln in md.splitlines() if ln.startswith("**Compiled while timed**")]
    assert len(timed) == 1 and "`fused-compile`: 8 of 9 frames" in timed[0]
    assert "`compile`" not in timed[0] and "inline" not in timed[0]
    broken = [ln for ln in md.splitlines() if ln.startswith("**Graph breaks**")]
    assert len(broken) == 1 and "`fused-compile-inline`: 1" in broken[0] and "`fused-compile`:" not in broken[0]
    clean = report.markdown([_row("eager", 10.0), _row("compile", 5.0, dynamo_frames=1, dynamo_frames_timed=0,
                                                         graph_breaks=0)])
    assert "Compiled while timed" not in clean and "Graph breaks" not in clean and "Not compiled" not in clean
