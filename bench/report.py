"""Turn pytest-benchmark JSON into a markdown table and a PNG speedup chart.

    python bench/report.py bench/results/latest.json [more.json ...] [--out bench/results/NAME]

Inputs are pytest-benchmark JSON files or ``.jsonl`` files of rows (one per line, as written when
``$INTERFORMER_BENCH_ROWS`` is set; such a file survives a run that was cut short).

Each benchmark row carries its measurements in ``extra_info`` (see bench/common.py). The table
has one line per (op, shape, mode): the median time of every provider, the fused path's speedup
over eager and over ``torch.compile``, and its time as a multiple of the op's floor (bytes over
measured copy bandwidth, or FLOPs over measured bf16 matmul rate). The chart plots each
provider's speedup over eager.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

PREFERRED = ["eager", "compile", "compile-max-autotune", "sdpa-math", "sdpa-efficient", "sdpa-flash", "sdpa-cudnn",
             "flex", "flash_attn", "nn.MultiheadAttention", "fused", "fused-compile", "fused-compile-attention",
             "fused-compile-inline", "fused-streams",
             "eager-cudagraph", "compile-cudagraph", "sdpa-efficient-cudagraph", "sdpa-cudnn-cudagraph",
             "nn.MultiheadAttention-cudagraph", "compile-reduce-overhead", "fused-cudagraph",
             "fused-compile-reduce-overhead"]
GRAPHED_SUFFIXES = ("-cudagraph", "-reduce-overhead")


def is_graphed(provider: str) -> bool:
    """CUDA-graph providers (captured by the benchmark, or torch.compile's reduce-overhead mode)."""
    return provider.endswith(GRAPHED_SUFFIXES)


def is_fused(provider: str) -> bool:
    return provider.startswith("fused")


def load_rows(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            if path.endswith(".jsonl"):
                rows += [json.loads(line) for line in f if line.strip()]
                continue
            data = json.load(f)
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info") or {}
            if "median_ms" in info:
                rows.append(info)
    return rows


def order_providers(names):
    known = [p for p in PREFERRED if p in names]
    return known + sorted(n for n in names if n not in known)


def markdown(rows) -> str:
    if not rows:
        return "_no benchmark rows_\n"
    env = rows[0]
    out = [f"Device: **{_values(rows, 'device')}**, torch {_values(rows, 'torch')}, triton {_values(rows, 'triton')}, "
           f"commit `{_values(rows, 'commit')}`, dtype {_values(rows, 'dtype')}. Median of CUDA-event timings (ms).", ""]
    if env.get("note"):
        out += [f"> {env['note']}", ""]
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["shape"], r["mode"])][r["provider"]] = r
    providers = order_providers({r["provider"] for r in rows})
    head = ["op", "shape", "mode"] + providers + ["fused vs eager", "fused vs compile", "fused vs best other",
                                                  "graphed: fused vs best other", "fused x floor",
                                                  "fused/eager peak mem"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for (op, shape, mode), by in sorted(groups.items()):
        cells = [op, shape, mode]
        for p in providers:
            cells.append(f"{by[p]['median_ms']:.4g}" if p in by else "–")
        plain = {p: r["median_ms"] for p, r in by.items() if not is_graphed(p)}
        graphed = {p: r["median_ms"] for p, r in by.items() if is_graphed(p)}
        best_fused = _best(plain, fused=True)
        eager, comp = plain.get("eager"), plain.get("compile")
        cells.append(_ratio(eager, best_fused))
        cells.append(_ratio(comp, best_fused))
        cells.append(_versus_best(plain, best_fused))
        cells.append(_versus_best(graphed, _best(graphed, fused=True)))
        # the floor is a device-time bound: measured against the fastest fused row (a graphed one,
        # device time, where there is one; a plain one is mostly host time at these shapes)
        floored = [r for p, r in by.items() if is_fused(p) and "x_floor" in r]
        cells.append(f"{min(r['x_floor'] for r in floored):.1f}" if floored else "–")
        peak_e = (by.get("eager") or {}).get("peak_extra_MiB")
        peak_f = by[best_fused[0]].get("peak_extra_MiB") if best_fused else None
        cells.append(f"{peak_f / peak_e:.2f}" if peak_e and peak_f and peak_e == peak_e and peak_e > 0 else "–")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Plain providers are compared with plain ones and CUDA-graph providers (`-cudagraph`: captured "
            "and replayed by the benchmark; `-reduce-overhead`: torch.compile's CUDA-graph mode) with graphed "
            "ones: a plain timing at these shapes is mostly host time, a graphed one device time. "
            "\"fused\" is the best plain fused variant (fused, fused-compile, fused-streams); \"best other\" the "
            "fastest non-fused provider of the same kind, named in brackets. \"fused x floor\": the fastest fused "
            "row (graphed, where measured) over the op's floor time. Peak memory: device memory above "
            "the parameters and inputs at the peak of one call after warm-up (outside the timing loop; the "
            "previous call's gradients included), of that best plain fused variant over `eager`."]
    out += _compile_warnings(rows)
    return "\n".join(out) + "\n"


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
    """(provider, ms) of the fastest fused (or non-fused) provider in ``times``, or None."""
    cands = [(ms, p) for p, ms in times.items() if is_fused(p) == fused]
    if not cands:
        return None
    ms, provider = min(cands)
    return provider, ms


def _ratio(base_ms, best) -> str:
    return f"{base_ms / best[1]:.2f}×" if base_ms and best else "–"


def _versus_best(times: dict, best_fused) -> str:
    other = _best(times, fused=False)
    return f"{other[1] / best_fused[1]:.2f}× ({other[0]})" if other and best_fused else "–"


def chart(rows, path: str) -> str:
    """Write the speedup chart to ``path``; returns "" when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing"
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["shape"], r["mode"])][r["provider"]] = r["median_ms"]
    keys = sorted(k for k in groups if "eager" in groups[k])
    if not keys:
        return "no row group has a plain eager row to take speedups over"
    providers = [p for p in order_providers({r["provider"] for r in rows}) if p not in ("eager", "eager-cudagraph")]

    def speedup(by, p):
        """Over eager of the same kind: graphed providers over eager-cudagraph, plain over eager."""
        base = by.get("eager-cudagraph") if is_graphed(p) else by.get("eager")
        return base / by[p] if p in by and base else 0
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(keys) * max(1, len(providers)) / 3), 5))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs = [j + i * width for j, k in enumerate(keys)]
        ys = [speedup(groups[k], p) for k in keys]
        ax.bar(xs, ys, width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels(["/".join(k) for k in keys], rotation=75, ha="right", fontsize=7)
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
    args = parser.parse_args(argv)
    rows = load_rows(args.json)
    stem = args.out or os.path.splitext(args.json[0])[0]
    md = markdown(rows)
    with open(stem + ".md", "w") as f:
        f.write(md)
    why_not = chart(rows, stem + ".png")
    print(md)
    print(f"wrote {stem}.md" + (f" (no chart: {why_not})" if why_not else f" and {stem}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
