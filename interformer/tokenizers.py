"""Feature tokenizers: dense, sparse and the MaskNet sequence tokenizer.

The math is eager PyTorch on every backend (DESIGN §3). ``SparseTokenizer`` and ``SequenceMaskNet``
are fused-capable for their embedding lookups only: on the fused path
(:func:`interformer.kernels.embedding.grouped_embedding`) all tables of a tokenizer share one
autograd node and one ``embedding_dense_backward`` call instead of one per table; on the eager path
each table module is called. The tables and the ``state_dict`` are the same on both.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .backend import FusedModule
from .layers import _batch, _expect
from .reference import row_mask


class DenseTokenizer(nn.Module):
    """Numeric fields -> tokens.

    ``mode="single"``: one token, ``Linear(n_dense -> d)(dense)``.
    ``mode="per_field"``: field j -> ``dense[:, j] * weight[j] + bias[j]``, one token per field.
    With ``n_dense == 0`` it returns ``[B, 0, d]``. ``dense`` is float32 by the data contract
    (DESIGN §2) whatever the model's dtype: it is cast to the parameters' dtype here (a ``.half()``
    or ``.double()`` model takes the same batches).
    """

    def __init__(self, n_dense: int, d_model: int, mode: str = "single") -> None:
        super().__init__()
        if mode not in ("single", "per_field"):
            raise ValueError(f"DenseTokenizer mode must be 'single' or 'per_field', got {mode!r}")
        self.n_dense, self.d_model, self.mode = n_dense, d_model, mode
        if n_dense == 0:
            self.num_tokens = 0
        elif mode == "single":
            self.num_tokens = 1
            self.linear = nn.Linear(n_dense, d_model)
        else:
            self.num_tokens = n_dense
            self.weight = nn.Parameter(torch.randn(n_dense, d_model) / d_model**0.5)
            self.bias = nn.Parameter(torch.zeros(n_dense, d_model))

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        _expect(self, "dense", dense, (None, self.n_dense))
        if self.num_tokens == 0:
            return dense.new_zeros(dense.shape[0], 0, self.d_model)
        if self.mode == "single":
            weight = getattr(self.linear, "weight", None)
            # (a dynamically quantized layer has a method there, and takes the float32 batch as it is:
            # quantize_dynamic works; under torch.fx.symbolic_trace the weight is a Proxy, and the cast
            # is recorded, so that the traced module casts as the module does)
            if isinstance(weight, (torch.Tensor, torch.fx.Proxy)):
                dense = dense.to(weight.dtype)
            return self.linear(dense).unsqueeze(1)
        return dense.to(self.weight.dtype).unsqueeze(-1) * self.weight + self.bias


class SparseTokenizer(FusedModule):
    """One embedding table per categorical field (``padding_idx=0``: a missing id gives a zero token).

    forward ``(sparse [B, F])`` -> ``[B, F, d]``; no field gives ``[B, 0, d]``.
    """

    kernel_ops = (("embedding", "grouped_embedding"),)

    def __init__(self, vocab_sizes: Sequence[int], d_model: int, backend: Optional[str] = None) -> None:
        super().__init__(backend)
        self.d_model = d_model
        self.tables = nn.ModuleList(nn.Embedding(v, d_model, padding_idx=0) for v in vocab_sizes)
        for t in self.tables:
            nn.init.normal_(t.weight, std=d_model**-0.5)
            with torch.no_grad():
                t.weight[0].zero_()

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        _expect(self, "sparse", sparse, (None, len(self.tables)), integer=True)  # one id per field
        if not len(self.tables):
            return torch.zeros(sparse.shape[0], 0, self.d_model, device=sparse.device)  # [B, 0, d], as DenseTokenizer
        return self._op("embedding", "grouped_embedding")(sparse, self.tables)


class SequenceMaskNet(FusedModule):
    """MaskNet sequence tokenizer: ``S = Linear(kd -> d)(Z * MLP_mask(Z))`` with padding rows zero.

    ``Z [B, T, k*d]`` concatenates the k channel embeddings of each event;
    ``MLP_mask = Linear(kd, kd) -> SiLU -> Linear(kd, kd)``.
    """

    kernel_ops = (("embedding", "grouped_embedding"),)

    def __init__(self, vocab_sizes: Sequence[int], d_model: int, backend: Optional[str] = None) -> None:
        super().__init__(backend)
        k = len(vocab_sizes)
        self.tables = nn.ModuleList(nn.Embedding(v, d_model, padding_idx=0) for v in vocab_sizes)
        for t in self.tables:
            nn.init.normal_(t.weight, std=d_model**-0.5)
            with torch.no_grad():
                t.weight[0].zero_()
        # a plain nn.Sequential, eager on every backend (DESIGN §3: the tokenizers are eager)
        self.mask_mlp = nn.Sequential(nn.Linear(k * d_model, k * d_model), nn.SiLU(), nn.Linear(k * d_model, k * d_model))
        self.proj = nn.Linear(k * d_model, d_model)

    def forward(self, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _expect(self, "seq", seq, (None, len(self.tables), None), integer=True)  # [B, k channels, T]
        _expect(self, "lengths", lengths, (_batch(seq),), integer=True)
        z = self._op("embedding", "grouped_embedding")(seq, self.tables).flatten(-2)  # [B, T, k, d] -> [B, T, k*d]
        s = self.proj(z * self.mask_mlp(z))
        return s * row_mask(lengths, seq.shape[-1]).unsqueeze(-1).to(s.dtype)
