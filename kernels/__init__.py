"""Fused Triton kernels of interformer-kernels (installed as ``interformer.kernels``).

One file per op family; each exposes functions with the same names and signatures as the eager
references in :mod:`interformer.reference`, registered with ``torch.library`` under the
``interformer`` namespace. Importing this package does not import Triton; importing an op module
does (:func:`register_ops` imports them all).
"""

import importlib
from typing import List

#: the op modules, each registering its ``interformer::`` custom ops when imported
OP_MODULES = ("attention", "crossnet", "dot_interaction", "gated_lce", "layernorm", "pffn")


def register_ops() -> List[str]:
    """Import every op module, which registers all ``interformer::`` custom ops with
    ``torch.library`` (and imports Triton); return their names. Needed in a process that loads a
    ``torch.export`` program of a fused model (``torch.export.load``) before any module of this
    package has run on the fused path."""
    import torch

    for name in OP_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return sorted(n for n in dir(torch.ops.interformer) if n.endswith(("_fwd", "_bwd")))
