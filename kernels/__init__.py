"""Fused Triton kernels of interformer-kernels (installed as ``interformer.kernels``).

One file per op family; each exposes functions with the same names and signatures as the eager
references in :mod:`interformer.reference`, registered with ``torch.library`` under the
``interformer`` namespace (one more, ``attention.attention_packed``, takes a packed q/k/v
projection, which ``RotaryMultiHeadAttention`` calls; its reference is ``attention`` on the slices). Importing this package does not import Triton; importing an op module
does (:func:`register_ops` imports them all). ``embedding.py`` is the exception: the tokenizers'
grouped lookups are aten ops in one ``torch.autograd.Function`` (no Triton kernel, no custom op;
DESIGN §3 keeps the tokenizers eager), so it is not in :data:`OP_MODULES`.
"""

import importlib
from types import ModuleType
from typing import List

#: the op modules, each registering its ``interformer::`` custom ops when imported
OP_MODULES = ("attention", "crossnet", "dot_interaction", "feed_forward", "gated_lce", "layernorm", "pffn")


def kernel_modules() -> List[ModuleType]:
    """Every module of this package that defines Triton kernels (``_common`` and the op modules),
    imported (which imports Triton and registers the ops)."""
    return [importlib.import_module(f"{__name__}.{name}") for name in ("_common", *OP_MODULES)]


def register_ops() -> List[str]:
    """Import every op module, which registers all ``interformer::`` custom ops with
    ``torch.library`` (and imports Triton); return their names. Needed in a process that loads a
    ``torch.export`` program of a fused model (``torch.export.load``) before any module of this
    package has run on the fused path."""
    import torch

    kernel_modules()
    return sorted(n for n in dir(torch.ops.interformer) if n.endswith(("_fwd", "_bwd")))
