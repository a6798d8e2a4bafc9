"""What every fused kernel of a training step compiles to for an H100 (sm_90): no GPU needed.

    python profiling/sm90_audit.py [--shape taobao] [--step train|infer] [--workers 2] [--json FILE]
    python profiling/sm90_audit.py --compare BEFORE.json AFTER.json

Runs one ``InterFormerCTR`` step at a DESIGN §6 shape (bf16 autocast, the bench config) with every
Triton launch recorded and skipped (:func:`interformer.kernel_audit.record_launches`, grids and
SM-count choices sized for an H100), compiles each distinct kernel specialisation ahead of time
for sm_90 (:func:`interformer.kernel_audit.build_sm90`) and prints, per specialisation: launches per
step, warps and stages, registers per thread, the stack frame and spill store / load
instructions in the SASS, shared memory, and the TTGIR's warp-group dots (wgmma) and async copies;
then, for the largest grid launched (``programs``), how many programs an SM holds at once by the
H100's register, shared-memory and warp limits (``per SM``), the warps resident on an SM in the
first wave (``warps/SM``, at most 64: a memory-bound kernel wants many in flight) and the number of
waves. A row with spills is marked ``!``.

The table describes the Triton that runs this script. The GPU machines have their own: to see what
they build, put that version first on ``PYTHONPATH`` (e.g. ``pip install --target /tmp/t36
triton==3.6.0``, then ``PYTHONPATH=/tmp/t36 python profiling/sm90_audit.py``). Register counts
and spills are facts about the code, not timings: whether a spill costs time is for a GPU to say.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():  # the step itself only records; the interpreter needs no GPU
        os.environ["TRITON_INTERPRET"] = "1"

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))

import torch  # noqa: E402


def step_cases(shape_name: str, step: str):
    """The kernel launches (cases) of one training step or inference forward at ``shape_name``."""
    import common
    from test_bench_model import batch_for, config_for

    from interformer import InterFormerCTR, optimize
    from interformer.kernel_audit import gpu_sized, record_launches

    shape = common.ALL_SHAPES[shape_name]
    cfg = config_for(shape)
    torch.manual_seed(0)
    model = optimize(InterFormerCTR(cfg).to(common.DEVICE), "triton")
    inputs, label = batch_for(shape, cfg)
    autocast = torch.autocast(common.DEVICE.type, dtype=torch.bfloat16)
    with gpu_sized(), record_launches() as cases:
        if step == "train":
            with autocast:
                loss = model.loss(model(*inputs), label)
            loss.backward()
        else:
            with torch.no_grad(), autocast:
                model(*inputs)
    return cases


def _consts(case: dict) -> str:
    from interformer.kernel_audit import tl_dtype_name

    cap = [f"maxnreg={case['maxnreg']}"] if case.get("maxnreg") is not None else []
    # a tl.dtype constexpr (recorded as {"tl_dtype": name}) shows as its name: DT=bf16
    shown = {k: tl_dtype_name(v) or v for k, v in case["consts"].items()}
    return " ".join([f"{k}={v}" for k, v in shown.items() if k != "PREC"] + cap)


def table(builds) -> str:
    from interformer.kernel_audit import occupancy

    head = ["kernel", "n/step", "warps", "stages", "regs", "stack", "STL/LDL", "smem KB", "wgmma", "async",
            "programs", "per SM", "warps/SM", "waves", "constexprs"]
    rows = []
    for b in builds:
        spills = b.get("spill_stores", 0) + b.get("spill_loads", 0)
        occ = occupancy(b) if "registers" in b else None
        rows.append([("! " if spills else "  ") + b["kernel"].lstrip("_"), str(b["launches"]),
                     str(b.get("num_warps", 4)), str(b.get("num_stages", "-")), str(b.get("registers", "?")),
                     str(b.get("stack", "?")), f"{b.get('spill_stores', '?')}/{b.get('spill_loads', '?')}",
                     f"{b['shared'] / 1024:.0f}", str(b["wgmma"]), str(b["async_copies"]), str(b.get("programs", "?")),
                     str(occ["blocks_per_sm"]) if occ else "?", str(occ["resident_warps"]) if occ else "?",
                     f"{occ['waves']:.2f}" if occ else "?", _consts(b)])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def compare(before: str, after: str):
    """``(report, same)`` for two ``--json`` files of one shape and step: each specialisation (kernel,
    constexprs, argument types, warps, stages and register cap) whose SASS fingerprint or registers differ, or that
    only one of them built.
    ``same``: no such kernel. For a refactor meant to leave the machine code as it was."""
    def builds(path):
        with open(path) as f:
            report = json.load(f)
        # a specialisation: constexprs, argument types and launch options (two builds of one kernel can
        # share constexprs and differ in an argument's dtype); shown by its kernel name and constexprs
        key = lambda b: (b["kernel"], _consts(b), json.dumps([b["consts"], b.get("args"), b.get("num_warps"),  # noqa: E731
                                                              b.get("num_stages"), b.get("maxnreg")], sort_keys=True))
        return report, {key(b): b for b in report["builds"]}

    (ra, a), (rb, b) = builds(before), builds(after)
    lines = [f"{before} ({ra['shape']}, {ra['step']}, Triton {ra['triton']}) against {after} ({rb['shape']}, "
             f"{rb['step']}, Triton {rb['triton']})"]
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            lines.append(f"  only in {'after' if x is None else 'before'}: {key[0]} {key[1]}")
        elif x.get("sass_sha") != y.get("sass_sha") or x.get("registers") != y.get("registers"):
            lines.append(f"  differs: {key[0]} {key[1]}: registers {x.get('registers')} -> {y.get('registers')}, "
                         f"SASS {x.get('sass_sha')} -> {y.get('sass_sha')}")
    same = len(lines) == 1
    lines.append(f"{len(set(a) & set(b))} kernels in both; " + ("the same code in every one" if same else
                                                                f"{len(lines) - 1} differ or are missing"))
    return "\n".join(lines), same


def main(argv=None) -> int:
    import triton

    from interformer.kernel_audit import build_sm90, unique_cases

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="taobao", help="a bench shape: taobao, amazon, long, smoke")
    parser.add_argument("--step", default="train", choices=["train", "infer"])
    parser.add_argument("--workers", type=int, default=2, help="compiler processes")
    parser.add_argument("--json", help="also write the builds to this file")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="compare two --json files kernel by kernel (SASS fingerprints, registers) instead of "
                             "building; exit status 1 when a kernel's code differs")
    args = parser.parse_args(argv)
    if args.compare:  # exit 1 means "the code differs": an unreadable file is a usage error (2), not that
        try:
            text, same = compare(*args.compare)
        except (OSError, ValueError) as e:
            parser.error(f"--compare: {e}")
        except (KeyError, TypeError) as e:
            parser.error(f"--compare: not an sm90_audit --json file ({type(e).__name__}: {e})")
        print(text)
        return 0 if same else 1

    import common

    if args.shape not in common.ALL_SHAPES:  # (a typo was a KeyError traceback)
        parser.error(f"--shape {args.shape!r}: not a bench shape (one of {', '.join(common.ALL_SHAPES)})")
    cases = unique_cases(step_cases(args.shape, args.step))
    builds = build_sm90(cases, workers=args.workers)
    print(f"sm_90 builds of the fused {args.step} step at {args.shape} (bf16 autocast), Triton {triton.__version__}: "
          f"{sum(b['launches'] for b in builds)} launches, {len(builds)} distinct kernels")
    print(table(builds))
    spilling = [b for b in builds if b.get("spill_stores", 0) + b.get("spill_loads", 0)]
    print(f"{len(spilling)} of them spill registers (marked !)" if spilling else "no kernel spills registers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, step=args.step, triton=triton.__version__, builds=builds), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
