"""interformer-kernels: InterFormer (arXiv 2411.09852) for CTR prediction with fused Triton kernels."""

from __future__ import annotations

import torch

from .backend import BACKENDS, FusedModule, check_backend, default_backend
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
    ``state_dict`` are untouched; only the path each op takes changes. Configs held by
    InterFormer models are updated so that a later copy built from them matches.
    """
    check_backend(backend)
    for m in model.modules():
        if isinstance(m, FusedModule):
            m.backend = backend
        cfg = getattr(m, "config", None)
        if isinstance(cfg, InterFormerConfig):
            cfg.backend = backend
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
    "default_backend",
    "optimize",
    "recent_tokens",
    "validate_batch",
]
