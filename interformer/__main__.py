"""Command line: ``python -m interformer demo``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build InterFormer, compare eager and fused paths, train briefly on synthetic data")
    demo.add_argument("--train-samples", type=int, default=16384)
    demo.add_argument("--test-samples", type=int, default=4096)
    demo.add_argument("--batch-size", type=int, default=256)
    demo.add_argument("--epochs", type=int, default=1)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and args.device in (None, "cpu"):
        # The fused path runs under Triton's interpreter on a CPU; it must be set before triton imports.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .demo import run_demo

    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
