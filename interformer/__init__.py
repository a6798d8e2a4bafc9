"""interformer-kernels: InterFormer (arXiv 2411.09852) for CTR prediction with fused Triton kernels."""

from __future__ import annotations

import dataclasses

import torch

from .backend import (
    BACKENDS,
    FusedModule,
    check_backend,
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
from .validation import validate_batch

__version__ = "0.1.0"


def optimize(model: torch.nn.Module, backend: str = "triton") -> torch.nn.Module:
    """Switch every fused-capable submodule of ``model`` to ``backend``, in place; return ``model``.

    Works on any ``nn.Module`` that contains this package's modules. Parameters, buffers and the
    ``state_dict`` are untouched; only the path each op takes changes. An InterFormer model's
    ``config`` is replaced by a copy with the new backend (so a model built from ``model.config``
    matches); the config object the caller built the model from is not changed, as other models
    may share it. Submodules that shared one config object (``InterFormerCTR`` and its backbone)
    share its one copy.
    """
    backend = check_backend(backend)
    copies = {}  # id(config) -> its copy: modules that shared a config keep sharing one
    for m in model.modules():
        if isinstance(m, FusedModule):
            m.backend = backend
        cfg = getattr(m, "config", None)
        if isinstance(cfg, InterFormerConfig) and cfg.backend != backend:
            # a copy: the caller's config object may be shared with other models
            if id(cfg) not in copies:
                copies[id(cfg)] = (cfg, dataclasses.replace(cfg, backend=backend))  # cfg kept alive: ids stay unique
            m.config = copies[id(cfg)][1]
    return model


__all__ = [
    "BACKENDS",
    "CrossArch",
    "CrossNet",
    "DHENLayer",
    "DenseTokenizer",
    "DotInteraction",
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
]
