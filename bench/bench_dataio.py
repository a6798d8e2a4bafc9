"""Input-pipeline throughput of :mod:`interformer.dataio`: per-row reference path vs vectorised path.

A plain script (not collected by pytest)::

    python bench/bench_dataio.py                     # 50k rows, 2 channels, T = 50, ~100k items
    python bench/bench_dataio.py --rows 200000 --repeat 3

It writes a synthetic BARS-style CSV (``label,user_id,item_id,cate_id,item_history,cate_history,price``)
to a temporary directory (and the same table as Parquet), then times, for each path:

* ``build_vocabularies`` (one pass over the training file),
* the ``num_rows`` counting pass,
* iterating ``batches(batch_size)`` (in file order, and shuffled),
* and, on the vectorised path, a consumer that spends ``--step-ms`` per batch (``time.sleep``, a
  stand-in for a GPU step that releases the GIL) with ``prefetch=0`` and ``prefetch=2``.

Every vectorised result is checked against the per-row one (same vocabularies, bit-identical
batches) before its time is printed. Times are the best of ``--repeat`` runs; rows/s counts the
rows of the file.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interformer.dataio import Schema, TabularDataset, build_vocabularies  # noqa: E402


def write_csv(path: Path, rows: int, items: int, cats: int, users: int, max_hist: int, seed: int) -> None:
    """Histories of 0..max_hist events (longer than T for some rows), ids drawn uniformly."""
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "user_id", "item_id", "cate_id", "item_history", "cate_history", "price"])
        for _ in range(rows):
            hist = [rng.randint(1, items) for _ in range(rng.randint(0, max_hist))]
            item = rng.randint(1, items)
            w.writerow([rng.randint(0, 1), rng.randint(1, users), item, item % cats, "^".join(map(str, hist)),
                        "^".join(str(h % cats) for h in hist), round(rng.random() * 100, 2)])


def best(fn, repeat: int):
    """(best seconds, last result) of ``repeat`` calls."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def same_batches(xs, ys) -> None:
    assert len(xs) == len(ys), (len(xs), len(ys))
    for x, y in zip(xs, ys):
        for f in ("dense", "sparse", "seq", "lengths", "label", "group"):
            a, b = getattr(x, f), getattr(y, f)
            assert a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes(), f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--cats", type=int, default=1_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--max-hist", type=int, default=80, help="histories have 0..max-hist events")
    ap.add_argument("--seq-len", type=int, default=50, help="T, the events kept")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--step-ms", type=float, default=40.0, help="simulated training step for the prefetch rows")
    ap.add_argument("--no-parquet", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPU(s), "
          f"{args.rows} rows, 2 channels, T={args.seq_len}, histories 0..{args.max_hist}, {args.items} items, "
          f"batch {args.batch_size}")
    schema = Schema(label="label", dense=["price"], sparse=["user_id", "item_id", "cate_id"],
                    sequences=["item_history", "cate_history"], user="user_id",
                    shared_vocab={"item_history": "item_id", "cate_history": "cate_id"}, max_seq_len=args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.csv"
        write_csv(path, args.rows, args.items, args.cats, args.users, args.max_hist, seed=0)
        files = [("csv", path)]
        if not args.no_parquet:
            try:
                import pyarrow.csv as pacsv
                import pyarrow.parquet as pq
            except ImportError:
                print("pyarrow is not installed: no Parquet rows, and the vectorised path falls back to per-row")
            else:
                pq_path = Path(tmp) / "train.parquet"
                opts = pacsv.ConvertOptions(column_types={"item_history": "string", "cate_history": "string"})
                pq.write_table(pacsv.read_csv(path, convert_options=opts), pq_path)
                files.append(("parquet", pq_path))
        print(f"file: {path.stat().st_size / 2**20:.1f} MiB CSV")
        n, bs = args.rows, args.batch_size
        print(f"{'':32s} {'per-row':>16s} {'vectorised':>16s} {'speed-up':>9s}")

        def line(name, t_ref, t_vec, unit_rows=n):
            ms = f"  ({t_vec / (unit_rows / bs) * 1e3:.1f} ms/batch)" if "batches" in name else ""
            print(f"{name:32s} {unit_rows / t_ref:>10,.0f} rows/s {unit_rows / t_vec:>10,.0f} rows/s "
                  f"{t_ref / t_vec:>8.1f}x{ms}")

        for fmt, p in files:
            t_ref, (v_ref, n_ref) = best(lambda: build_vocabularies(p, schema, vectorized=False), args.repeat)
            t_vec, (vocabs, n_vec) = best(lambda: build_vocabularies(p, schema), args.repeat)
            assert n_ref == n_vec == n and all(v_ref[c].to_dict() == vocabs[c].to_dict() for c in vocabs)
            line(f"{fmt}: build_vocabularies", t_ref, t_vec)

            def count(vectorized):
                ds = TabularDataset(p, schema, vocabs, vectorized=vectorized)
                return ds.num_rows

            t_ref, _ = best(lambda: count(False), args.repeat)
            t_vec, _ = best(lambda: count(True), args.repeat)
            line(f"{fmt}: num_rows (count pass)", t_ref, t_vec)
            for shuffle in (False, True):
                def run(vectorized):
                    return list(TabularDataset(p, schema, vocabs, vectorized=vectorized).batches(bs, shuffle=shuffle))

                t_ref, ref = best(lambda: run(False), args.repeat)
                t_vec, vec = best(lambda: run(True), args.repeat)
                same_batches(ref, vec)
                line(f"{fmt}: batches({bs}{', shuffle' if shuffle else ''})", t_ref, t_vec)

        ds = TabularDataset(path, schema, vocabs)
        step = args.step_ms / 1e3

        def consume(prefetch):
            for _ in ds.batches(bs, prefetch=prefetch):
                time.sleep(step)

        n_batches = ds.num_batches(bs)
        t0, _ = best(lambda: consume(0), args.repeat)
        t2, _ = best(lambda: consume(2), args.repeat)
        print(f"csv, vectorised, {n_batches} batches with a {args.step_ms:.0f} ms step each "
              f"(steps alone: {n_batches * step:.2f} s): prefetch=0 {t0:.2f} s, prefetch=2 {t2:.2f} s")


if __name__ == "__main__":
    main()
