"""The InterFormer model (DESIGN §3): arches, blocks, the backbone and the CTR head."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

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
from .tokenizers import DenseTokenizer, SequenceMaskNet, SparseTokenizer
from .profiling import ranged
from .validation import validate_batch

__all__ = [
    "recent_tokens",
    "CrossArch",
    "DHENLayer",
    "InteractionArch",
    "SequenceArch",
    "InterFormerBlock",
    "InterFormer",
    "InterFormerCTR",
]


def recent_tokens(body: torch.Tensor, lengths: torch.Tensor, n_recent: int) -> torch.Tensor:
    """The ``n_recent`` most recent valid rows of ``body``, oldest first.

    Slot ``i`` holds ``body[b, lengths[b] - n_recent + i]``; slots before position 0 are zero.
    body ``[B, T, d]``, lengths ``[B]`` -> ``[B, n_recent, d]``.
    """
    B, T, d = body.shape
    idx = lengths[:, None] - n_recent + torch.arange(n_recent, device=body.device)[None, :]
    valid = (idx >= 0).to(body.dtype).unsqueeze(-1)
    idx = idx.clamp(min=0, max=max(T - 1, 0))
    return body.gather(1, idx.unsqueeze(-1).expand(B, n_recent, d)) * valid


class CrossArch(nn.Module):
    """Cross Arch: the low-dimensional summaries exchanged between the two branches.

    * ``summarize_nonseq(X) = GatedLCE(n -> n_sum)(X)``
    * ``summarize_seq(S, lengths) = GatedLCE(n_cls + n_pma + n_recent -> n_ssum)([S_CLS; S_PMA; S_recent])``
      with ``S_PMA`` from :class:`PoolingMultiHeadAttention` over the valid body rows and
      ``S_recent`` the ``n_recent`` most recent valid body rows. ``lengths`` counts body events.
    """

    def __init__(self, config: InterFormerConfig) -> None:
        super().__init__()
        c = config
        self.n_cls, self.n_pma, self.n_recent = c.n_cls, c.n_pma, c.n_recent
        self.nonseq = GatedLCE(c.n_tokens, c.n_sum, c.d_model, backend=c.backend)
        self.pma = PoolingMultiHeadAttention(c.n_pma, c.d_model, c.num_heads, backend=c.backend) if c.n_pma else None
        self.seq = GatedLCE(c.n_cls + c.n_pma + c.n_recent, c.n_ssum, c.d_model, backend=c.backend)

    @ranged("CrossArch.nonseq")
    def summarize_nonseq(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonseq(x)

    @ranged("CrossArch.seq")
    def summarize_seq(self, s: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        body = s[:, self.n_cls:]
        parts = [s[:, : self.n_cls]]
        if self.pma is not None:
            parts.append(self.pma(body, lengths))
        if self.n_recent:
            parts.append(recent_tokens(body, lengths, self.n_recent))
        return self.seq(torch.cat(parts, dim=1))

    def forward(self, x: torch.Tensor, s: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.summarize_nonseq(x), self.summarize_seq(s, lengths)


class DHENLayer(nn.Module):
    """One DHEN layer: ``Z <- LN(Z + Linear(m*d -> d)([DOT(Z) || DCN(Z)]))`` (feature-wise concat).

    ``backbone="dot"`` or ``"dcn"`` keeps one module (``m = 1``). DCN is low-rank
    (:class:`LowRankCrossNet`, rank ``dcn_rank``) or full (:class:`CrossNet`, ``dcn_rank=None``)
    over ``flatten(Z)``.
    """

    def __init__(self, config: InterFormerConfig) -> None:
        super().__init__()
        c = config
        self.num_tokens, self.d_model = c.n_tokens + c.n_ssum, c.d_model
        D = self.num_tokens * c.d_model
        self.dot = DotInteraction(self.num_tokens, c.d_model, backend=c.backend) if c.backbone in ("dhen", "dot") else None
        if c.backbone in ("dhen", "dcn"):
            self.dcn = (
                CrossNet(D, c.dcn_layers, backend=c.backend)
                if c.dcn_rank is None
                else LowRankCrossNet(D, c.dcn_layers, c.dcn_rank, backend=c.backend)
            )
        else:
            self.dcn = None
        n_modules = (self.dot is not None) + (self.dcn is not None)
        self.mix = nn.Linear(n_modules * c.d_model, c.d_model)
        self.norm = ResidualLayerNorm(c.d_model, eps=c.ln_eps, backend=c.backend)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        outs = []
        if self.dot is not None:
            outs.append(self.dot(z))
        if self.dcn is not None:
            outs.append(self.dcn(z.flatten(1)).view_as(z))
        return self.norm(z, self.mix(torch.cat(outs, dim=-1)))  # LN(z + mix(...))


class InteractionArch(nn.Module):
    """Interaction Arch: DHEN over ``Z = [X; S_sum]``, then ``X' = LN(X + FFN(Z[:, :n]))``."""

    def __init__(self, config: InterFormerConfig) -> None:
        super().__init__()
        c = config
        self.n = c.n_tokens
        self.layers = nn.ModuleList(DHENLayer(c) for _ in range(c.dhen_layers))
        self.ffn = FeedForward(c.d_model, 4 * c.d_model, c.d_model, dropout=c.dropout, backend=c.backend)
        self.norm = ResidualLayerNorm(c.d_model, eps=c.ln_eps, backend=c.backend)

    @ranged("InteractionArch")
    def forward(self, x: torch.Tensor, s_sum: torch.Tensor) -> torch.Tensor:
        z = torch.cat([x, s_sum], dim=1)
        for layer in self.layers:
            z = layer(z)
        return self.norm(x, self.ffn(z[:, : self.n]))  # LN(x + FFN(...))


class SequenceArch(nn.Module):
    """Sequence Arch on ``S = [CLS; body]``: PFFN then pre-norm rotary MHA with residual.

    ``S_mid = PFFN(S, X_sum)``; ``S' = S_mid + MHA(LN(S_mid))``. ``valid_lengths`` counts the valid
    rows of ``S`` (``n_cls + lengths``); padded rows stay exactly zero.
    """

    def __init__(self, config: InterFormerConfig) -> None:
        super().__init__()
        c = config
        self.pffn = PersonalizedFFN(c.d_model, c.n_sum, c.pffn_mode, c.pffn_hidden, c.ln_eps, backend=c.backend)
        self.attn_norm = ResidualLayerNorm(c.d_model, eps=c.ln_eps, backend=c.backend)
        self.attn = RotaryMultiHeadAttention(c.d_model, c.num_heads, c.rope_base, c.causal, backend=c.backend)

    @ranged("SequenceArch")
    def forward(self, s: torch.Tensor, x_sum: torch.Tensor, valid_lengths: torch.Tensor) -> torch.Tensor:
        s_mid = self.pffn(s, x_sum, valid_lengths)
        return s_mid + self.attn(self.attn_norm(s_mid), valid_lengths)


class InterFormerBlock(nn.Module):
    """One InterFormer layer: summaries from the block's input, then the two independent arches."""

    def __init__(self, config: InterFormerConfig) -> None:
        super().__init__()
        self.n_cls = config.n_cls
        self.cross = CrossArch(config)
        self.interaction = InteractionArch(config)
        self.sequence = SequenceArch(config)
        #: run the Interaction Arch on a side CUDA stream, concurrently with the Sequence Arch
        #: (paper §5.3.2); see :meth:`InterFormer.use_streams`. Ignored on CPU and while compiling.
        self.use_streams = False
        self._side_stream = None

    def __getstate__(self):
        """The module's state without its side stream (a CUDA stream cannot be pickled or deep-copied;
        a copy makes its own on its first streamed forward)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return dict(state, _side_stream=None)

    def _arches_on_two_streams(self, x, s, lengths, x_sum, s_sum):
        main = torch.cuda.current_stream(x.device)
        if self._side_stream is None or self._side_stream.device != x.device:
            self._side_stream = torch.cuda.Stream(x.device)
        side = self._side_stream
        side.wait_stream(main)
        with torch.cuda.stream(side):
            x_next = self.interaction(x, s_sum)
        s_next = self.sequence(s, x_sum, lengths + self.n_cls)
        main.wait_stream(side)
        # the caching allocator must not recycle these while the other stream still uses them
        for t in (x, s_sum):
            t.record_stream(side)
        x_next.record_stream(main)
        return x_next, s_next

    def forward(
        self, x: torch.Tensor, s: torch.Tensor, lengths: torch.Tensor, x_sum: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``lengths`` counts body events; ``x_sum`` may be passed when already computed."""
        if x_sum is None:
            x_sum = self.cross.summarize_nonseq(x)
        s_sum = self.cross.summarize_seq(s, lengths)
        if self.use_streams and x.is_cuda and not torch.compiler.is_compiling():
            return self._arches_on_two_streams(x, s, lengths, x_sum, s_sum)
        x_next = self.interaction(x, s_sum)
        s_next = self.sequence(s, x_sum, lengths + self.n_cls)
        return x_next, s_next


def _check_config(model: nn.Module, config) -> None:
    """TypeError naming ``model``'s class unless ``config`` is None or an :class:`InterFormerConfig`
    (a dict of its fields failed with an AttributeError on the first one read)."""
    if config is not None and not isinstance(config, InterFormerConfig):
        raise TypeError(f"{type(model).__name__}: config must be an InterFormerConfig (InterFormerConfig(**d) for "
                        f"a dict of its fields), got {type(config).__name__}")


class InterFormer(nn.Module):
    """The InterFormer backbone: tokenizers, ``num_layers`` blocks and a final Cross Arch.

    forward ``(dense, sparse, seq, lengths)`` (DESIGN §2) -> ``(X_sum [B, n_sum, d], S_sum [B, n_ssum, d])``.

    The first block's non-sequence summary ``CrossArch_0.summarize_nonseq(X^1)`` is prepended to the
    sequence as its ``n_cls = n_sum`` CLS tokens (and reused as that block's ``X_sum``). After the last
    block a final Cross Arch with its own parameters re-summarises both branches, so every block's
    output reaches the loss.
    """

    def __init__(self, config: Optional[InterFormerConfig] = None) -> None:
        super().__init__()
        _check_config(self, config)
        self.config = c = config if config is not None else InterFormerConfig()
        self.dense_tokenizer = DenseTokenizer(c.n_dense, c.d_model, c.dense_tokens)
        self.sparse_tokenizer = SparseTokenizer(c.sparse_vocab_sizes, c.d_model, backend=c.backend)
        self.seq_tokenizer = SequenceMaskNet(c.seq_vocab_sizes, c.d_model, backend=c.backend)
        self.blocks = nn.ModuleList(InterFormerBlock(c) for _ in range(c.num_layers))
        self.final_cross = CrossArch(c)

    def use_streams(self, enabled: bool = True) -> "InterFormer":
        """Overlap each block's Interaction Arch (side CUDA stream) with its Sequence Arch."""
        for block in self.blocks:
            block.use_streams = enabled
        return self

    def tokenize(
        self, dense: torch.Tensor, sparse: torch.Tensor, seq: torch.Tensor, lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``X^1 [B, n, d]`` and the sequence body ``S^1 [B, T, d]`` (padding rows zero)."""
        parts = [self.dense_tokenizer(dense)] if self.config.n_dense_tokens else []
        if self.config.sparse_vocab_sizes:
            parts.append(self.sparse_tokenizer(sparse))
        return torch.cat(parts, dim=1), self.seq_tokenizer(seq, lengths)

    def dense_dtype(self) -> Optional[torch.dtype]:
        """The dtype the dense tokenizer computes in (its parameters'; None without dense fields):
        what :func:`interformer.validate_batch` takes as ``dense_dtype`` for this model."""
        first = next(self.dense_tokenizer.parameters(), None)
        return None if first is None else first.dtype

    def forward(
        self, dense: torch.Tensor, sparse: torch.Tensor, seq: torch.Tensor, lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.config.validate_inputs:
            first = next(self.dense_tokenizer.parameters(), None)  # none without dense fields (dense_dtype())
            # the model's device (a DataParallel replica registers no parameters: then only "one device")
            anchor = first if first is not None else next(self.parameters(), None)
            validate_batch(self.config, dense, sparse, seq, lengths, dense_dtype=None if first is None else first.dtype,
                           device=None if anchor is None else anchor.device)
        x, body = self.tokenize(dense, sparse, seq, lengths)
        x_sum = self.blocks[0].cross.summarize_nonseq(x)
        s = torch.cat([x_sum, body], dim=1)
        for i, block in enumerate(self.blocks):
            x, s = block(x, s, lengths, x_sum if i == 0 else None)
        return self.final_cross(x, s, lengths)


class InterFormerCTR(nn.Module):
    """InterFormer with the CTR head: ``logit = MLP([flatten X_sum || flatten S_sum])``.

    The head has SiLU hidden layers of sizes ``config.head`` and one output. forward returns the
    logits ``[B]``; :meth:`loss` is binary cross-entropy with logits.
    """

    def __init__(self, config: Optional[InterFormerConfig] = None) -> None:
        super().__init__()
        _check_config(self, config)
        self.backbone = InterFormer(config)
        c = self.config
        layers, width = [], (c.n_sum + c.n_ssum) * c.d_model
        for h in c.head:
            layers += [nn.Linear(width, h), nn.SiLU(), nn.Dropout(c.dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.head = nn.Sequential(*layers)

    @property
    def config(self) -> InterFormerConfig:
        """The backbone's config, one object: ``interformer.optimize(model.backbone, ...)`` replaces
        that one's backend, and ``InterFormerCTR(model.config)`` builds the same model (this was a
        copy of the reference taken at construction, which such a call left stale: a review's find,
        2026-11-29)."""
        return self.backbone.config

    @config.setter
    def config(self, value: InterFormerConfig) -> None:
        self.backbone.config = value

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x_sum, s_sum = self.backbone(dense, sparse, seq, lengths)
        return self.head(torch.cat([x_sum.flatten(1), s_sum.flatten(1)], dim=1)).squeeze(-1)

    def use_streams(self, enabled: bool = True) -> "InterFormerCTR":
        """:meth:`InterFormer.use_streams` on the backbone (ignored on CPU and while compiling); returns self."""
        self.backbone.use_streams(enabled)
        return self

    @staticmethod
    def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy with logits, in fp32. Decision: the label's values are not
        checked here (that is a device-to-host read in every training step, and no read may happen
        under CUDA-graph capture); the data loaders check them, and
        :func:`interformer.validate_batch` (``label=...``) does for a batch built by hand. An empty
        batch gives NaN, the mean of nothing, as ``F.binary_cross_entropy_with_logits`` does; the
        loaders form batches from the rows they keep and never yield an empty one."""
        return F.binary_cross_entropy_with_logits(logits.float(), label.float())
