"""interformer-kernels: InterFormer (arXiv 2411.09852) for CTR prediction with fused Triton kernels."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from .backend import (
    BACKENDS,
    FusedModule,
    check_backend,
    check_compile_environment,
    compile_inline,
    compile_reference_ops,
    default_backend,
    set_compile_inline,
    set_compile_reference_ops,
)
from .config import InterFormerConfig
from .layers import (
    CrossNet,
    DotInteraction,
    FeedForward,
    GatedLCE,
    LowRankCrossNet,
    PersonalizedFFN,
    PoolingMultiHeadAttention,
    ResidualLayerNorm,
    RotaryMultiHeadAttention,
)
from .model import (
    CrossArch,
    DHENLayer,
    InteractionArch,
    InterFormer,
    InterFormerBlock,
    InterFormerCTR,
    SequenceArch,
    recent_tokens,
)
from .tokenizers import DenseTokenizer, SequenceMaskNet, SparseTokenizer
from .validation import validate_batch, values_checked

__version__ = "0.1.0"


def optimize(model: torch.nn.Module, backend: str = "triton") -> torch.nn.Module:
    """Switch every fused-capable submodule of ``model`` to ``backend``, in place; return ``model``.

    Works on any ``nn.Module`` that contains this package's modules. Parameters, buffers and the
    ``state_dict`` are untouched; only the path each op takes changes. An InterFormer model's
    ``config`` is replaced by a copy with the new backend (so a model built from ``model.config``
    matches); the config object the caller built the model from is not changed, as other models
    may share it. Submodules that shared one config object (``InterFormerCTR`` and its backbone)
    share its one copy.

    Every check runs before anything changes (a bad backend name, or a bad compile setting in the
    environment, which each module's switch would raise), so a failed call leaves the model as it
    was. A model with no fused-capable module (e.g. one ``torch.fx.symbolic_trace`` turned into
    a graph of the chosen ops) is returned unchanged with a warning.
    """
    backend = check_backend(backend)
    check_compile_environment()
    copies = {}  # id(config) -> its copy: modules that shared a config keep sharing one
    switched = 0
    for m in model.modules():
        if isinstance(m, FusedModule):
            m.backend = backend
            switched += 1
        cfg = getattr(m, "config", None)
        if isinstance(cfg, InterFormerConfig) and cfg.backend != backend:
            # a copy: the caller's config object may be shared with other models
            if id(cfg) not in copies:
                copies[id(cfg)] = (cfg, dataclasses.replace(cfg, backend=backend))  # cfg kept alive: ids stay unique
            m.config = copies[id(cfg)][1]
    if not switched:
        warnings.warn(f"interformer.optimize: {type(model).__name__} holds no fused-capable module, nothing was "
                      "switched (a torch.fx.symbolic_trace'd model holds the ops it traced, not the modules)",
                      stacklevel=2)
    return model


__all__ = [
    "BACKENDS",
    "CrossArch",
    "CrossNet",
    "DHENLayer",
    "DenseTokenizer",
    "DotInteraction",
    "FeedForward",
    "FusedModule",
    "GatedLCE",
    "InteractionArch",
    "InterFormer",
    "InterFormerBlock",
    "InterFormerCTR",
    "InterFormerConfig",
    "LowRankCrossNet",
    "PersonalizedFFN",
    "PoolingMultiHeadAttention",
    "ResidualLayerNorm",
    "RotaryMultiHeadAttention",
    "SequenceArch",
    "SequenceMaskNet",
    "SparseTokenizer",
    "compile_inline",
    "compile_reference_ops",
    "default_backend",
    "optimize",
    "recent_tokens",
    "set_compile_inline",
    "set_compile_reference_ops",
    "validate_batch",
    "values_checked",
]
