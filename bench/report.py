"""Turn pytest-benchmark JSON into a markdown table and a PNG speedup chart.

    python bench/report.py bench/results/latest.json [more.json ...] [--out bench/results/NAME] [--force]

The table and chart go to ``NAME.md`` and ``NAME.png`` (default: the first input without its
suffix); existing ones are kept unless ``--force`` (a lease's committed table is its record),
except ``latest``'s, which ``make report`` rewrites after every ``make bench``.

Inputs are pytest-benchmark JSON files or ``.jsonl`` files of rows (one per line, as written when
``$INTERFORMER_BENCH_ROWS`` is set; such a file survives a run that was cut short). A row needs
:data:`ROW_FIELDS` (``op``, ``shape``, ``mode`` and ``provider`` strings, and a ``median_ms``, which
may be ``invalid``: see below); input that is not JSON, a ``.jsonl`` line that is not such a row, and
inputs that hold no row at all (an empty ``.jsonl``, pytest-benchmark JSON of no benchmark or of
none written by bench/common.py) are usage errors (exit 2) that name the file and line, and nothing
is written: an empty table would read as a run that measured nothing, where a wrong path or a run
that never wrote a row is more likely.

Each benchmark row carries its measurements in ``extra_info`` (see bench/common.py). The table
has one line per (op, shape, mode, device, dtype): the median time of every provider, the fused
path's speedup over eager and over ``torch.compile``, and its time as a multiple of the op's floor
(bytes over measured copy bandwidth, or FLOPs over measured bf16 matmul rate). Rows of different
devices or dtypes are never compared with each other (they get lines of their own); rows of
different commits are (a rerun of one provider), and the header names every commit. A second table
gives, for each line, the fused row the floor multiple comes from with its throughput, peak memory
and achieved GB/s and TFLOP/s against the measured ceilings (DESIGN §6). The chart plots each
provider's speedup over eager of the same kind (plain or graphed).

Decisions: "fused" in the speedup columns is the fastest row of the fused path as it ships
(:data:`FUSED_DEFAULTS`, plain or graphed); the setting variants the op benchmarks add to measure a
non-default choice (``fused-8warps``, ``fused-phases``, ``fused-triton-gemm``, ``fused-store``,
``fused-delta-output``) keep their own columns and are never taken as "fused" nor as "other". Where
several rows share a cell (a rerun appended to the same ``.jsonl``), the last one read is shown and
every such cell is named with all its values under the table. A row whose median is not a positive finite number is shown as
``invalid``, named under the table, and left out of every ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict

PREFERRED = ["eager", "compile", "compile-max-autotune", "sdpa-math", "sdpa-efficient", "sdpa-flash", "sdpa-cudnn",
             "flex", "flash_attn", "nn.MultiheadAttention", "fused", "fused-compile", "fused-compile-attention",
             "fused-compile-inline", "fused-compile-opaque", "fused-streams",
             "eager-cudagraph", "compile-cudagraph", "sdpa-efficient-cudagraph", "sdpa-cudnn-cudagraph",
             "nn.MultiheadAttention-cudagraph", "compile-reduce-overhead", "fused-cudagraph",
             "fused-compile-reduce-overhead"]
GRAPHED_SUFFIXES = ("-cudagraph", "-reduce-overhead")
#: The fused path as a user runs it (plain; the graphed variants add a suffix of GRAPHED_SUFFIXES):
#: the providers the "fused" speedup columns choose from. Any other ``fused-*`` provider is a
#: setting variant measured beside the default (bench/test_bench_crossnet.py, test_bench_gated_lce.py,
#: ``fused-compile-opaque``). ``fused-compile-inline`` is the inlined compile of results from before it
#: became ``fused-compile``'s default on a GPU.
FUSED_DEFAULTS = ("fused", "fused-compile", "fused-compile-attention", "fused-compile-inline", "fused-streams")
#: What a row must hold: the keys of its line in the table and its provider (strings), and its
#: median, whose value may be anything (a row whose median is not a positive finite number is shown
#: as ``invalid``). bench/common.py writes them all in every row.
ROW_FIELDS = ("op", "shape", "mode", "provider", "median_ms")
#: Columns that tell lines apart when the rows hold more than one value of them.
SPLIT_KEYS = ("device", "dtype")


def is_graphed(provider: str) -> bool:
    """CUDA-graph providers (captured by the benchmark, or torch.compile's reduce-overhead mode)."""
    return provider.endswith(GRAPHED_SUFFIXES)


def is_fused(provider: str) -> bool:
    """Any provider of the fused kernels, setting variants included (never an "other" provider)."""
    return provider.startswith("fused")


def is_default_fused(provider: str) -> bool:
    """The fused path with its default settings, plain or graphed (:data:`FUSED_DEFAULTS`)."""
    for suffix in GRAPHED_SUFFIXES:
        if provider.endswith(suffix):
            provider = provider[: -len(suffix)]
            break
    return provider in FUSED_DEFAULTS


def _valid(ms) -> bool:
    """A positive finite number: a usable timing (or ceiling, floor multiple, peak to divide by)."""
    return isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms) and ms > 0


def _json_kind(value) -> str:
    """JSON's name for the type of a parsed value."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "value")


def _not_a_row(row) -> str:
    """Why ``row`` (a parsed object) is not a row the report can use, or "": a field of
    :data:`ROW_FIELDS` missing, or one of the keys not a string."""
    missing = [k for k in ROW_FIELDS if k not in row]
    if missing:
        return f"not a row (no {', '.join(missing)}" + ("" if len(missing) == len(ROW_FIELDS) else
                                                        f"; a row needs {', '.join(ROW_FIELDS)}") + ")"
    wrong = [f"{k} is a JSON {_json_kind(row[k])}" for k in ROW_FIELDS[:4] if not isinstance(row[k], str)]
    return f"not a row ({', '.join(wrong)}, not a string)" if wrong else ""


def load_rows(paths):
    """Every row of ``paths`` (pytest-benchmark JSON or ``.jsonl``); ValueError naming the file and
    line of text that is not JSON (an empty file, a run cut short while writing) or not a row (a
    JSON value other than an object, or an object without :data:`ROW_FIELDS`: it was a KeyError),
    a JSON file that is not pytest-benchmark's object, and a benchmark of one whose ``extra_info``
    has a ``median_ms`` but not the rest of a row (one without a ``median_ms`` is not bench/common.py's
    and is skipped). No rows at all is not an error here: :func:`main` refuses it."""
    rows = []
    for path in paths:
        with open(path) as f:
            if path.endswith(".jsonl"):
                for number, line in enumerate(f, 1):
                    try:
                        row = json.loads(line) if line.strip() else None
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
                    if line.strip() and not isinstance(row, dict):
                        raise ValueError(f"{path}:{number}: not a row (a JSON {_json_kind(row)}, not an object)")
                    why = _not_a_row(row) if row is not None else ""
                    if why:
                        raise ValueError(f"{path}:{number}: {why}")
                    rows += [row] if row is not None else []
                continue
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a pytest-benchmark JSON file (a JSON {_json_kind(data)}, not an object)")
        benches = data.get("benchmarks", [])
        if not isinstance(benches, list):
            raise ValueError(f"{path}: not a pytest-benchmark JSON file (its benchmarks are a JSON "
                             f"{_json_kind(benches)}, not an array)")
        for number, bench in enumerate(benches):
            not_ours = f"{path}: benchmarks[{number}] is not pytest-benchmark's"
            if not isinstance(bench, dict):
                raise ValueError(f"{not_ours} (a JSON {_json_kind(bench)}, not an object)")
            # only a missing or null extra_info is none (an empty array, "", 0 or false was taken for one)
            info = bench.get("extra_info")
            info = {} if info is None else info
            if not isinstance(info, dict):
                raise ValueError(f"{not_ours} (its extra_info a JSON {_json_kind(info)}, not an object)")
            if "median_ms" in info:
                why = _not_a_row(info)
                if why:
                    raise ValueError(f"{path}: benchmark {bench.get('name', '?')}: extra_info is {why}")
                rows.append(info)
    return rows


def order_providers(names):
    known = [p for p in PREFERRED if p in names]
    return known + sorted(n for n in names if n not in known)


def _group(rows):
    """``({key: {provider: row}}, duplicates, split)``: key (op, shape, mode, device, dtype); the last
    row read wins a cell, ``duplicates`` maps each cell read more than once to all its rows; ``split``
    the SPLIT_KEYS whose values differ over the rows (the table shows them as columns)."""
    groups, seen = defaultdict(dict), defaultdict(list)
    for r in rows:
        key = (r["op"], r["shape"], r["mode"], str(r.get("device")), str(r.get("dtype")))
        groups[key][r["provider"]] = r
        seen[key + (r["provider"],)].append(r)
    duplicates = {k: v for k, v in seen.items() if len(v) > 1}
    split = [k for i, k in enumerate(SPLIT_KEYS) if len({key[3 + i] for key in groups}) > 1]
    return groups, duplicates, split


def _sort_key(key):
    return tuple(str(k) for k in key)


def _cell(row) -> str:
    ms = row.get("median_ms")
    return f"{ms:.4g}" if _valid(ms) else "invalid"


def _timing(rows) -> str:
    """What the medians are of: bench/common.py times a GPU's rows with CUDA events and a CPU's
    (a smoke run) with the wall clock."""
    cpu = {str(r.get("device", "")).startswith("cpu") for r in rows}
    return {frozenset({False}): "CUDA-event timings", frozenset({True}): "wall-clock timings (a CPU)"}.get(
        frozenset(cpu), "CUDA-event timings (GPU rows) and wall-clock timings (CPU rows)")


def markdown(rows) -> str:
    if not rows:
        return "_no benchmark rows_\n"
    out = [f"Device: **{_values(rows, 'device')}**, torch {_values(rows, 'torch')}, triton {_values(rows, 'triton')}, "
           f"commit `{_values(rows, 'commit')}`, dtype {_values(rows, 'dtype')}. Median of {_timing(rows)} (ms).", ""]
    ceilings = _ceilings(rows)
    if ceilings:
        out += ["Measured ceilings: " + "; ".join(ceilings) + ".", ""]
    notes = [n for n in dict.fromkeys(r.get("note") for r in rows) if n]
    for note in notes:
        out += [f"> {note}", ""]
    groups, duplicates, split = _group(rows)
    providers = order_providers({r["provider"] for r in rows})
    head = ["op", "shape", "mode"] + split + providers + [
        "fused vs eager", "fused vs compile", "fused vs best other", "graphed: fused vs best other", "fused x floor",
        "fused/eager peak mem", "fused (plain / graphed)"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for key, by in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
        op, shape, mode = key[:3]
        cells = [op, shape, mode] + [key[3 + SPLIT_KEYS.index(k)] for k in split]
        for p in providers:
            cells.append(_cell(by[p]) if p in by else "–")
        valid = {p: r["median_ms"] for p, r in by.items() if _valid(r.get("median_ms"))}
        plain = {p: ms for p, ms in valid.items() if not is_graphed(p)}
        graphed = {p: ms for p, ms in valid.items() if is_graphed(p)}
        best_fused, best_graphed = _best(plain, fused=True), _best(graphed, fused=True)
        eager, comp = plain.get("eager"), plain.get("compile")
        cells.append(_ratio(eager, best_fused))
        cells.append(_ratio(comp, best_fused))
        cells.append(_versus_best(plain, best_fused))
        cells.append(_versus_best(graphed, best_graphed))
        # the floor is a device-time bound: measured against the fastest fused row (a graphed one,
        # device time, where there is one; a plain one is mostly host time at these shapes)
        floor_row = _floor_row(by)
        cells.append(f"{floor_row['x_floor']:.1f}" if floor_row else "–")
        peak_e = (by.get("eager") or {}).get("peak_extra_MiB") if "eager" in plain else None
        peak_f = by[best_fused[0]].get("peak_extra_MiB") if best_fused else None
        cells.append(f"{peak_f / peak_e:.2f}" if _valid(peak_e) and _finite(peak_f) and peak_f >= 0 else "–")
        cells.append(f"{best_fused[0] if best_fused else '–'} / {best_graphed[0] if best_graphed else '–'}")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Plain providers are compared with plain ones and CUDA-graph providers (`-cudagraph`: captured "
            "and replayed by the benchmark; `-reduce-overhead`: torch.compile's CUDA-graph mode) with graphed "
            "ones: a plain timing at these shapes is mostly host time, a graphed one device time. "
            "\"fused\" is the fastest plain fused variant as it ships (" + ", ".join(FUSED_DEFAULTS) + "), and "
            "for the graphed column the fastest graphed one, both named in the last column; setting variants "
            "(e.g. `fused-8warps`) are shown in their own columns only. \"best other\" is the fastest "
            "non-fused provider of the same kind, named in brackets. \"fused x floor\": the fastest of those "
            "fused rows (graphed, where measured) over the op's floor time. Peak memory: device memory above "
            "the parameters and inputs at the peak of one call after warm-up (outside the timing loop; the "
            "previous call's gradients included), of that best plain fused variant over `eager`."]
    out += _details(groups, split)
    out += _duplicates(duplicates)
    out += _invalid(rows)
    out += _compile_warnings(rows)
    out += _absent_providers(rows)
    return "\n".join(out) + "\n"


def _absent_providers(rows) -> list:
    """A line naming the devices whose attention rows have no ``flash_attn`` row because the package
    did not import there (DESIGN §6: an optional provider whose absence is reported); a device
    where it was measured is not named. Rows written before they recorded it (no ``flash_attn``
    key) are not taken as saying it is absent."""
    attention = [r for r in rows if r.get("op") == "attention"]
    measured_on = {r.get("device", "?") for r in attention if r["provider"] == "flash_attn"}
    where = sorted({r.get("device", "?") for r in attention if r.get("flash_attn") == "absent"} - measured_on)
    if not where:
        return []
    return ["", f"**Not measured**: `flash_attn` (flash-attn's `flash_attn_varlen_func`, an optional provider) did "
                f"not import on {', '.join(where)}, so the attention rows have no column for it."]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _floor_row(by: dict):
    """The row "fused x floor" comes from: the fastest default fused graphed row with a floor, else
    the fastest plain one (None: no such row)."""
    for kind in (True, False):
        cands = [r for p, r in by.items() if is_default_fused(p) and is_graphed(p) == kind
                 and _valid(r.get("median_ms")) and _valid(r.get("x_floor"))]
        if cands:
            return min(cands, key=lambda r: r["median_ms"])
    return None


def _ceilings(rows) -> list:
    """"device: copy X GB/s, bf16 matmul Y TFLOP/s" per device, from the rows' recorded ceilings (for
    rows written before they were recorded: achieved over fraction)."""
    found = {}
    for r in rows:
        copy, mm = r.get("ceil_copy_GBps"), r.get("ceil_bf16_TFLOPs")
        if not _valid(copy) and _valid(r.get("GBps")) and _valid(r.get("frac_copy_bw")):
            copy = r["GBps"] / r["frac_copy_bw"]
        if not _valid(mm) and _valid(r.get("TFLOPs")) and _valid(r.get("frac_bf16_peak")):
            mm = r["TFLOPs"] / r["frac_bf16_peak"]
        dev = found.setdefault(str(r.get("device")), {})
        if _valid(copy):
            dev.setdefault("copy", f"copy {copy:.0f} GB/s")
        if _valid(mm):
            dev.setdefault("mm", f"bf16 matmul {mm:.0f} TFLOP/s")
    return [f"{d}: " + ", ".join(v[k] for k in ("copy", "mm") if k in v) for d, v in found.items() if v]


def _details(groups, split) -> list:
    """DESIGN §6's measures for the row each "fused x floor" comes from: time, throughput, peak
    memory, achieved GB/s and TFLOP/s as fractions of the measured ceilings, floor and multiple."""
    lines = []
    for key, by in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
        r = _floor_row(by)
        if r is None:
            continue

        def num(k, fmt, scale=1.0):
            v = r.get(k)
            return fmt.format(v * scale) if _finite(v) else "–"
        lines.append("| " + " | ".join(
            list(key[:3]) + [key[3 + SPLIT_KEYS.index(k)] for k in split] + [
                r["provider"], num("median_ms", "{:.4g}"), num("samples_per_s", "{:.3g}"), num("peak_extra_MiB", "{:.1f}"),
                num("GBps", "{:.0f}"), num("frac_copy_bw", "{:.0%}"), num("TFLOPs", "{:.1f}"), num("frac_bf16_peak", "{:.1%}"),
                num("floor_ms", "{:.1f}", 1e3), num("x_floor", "{:.1f}")]) + " |")
    if not lines:
        return []
    head = ["op", "shape", "mode"] + split + ["fused row", "ms", "samples/s", "peak MiB", "GB/s", "of copy",
                                                 "TFLOP/s", "of bf16", "floor µs", "x floor"]
    return ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + lines


def _duplicates(duplicates) -> list:
    if not duplicates:
        return []
    return ["", "**Duplicate rows** (the last one read is shown): " + "; ".join(
        f"{k[0]} {k[1]} {k[2]} `{k[5]}`" + (f" on {k[3]}" if k[3] != "None" else "") + ": "
        + ", ".join(_cell(r) for r in v) for k, v in sorted(duplicates.items(), key=lambda kv: _sort_key(kv[0]))) + "."]


def _invalid(rows) -> list:
    bad = [r for r in rows if not _valid(r.get("median_ms"))]
    if not bad:
        return []
    return ["", "**Invalid timings** (not a positive finite median; left out of every ratio): " + "; ".join(
        f"{r['op']} {r['shape']} {r['mode']} `{r['provider']}`: {r.get('median_ms')!r}" for r in bad) + "."]


def _compile_warnings(rows) -> list:
    """Lines naming the compiled rows whose time is not of compiled code alone: rows that compiled
    nothing (past dynamo's recompile limit a frame runs uncompiled), rows that compiled during their
    timed calls (a guard that failed call after call), and rows whose model broke into several
    graphs. Rows written before the counts were recorded have none and are not named."""
    timed = [r for r in rows if r.get("dynamo_frames_timed")]
    broken = [r for r in rows if r.get("graph_breaks")]
    uncompiled = [r for r in rows if r.get("dynamo_frames_compiled") == 0]
    name = lambda r: f"{r['op']} {r['shape']} {r['mode']} `{r['provider']}`"  # noqa: E731
    out = []
    if uncompiled:
        out += ["", "**Not compiled** (dynamo compiled no frame: the row timed uncompiled code): "
                + "; ".join(name(r) for r in uncompiled) + "."]
    if timed:
        out += ["", "**Compiled while timed** (the median includes compilation or uncompiled calls): "
                + "; ".join(f"{name(r)}: {r['dynamo_frames_timed']} of {r['dynamo_frames']} frames" for r in timed)
                + "."]
    if broken:
        out += ["", "**Graph breaks**: " + "; ".join(f"{name(r)}: {r['graph_breaks']}" for r in broken) + "."]
    return out


def _values(rows, key: str) -> str:
    """The distinct values of ``key`` over the rows, in order of first appearance (rows of several
    runs, e.g. two commits, are all named)."""
    return ", ".join(dict.fromkeys(str(r.get(key)) for r in rows))


def _best(times: dict, fused: bool):
    """(provider, ms) of the fastest default fused (or non-fused) provider in ``times``, or None;
    setting variants are neither. ``times`` holds valid timings only."""
    cands = [(ms, p) for p, ms in times.items() if (is_default_fused(p) if fused else not is_fused(p))]
    if not cands:
        return None
    ms, provider = min(cands)
    return provider, ms


def _ratio(base_ms, best) -> str:
    return f"{base_ms / best[1]:.2f}×" if base_ms and best else "–"


def _versus_best(times: dict, best_fused) -> str:
    other = _best(times, fused=False)
    return f"{other[1] / best_fused[1]:.2f}× ({other[0]})" if other and best_fused else "–"


def _labelled_times(rows):
    """``[(label, {provider: valid median ms})]``, one per line of the table: label ``op/shape/mode``,
    plus the device and dtype where the rows hold several."""
    groups, _, split = _group(rows)
    return [("/".join(list(key[:3]) + [key[3 + SPLIT_KEYS.index(k)] for k in split]),
             {p: r["median_ms"] for p, r in by.items() if _valid(r.get("median_ms"))})
            for key, by in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))]


def _baseline(ms: dict, provider: str):
    """The eager time a provider's speedup is taken over: ``eager-cudagraph`` for a graphed one,
    ``eager`` for a plain one (None when that row is missing)."""
    return ms.get("eager-cudagraph") if is_graphed(provider) else ms.get("eager")


def speedups(rows) -> dict:
    """``{label: {provider: speedup}}`` for the chart: each line of the table with an eager row, each
    provider's valid time over eager of the same kind (:func:`_baseline`); a provider with no valid
    time or no eager of its kind has no entry (:func:`unplotted` names those)."""
    out = {}
    for label, ms in _labelled_times(rows):
        if "eager" not in ms and "eager-cudagraph" not in ms:
            continue
        out[label] = {p: _baseline(ms, p) / t for p, t in ms.items() if _baseline(ms, p)}
    return out


def unplotted(rows) -> list:
    """What the chart leaves out though it was timed: ``"label: provider, ..."`` for each line of the
    table with providers that have a valid time but no eager row of their kind to divide by (a
    graphed provider where no ``eager-cudagraph`` ran, say). The report prints these, so that a
    missing bar is not taken for a provider that did not run."""
    out = []
    for label, ms in _labelled_times(rows):
        left = [p for p in order_providers(set(ms)) if p not in ("eager", "eager-cudagraph") and not _baseline(ms, p)]
        if left:
            out.append(f"{label}: {', '.join(left)}")
    return out


def chart(rows, path: str) -> str:
    """Write the speedup chart to ``path``; returns "" when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing"
    bars = speedups(rows)
    if not bars:
        return "no row group has an eager row (plain or graphed) to take speedups over"
    keys = list(bars)
    providers = [p for p in order_providers({r["provider"] for r in rows}) if p not in ("eager", "eager-cudagraph")]

    def speedup(label, p):  # a gap, not a zero bar: not run, or no eager of its kind (unplotted)
        return bars[label].get(p, float("nan"))
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(keys) * max(1, len(providers)) / 3), 5))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs = [j + i * width for j, k in enumerate(keys)]
        ys = [speedup(k, p) for k in keys]
        ax.bar(xs, ys, width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels(keys, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("speedup over eager (×)")
    fig.text(0.01, 0.01, "graphed providers (-cudagraph, -reduce-overhead) over eager-cudagraph", fontsize=7)
    ax.set_title(f"{_values(rows, 'device')} · {_values(rows, 'dtype')} · commit {_values(rows, 'commit')}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+")
    parser.add_argument("--out", default=None, help="output stem (default: the first JSON path without .json)")
    parser.add_argument("--force", action="store_true", help="replace an existing .md or .png of that stem")
    args = parser.parse_args(argv)
    stem = args.out or os.path.splitext(args.json[0])[0]
    # Decision: the tables committed beside a lease's rows (bench/results) are that lease's record; a
    # report regenerated to look at them replaced them without a word. `make report` rewrites
    # latest.md after every `make bench`, so that stem is always replaced.
    missing = [p for p in args.json if not os.path.isfile(p)]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}" + (" (run `make bench` first)" if any(
            os.path.basename(p) == "latest.json" for p in missing) else ""))
    existing = [stem + ext for ext in (".md", ".png") if os.path.exists(stem + ext)]
    if existing and not args.force and os.path.basename(stem) != "latest":
        parser.error(f"{' and '.join(existing)} exist(s); pass --force to replace, or --out another stem")
    try:
        rows = load_rows(args.json)
    except ValueError as e:
        parser.error(str(e))
    if not rows:  # (an empty table and the chart's "no eager row" would hide that nothing was read)
        parser.error(f"no rows in {', '.join(args.json)}")
    md = markdown(rows)
    if os.path.dirname(stem):
        os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write(md)
    why_not = chart(rows, stem + ".png")
    print(md)
    print(f"wrote {stem}.md" + (f" (no chart: {why_not})" if why_not else f" and {stem}.png"))
    left = unplotted(rows)
    if left and not why_not:
        print("not in the chart (no eager row of their kind, plain or graphed, to divide by):")
        print("\n".join(f"  {line}" for line in left))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
