"""``InterFormerConfig``: every hyper-parameter of the model, validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

from .backend import check_backend, default_backend


@dataclass
class InterFormerConfig:
    """Hyper-parameters of :class:`interformer.InterFormer` (defaults: DESIGN §3).

    Feature schema (the data contract of DESIGN §2):

    * ``n_dense`` numeric fields (0 allowed), tokenised into one token (``dense_tokens="single"``)
      or one token per field (``"per_field"``);
    * ``sparse_vocab_sizes``: one vocabulary size per categorical field (id 0 = missing);
    * ``seq_vocab_sizes``: one vocabulary size per behaviour channel (id 0 = padding);
    * ``max_seq_len``: T, the stored length of the behaviour sequences.

    The defaults of the schema match :func:`interformer.data.make_synthetic`.
    ``backend`` is applied to every fused-capable module at construction (default: the
    ``INTERFORMER_BACKEND`` environment variable, else ``"auto"``).
    """

    n_dense: int = 4
    sparse_vocab_sizes: Tuple[int, ...] = (2001, 1001, 51, 25)
    seq_vocab_sizes: Tuple[int, ...] = (1001, 51)
    max_seq_len: int = 50
    dense_tokens: str = "single"

    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 3
    n_sum: int = 4
    n_pma: int = 2
    n_recent: int = 2
    n_ssum: int = 8
    backbone: str = "dhen"
    dhen_layers: int = 1
    dcn_layers: int = 2
    dcn_rank: Optional[int] = 32
    pffn_mode: str = "mlp"
    pffn_hidden: int = 256
    head: Tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    rope_base: float = 10000.0
    causal: bool = False
    ln_eps: float = 1e-5
    validate_inputs: bool = True
    backend: str = field(default_factory=default_backend)

    def __post_init__(self) -> None:
        self.sparse_vocab_sizes = tuple(int(v) for v in self.sparse_vocab_sizes)
        self.seq_vocab_sizes = tuple(int(v) for v in self.seq_vocab_sizes)
        self.head = tuple(int(v) for v in self.head)
        positive = ("d_model", "num_heads", "num_layers", "n_sum", "n_ssum", "dhen_layers", "dcn_layers",
                    "pffn_hidden", "max_seq_len")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"InterFormerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_dense", "n_pma", "n_recent"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"InterFormerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError(f"rotary attention needs an even head dim, got {self.d_model // self.num_heads}")
        if self.dense_tokens not in ("single", "per_field"):
            raise ValueError(f"dense_tokens must be 'single' or 'per_field', got {self.dense_tokens!r}")
        if self.backbone not in ("dhen", "dot", "dcn"):
            raise ValueError(f"backbone must be 'dhen', 'dot' or 'dcn', got {self.backbone!r}")
        if self.pffn_mode not in ("mlp", "linear"):
            raise ValueError(f"pffn_mode must be 'mlp' or 'linear', got {self.pffn_mode!r}")
        if self.dcn_rank is not None and self.dcn_rank < 1:
            raise ValueError(f"dcn_rank must be None (full rank) or >= 1, got {self.dcn_rank}")
        if not self.seq_vocab_sizes:
            raise ValueError("seq_vocab_sizes needs at least one behaviour channel")
        if any(v < 2 for v in self.sparse_vocab_sizes + self.seq_vocab_sizes):
            raise ValueError("every vocabulary needs size >= 2 (id 0 is reserved for missing/padding)")
        if self.n_tokens < 1:
            raise ValueError("the model needs at least one non-sequence token (n_dense > 0 or a sparse field)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if any(v < 1 for v in self.head):
            raise ValueError(f"every head layer needs >= 1 unit, got head={self.head}")
        if not self.ln_eps > 0:  # LN of an all-zero padded row would be 0/0
            raise ValueError(f"ln_eps must be > 0, got {self.ln_eps}")
        if not self.rope_base > 0:
            raise ValueError(f"rope_base must be > 0, got {self.rope_base}")
        self.backend = check_backend(self.backend)

    @property
    def n_cls(self) -> int:
        """CLS tokens prepended to the sequence: the initial non-sequence summary (``n_sum``)."""
        return self.n_sum

    @property
    def n_dense_tokens(self) -> int:
        if self.n_dense == 0:
            return 0
        return 1 if self.dense_tokens == "single" else self.n_dense

    @property
    def n_tokens(self) -> int:
        """Non-sequence tokens ``n``: dense token(s) + one per sparse field."""
        return self.n_dense_tokens + len(self.sparse_vocab_sizes)

    @property
    def n_seq_channels(self) -> int:
        return len(self.seq_vocab_sizes)

    def to_dict(self) -> dict:
        return asdict(self)
