"""bench/report.py: plain and CUDA-graph providers are compared within their own kind.

A plain timing at the DESIGN shapes is mostly host time and a graphed one device time, so a
"speedup" of a graphed fused step over a plain eager one would mix the two; the table keeps them
apart. Rows here are written by hand (the report is pure bookkeeping over them).
"""

import importlib.util
import json
import re
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


def _table_rows(md: str) -> list:
    """Every line of the first table of ``md`` as a dict."""
    lines = []
    for ln in md.splitlines():
        if ln.startswith("|"):
            lines.append(ln)
        elif lines:
            break
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, [c.strip() for c in ln.strip("|").split("|")])) for ln in lines[2:]]


def test_rows_of_different_devices_or_dtypes_are_never_compared(report):
    """Two runs' files read together: an H100 eager row and an H200 fused row of one op are two
    lines, never one ratio (found: they made one line, "fused vs eager" H100 eager over H200 fused)."""
    rows = [_row("eager", 2.0), _row("fused", 1.0, device="H200"), _row("eager", 4.0, device="H200"),
            _row("eager", 3.0, dtype="float16"), _row("fused", 1.5, dtype="float16")]
    lines = _table_rows(report.markdown(rows))
    assert len(lines) == 3
    by = {(ln["device"], ln["dtype"]): ln for ln in lines}
    assert by[("dev", "bfloat16")]["fused vs eager"] == "–"       # no fused row on that device
    assert by[("H200", "bfloat16")]["fused vs eager"] == "4.00×"  # 4 / 1, both H200
    assert by[("dev", "float16")]["fused vs eager"] == "2.00×"
    # one device and dtype: no such columns
    assert "device" not in _table_rows(report.markdown([_row("eager", 2.0), _row("fused", 1.0)]))[0]
    assert set(report.speedups(rows)) == {"model-train/taobao/train/H200/bfloat16", "model-train/taobao/train/dev/bfloat16",
                                          "model-train/taobao/train/dev/float16"}


def test_duplicate_rows_are_named_with_every_value(report):
    """A rerun appended to one ``.jsonl`` gives a cell two rows: the last is shown and the cell is
    named with both values (found: H200 2026-11-27b, the low-rank cross net's fused-cudagraph row
    0.1426 then 0.1397 ms, and amazon's fused-compile-attention training row 25.50 then 23.18 ms,
    were chosen silently)."""
    md = report.markdown([_row("eager", 2.0), _row("fused", 0.5), _row("fused", 1.0)])
    assert _table_row(md, "model-train")["fused vs eager"] == "2.00×"
    dup = [ln for ln in md.splitlines() if ln.startswith("**Duplicate rows**")]
    assert len(dup) == 1 and "`fused`" in dup[0] and "0.5, 1" in dup[0]
    assert "Duplicate" not in report.markdown([_row("eager", 2.0), _row("fused", 1.0)])


def test_setting_variants_are_not_taken_for_the_fused_path(report):
    """``fused-8warps`` and the like measure a non-default setting: they keep their own columns but
    neither the "fused" ratios nor "fused x floor" come from them (found: the H200 2026-11-27b table
    said 0.91x and x floor 14.9 for the low-rank cross net's graphed fused path, both of
    ``fused-8warps-cudagraph``; the default's were 0.88x and 15.3)."""
    rows = [_row("eager", 1.0), _row("fused", 0.8, x_floor=80.0), _row("fused-8warps", 0.5, x_floor=50.0),
            _row("fused-phases", 0.4), _row("fused-triton-gemm", 0.3), _row("fused-store", 0.2),
            _row("compile-cudagraph", 0.1234), _row("fused-cudagraph", 0.1397, x_floor=15.3),
            _row("fused-8warps-cudagraph", 0.136, x_floor=14.9)]
    row = _table_row(report.markdown(rows), "model-train")
    assert row["fused vs eager"] == "1.25×"                                # 1.0 / 0.8
    assert row["fused vs best other"] == "1.25× (eager)"                   # a setting variant is no "other"
    assert row["graphed: fused vs best other"] == "0.88× (compile-cudagraph)"  # 0.1234 / 0.1397
    assert row["fused x floor"] == "15.3"
    assert row["fused (plain / graphed)"] == "fused / fused-cudagraph"
    assert row["fused-8warps-cudagraph"] == "0.136"
    assert report.is_default_fused("fused-compile-reduce-overhead") and report.is_default_fused("fused-streams-cudagraph")
    assert not report.is_default_fused("fused-store-cudagraph")


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, None, float("inf")])
@pytest.mark.parametrize("bad_first", [True, False])
def test_invalid_timings_are_named_and_left_out_of_every_ratio(report, bad, bad_first):
    """A median that is not a positive finite number neither crashes the report (found: 0 raised
    ZeroDivisionError in the table and the chart, None a TypeError) nor wins or loses a comparison
    by the order of the rows (found: a NaN fused row read before fused-compile gave "nan×", after it
    "2.00×")."""
    rows = [_row("eager", 2.0, x_floor=4.0), _row("fused-compile", 1.0, x_floor=2.0),
            _row("fused-cudagraph", 0.5, x_floor=1.0), _row("eager-cudagraph", 1.0)]
    broken = _row("fused", bad, x_floor=bad)
    rows = [broken] + rows if bad_first else rows + [broken]
    md = report.markdown(rows)
    row = _table_row(md, "model-train")
    assert row["fused"] == "invalid"
    assert row["fused vs eager"] == "2.00×" and row["graphed: fused vs best other"] == "2.00× (eager-cudagraph)"
    assert row["fused x floor"] == "1.0"
    assert any(ln.startswith("**Invalid timings**") and "`fused`" in ln for ln in md.splitlines())
    assert report.speedups(rows)["model-train/taobao/train"] == {"eager": 1.0, "fused-compile": 2.0,
                                                                "eager-cudagraph": 1.0, "fused-cudagraph": 2.0}


def test_peak_memory_ratio_needs_finite_peaks(report):
    rows = [_row("eager", 2.0, peak_extra_MiB=10.0), _row("fused", 1.0, peak_extra_MiB=float("nan"))]
    assert _table_row(report.markdown(rows), "model-train")["fused/eager peak mem"] == "–"
    rows = [_row("eager", 2.0, peak_extra_MiB=10.0), _row("fused", 1.0, peak_extra_MiB=0.0)]
    assert _table_row(report.markdown(rows), "model-train")["fused/eager peak mem"] == "0.00"


def test_every_runs_note_is_shown(report):
    """The smoke note ("timings are not meaningful") shows whichever row comes first (found: only
    the first row's note was read, so a GPU row first hid it)."""
    md = report.markdown([_row("eager", 2.0), _row("eager", 2.0, device="cpu (smoke)", dtype="float32",
                                                   note="CPU smoke run: timings are not meaningful")])
    assert "> CPU smoke run: timings are not meaningful" in md


def test_design_measures_are_reported_against_the_measured_ceilings(report):
    """DESIGN §6: throughput, peak memory and achieved GB/s or TFLOP/s against the measured
    ceilings, in the markdown, for the row the floor multiple comes from; the ceilings are named."""
    rows = [_row("eager-cudagraph", 0.2), _row("fused", 1.0),
            _row("fused-cudagraph", 0.1, samples_per_s=2.048e7, peak_extra_MiB=42.0, GBps=1500.0, frac_copy_bw=0.5,
                 TFLOPs=8.0, frac_bf16_peak=0.01, floor_ms=0.05, x_floor=2.0, ceil_copy_GBps=3000.0,
                 ceil_bf16_TFLOPs=800.0)]
    md = report.markdown(rows)
    assert "Measured ceilings: dev: copy 3000 GB/s, bf16 matmul 800 TFLOP/s." in md
    details = [ln for ln in md.splitlines() if ln.startswith("| model-train | taobao | train | fused-cudagraph |")]
    assert details == ["| model-train | taobao | train | fused-cudagraph | 0.1 | 2.05e+07 | 42.0 | 1500 | 50% | 8.0 "
                       "| 1.0% | 50.0 | 2.0 |"]
    # rows written before the ceilings were recorded: achieved over fraction
    old = [_row("fused-cudagraph", 0.1, GBps=1500.0, frac_copy_bw=0.5, x_floor=2.0)]
    assert "Measured ceilings: dev: copy 3000 GB/s." in report.markdown(old)


def test_an_absent_flash_attn_is_reported_under_the_table(report):
    """DESIGN §6: flash-attn is optional and "its absence is reported". Rows that ran without it say
    so (``flash_attn: "absent"``) and the report names it; it says nothing when the provider was
    measured, when there is no attention row, or for rows that never recorded the fact."""
    def att(provider, **extra):
        return _row(provider, 1.0, op="attention", mode="full", **extra)

    absent = report.markdown([att("eager", flash_attn="absent"), att("fused", flash_attn="absent")])
    assert "**Not measured**: `flash_attn`" in absent and "did not import on dev" in absent
    measured = report.markdown([att("eager", flash_attn="2.7.4"), att("flash_attn", flash_attn="2.7.4")])
    assert "Not measured" not in measured
    assert "Not measured" not in report.markdown([_row("eager", 1.0, flash_attn="absent")])
    assert "Not measured" not in report.markdown([att("eager"), att("fused")])
    mixed = report.markdown([att("eager", flash_attn="2.7.4"), att("flash_attn", flash_attn="2.7.4"),
                             att("eager", device="other", flash_attn="absent")])
    assert "did not import on other," in mixed and "dev" not in mixed.split("**Not measured**")[1]


def test_the_header_says_what_the_medians_time(report):
    """GPU rows are CUDA-event timings, a CPU smoke run's wall-clock ones (the header said CUDA
    events for both), and a mix says which is which."""
    gpu, cpu = _row("eager", 2.0), _row("fused", 1.0, device="cpu (smoke)")
    assert "Median of CUDA-event timings (ms)." in report.markdown([gpu])
    assert "Median of wall-clock timings (a CPU) (ms)." in report.markdown([cpu])
    assert "Median of CUDA-event timings (GPU rows) and wall-clock timings (CPU rows) (ms)." in report.markdown([gpu, cpu])


def test_main_keeps_existing_tables_and_names_unreadable_input(report, tmp_path, capsys):
    """A committed lease's .md and .png beside its rows are kept unless --force (regenerating one to
    look at it replaced it without a word); latest.md, which `make report` rewrites after each
    `make bench`, is replaced. A missing input, and one that is not JSON, are named in one usage
    error, not a traceback."""
    rows = tmp_path / "lease.jsonl"
    rows.write_text(json.dumps(_row("eager", 2.0)) + "\n" + json.dumps(_row("fused", 1.0)) + "\n")
    (tmp_path / "lease.md").write_text("measured\n")
    with pytest.raises(SystemExit) as exit_:
        report.main([str(rows)])
    assert exit_.value.code == 2 and "lease.md exist(s); pass --force to replace" in capsys.readouterr().err
    assert (tmp_path / "lease.md").read_text() == "measured\n"
    assert report.main([str(rows), "--force"]) == 0 and "| model-train |" in (tmp_path / "lease.md").read_text()
    latest = tmp_path / "latest.jsonl"
    latest.write_text(rows.read_text())
    (tmp_path / "latest.md").write_text("old\n")
    assert report.main([str(latest)]) == 0 and "| model-train |" in (tmp_path / "latest.md").read_text()
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "cut.jsonl").write_text(rows.read_text() + '{"op": "x", "me')  # a run cut short while writing
    (tmp_path / "gone.md").write_text("kept\n")
    for argv, message in (([str(tmp_path / "latest.json")], "no such file: .*latest.json \\(run `make bench` first\\)"),
                          ([str(tmp_path / "gone.jsonl")], "no such file: .*gone.jsonl$"),
                          ([str(tmp_path / "empty.json")], "empty.json: not valid JSON \\(Expecting value"),
                          ([str(tmp_path / "cut.jsonl")], "cut.jsonl:3: not valid JSON \\(Unterminated string")):
        with pytest.raises(SystemExit):
            report.main(argv)
        assert re.search(message, capsys.readouterr().err.strip()), argv


def test_rows_without_an_eager_of_their_kind_are_named_not_charted_as_zero(report, tmp_path, capsys):
    """A graphed provider timed where no ``eager-cudagraph`` ran (PMA's graphed rows until
    2026-11-29) has no speedup to chart: the report names it under "not in the chart", and the chart
    leaves a gap (the bar was drawn at zero, like a provider that never ran: a review's find)."""
    rows = [_row("eager", 4.0), _row("fused", 2.0), _row("fused-cudagraph", 1.0), _row("compile-cudagraph", 1.5)]
    assert report.speedups(rows) == {"model-train/taobao/train": {"eager": 1.0, "fused": 2.0}}
    assert report.unplotted(rows) == ["model-train/taobao/train: compile-cudagraph, fused-cudagraph"]
    assert report.unplotted(rows + [_row("eager-cudagraph", 3.0)]) == []
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert report.main([str(path), "--out", str(tmp_path / "new" / "dir" / "report")]) == 0  # its folder made
    out = capsys.readouterr().out
    assert (tmp_path / "new" / "dir" / "report.md").exists()
    if "no chart" not in out:  # (matplotlib present)
        assert "not in the chart" in out and "model-train/taobao/train: compile-cudagraph, fused-cudagraph" in out


def test_input_that_is_json_but_not_rows_is_named(report, tmp_path):
    """A ``.jsonl`` line that is JSON but not an object, and a JSON file that is not an object, raise
    the error naming the file (and line) that unreadable input gets (they were an AttributeError)."""
    (tmp_path / "null.jsonl").write_text(json.dumps(_row("eager", 2.0)) + "\nnull\n")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match=r"null.jsonl:2: not a row \(a JSON null"):
        report.load_rows([str(tmp_path / "null.jsonl")])
    with pytest.raises(ValueError, match=r"list.json: not a pytest-benchmark JSON file \(a JSON array"):
        report.load_rows([str(tmp_path / "list.json")])
    # pytest-benchmark's object with its parts of another kind (they were a TypeError or AttributeError)
    for name, data, message in (("dict.json", {"benchmarks": {}}, r"its benchmarks are a JSON object, not an array"),
                                ("str.json", {"benchmarks": ["x"]}, r"benchmarks\[0\] .*\(a JSON string, not an object"),
                                ("info.json", {"benchmarks": [{"extra_info": [1]}]},
                                 r"benchmarks\[0\] .*\(its extra_info a JSON array, not an object"),
                                # falsy ones too (they passed as no extra_info)
                                ("empty.json", {"benchmarks": [{"extra_info": []}]}, r"its extra_info a JSON array"),
                                ("zero.json", {"benchmarks": [{"extra_info": 0}]}, r"its extra_info a JSON number"),
                                ("false.json", {"benchmarks": [{"extra_info": False}]}, r"its extra_info a JSON boolean"),
                                ("blank.json", {"benchmarks": [{"extra_info": ""}]}, r"its extra_info a JSON string")):
        (tmp_path / name).write_text(json.dumps(data))
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + ": .*" + message):
            report.load_rows([str(tmp_path / name)])
    # a benchmark without extra_info, or with a null one, is not bench/common.py's: skipped
    (tmp_path / "none.json").write_text(json.dumps({"benchmarks": [{"extra_info": None}, {"name": "x"}]}))
    assert report.load_rows([str(tmp_path / "none.json")]) == []


def test_objects_that_are_not_rows_and_input_without_rows_are_named(report, tmp_path, capsys):
    """A ``.jsonl`` object without a field the report needs (``{}``, ``{"op": "x"}``: a KeyError
    traceback), or with a key that is not a string, and pytest-benchmark JSON whose row lacks one,
    raise the error naming the file and line (or benchmark). Input that holds no row at all (an
    empty ``.jsonl``, ``"benchmarks": []``) is a usage error, "no rows in" the files, and writes
    nothing (it wrote "_no benchmark rows_", exited 0 and said "no row group has an eager row")."""
    good = json.dumps(_row("eager", 2.0))
    for text, message in (("{}", r"bad.jsonl:2: not a row \(no op, shape, mode, provider, median_ms\)$"),
                          ('{"op": "x"}', r"bad.jsonl:2: not a row \(no shape, mode, provider, median_ms; a row needs"),
                          (json.dumps({k: v for k, v in _row("fused", 1.0).items() if k != "median_ms"}),
                           r"bad.jsonl:2: not a row \(no median_ms;"),
                          (json.dumps(_row("fused", 1.0, shape=64)),
                           r"bad.jsonl:2: not a row \(shape is a JSON number, not a string\)$")):
        (tmp_path / "bad.jsonl").write_text(f"{good}\n{text}\n")
        with pytest.raises(ValueError, match=message):
            report.load_rows([str(tmp_path / "bad.jsonl")])
    (tmp_path / "bad.json").write_text(json.dumps({"benchmarks": [
        {"name": "test_op[a]", "extra_info": _row("eager", 2.0)}, {"name": "test_other", "extra_info": {}},
        {"name": "test_op[b]", "extra_info": {"median_ms": 1.0}}]}))
    with pytest.raises(ValueError, match=r"bad.json: benchmark test_op\[b\]: extra_info is not a row \(no op, shape"):
        report.load_rows([str(tmp_path / "bad.json")])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "none.json").write_text('{"benchmarks": []}')
    for names in (["empty.jsonl"], ["none.json"], ["empty.jsonl", "none.json"]):
        paths = [str(tmp_path / n) for n in names]
        with pytest.raises(SystemExit) as exit_:
            report.main(paths + ["--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.strip().endswith(f"error: no rows in {', '.join(paths)}"), err
        assert not list(tmp_path.glob("out.*"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(),
                    reason="a CPU run's output (a GPU run selects no smoke-shape row and prints no note)")
def test_a_benchmark_run_without_a_gpu_says_its_times_are_not_meaningful():
    """Under pytest-benchmark's console table, a run on a machine without a GPU says that its times
    are the interpreter's, not a GPU's (only the skip reasons and the report said so)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not as an xdist worker
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(BENCH, "test_bench_dot_interaction.py"), "-k",
                          "smoke and fwd and fused and not cudagraph"],
                         cwd=os.path.dirname(BENCH), capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stdout.splitlines()
    notes = [i for i, line in enumerate(lines) if "timings are not meaningful" in line]
    table = [i for i, line in enumerate(lines) if line.startswith("Name (time in")]
    assert len(notes) == 1 and table and notes[0] > table[0], res.stdout[-2000:]
