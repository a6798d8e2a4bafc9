"""``InterFormerConfig``: every hyper-parameter of the model, validated at construction."""

from __future__ import annotations

import collections.abc
import math
import numbers
import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Tuple

from .backend import check_backend, default_backend


@dataclass
class InterFormerConfig:
    """Hyper-parameters of :class:`interformer.InterFormer` (defaults: DESIGN §3).

    Feature schema (the data contract of DESIGN §2):

    * ``n_dense`` numeric fields (0 allowed), tokenised into one token (``dense_tokens="single"``)
      or one token per field (``"per_field"``);
    * ``sparse_vocab_sizes``: one vocabulary size per categorical field (id 0 = missing);
    * ``seq_vocab_sizes``: one vocabulary size per behaviour channel (id 0 = padding);
    * ``max_seq_len``: T, the stored length of the behaviour sequences of the synthetic data
      (:func:`interformer.data.make_synthetic`). No parameter depends on it and the model takes a
      batch of any ``T >= 1`` (rotary positions are computed per call): a file's length is its
      schema's ``max_seq_len`` (:class:`interformer.dataio.Schema`), whatever the model's says.

    The defaults of the schema match :func:`interformer.data.make_synthetic`.
    ``backend`` is applied to every fused-capable module at construction (default: the
    ``INTERFORMER_BACKEND`` environment variable, else ``"auto"``).

    Types are checked at construction, and a wrong one raises ``ValueError`` naming the field and
    the value: the size fields (``n_dense``, ``d_model``, ``dcn_rank``, ... and every entry of
    ``sparse_vocab_sizes``, ``seq_vocab_sizes`` and ``head``) must be integers, ``causal`` and
    ``validate_inputs`` must be ``bool`` (a string such as ``"false"`` would be truthy), and
    ``dropout``, ``rope_base`` and ``ln_eps`` must be real numbers. Decision: an integral float
    (``16.0``, as JSON or YAML may write a size; a NumPy ``float32`` too) is accepted and stored as the
    ``int`` ``16``, as :class:`interformer.train.TrainConfig` already converts it; a fractional one
    (``2.5``), a ``bool`` (``True`` is not a size) and a string (``"16"``: the ``train`` command line
    and settings files convert strings before they get here) are refused. A NumPy bool is a bool
    (stored as ``bool``), and the three real numbers are stored as Python ``float`` (a NumPy
    ``float32`` or a ``Fraction`` would not serialise to JSON, and ``nn.Dropout`` fails on a
    ``Fraction`` only when it first drops in training). Likewise a ``str`` subclass given for
    ``dense_tokens``, ``backbone`` or ``pffn_mode`` (a NumPy ``str_``, a ``str`` Enum member) is
    stored as the plain ``str`` it equals: a checkpoint holds ``to_dict()``, and
    ``torch.load(weights_only=True)`` refuses a NumPy string in it. The three tuple fields take any
    ordered iterable (a list, a NumPy array); a set or a dict is refused: a set's order is its
    hashes' (``{2001, 1001, 51, 25}`` was taken as ``(2001, 51, 1001, 25)``, each field given
    another field's vocabulary) and a dict's entries are its keys.

    Decision on the ranges of the real numbers: ``ln_eps`` must be finite and at least the smallest
    normal fp32 number (``2**-126``): the LayerNorm kernels add it in fp32, where a smaller value
    rounds to 0 (or is flushed to 0), and the LayerNorm of a padded all-zero row is then 0/0 = NaN
    (``ln_eps=1e-50`` gave NaN logits). One limit is PyTorch's, not the kernels': a whole model in
    fp16 (``model.half()``) on the *eager* path on a CPU, where ``F.layer_norm`` keeps its saved
    ``1/sigma`` in fp16, needs ``ln_eps >= 2.4e-10``; below that a padded all-zero row's ``1/sigma``
    overflows to inf and the backward is ``0 * inf = NaN`` in every parameter's gradient (found by
    a model-level fuzzer at 1e-12). The fused path (fp32 statistics) and fp16 autocast (LayerNorm in
    fp32) are finite at any accepted ``ln_eps``. ``rope_base`` must be finite and >= 1: rotary inverse
    frequencies are ``rope_base**(-2i/dh)``, at most 1 rad per position for a base >= 1; a base below
    1 turns the order around (the last pairs rotate fastest), and a small one overflows fp32 into
    NaN attention (``rope_base=1e-60``).
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
    dropout: float = 0.0  # after the SiLU of the Interaction Arch's FFN and of each head layer; nowhere else
    rope_base: float = 10000.0
    causal: bool = False
    ln_eps: float = 1e-5
    validate_inputs: bool = True
    backend: str = field(default_factory=default_backend)

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            setattr(self, name, _as_int(name, getattr(self, name)))
        if self.dcn_rank is not None:
            self.dcn_rank = _as_int("dcn_rank", self.dcn_rank)
        for name in _INT_TUPLE_FIELDS:
            value = getattr(self, name)
            if (isinstance(value, (str, bytes, collections.abc.Set, collections.abc.Mapping))
                    or not hasattr(value, "__iter__")):  # a set has no order, a dict's entries are its keys
                raise ValueError(f"InterFormerConfig.{name} must be a sequence of integers, got {value!r}")
            setattr(self, name, tuple(_as_int(f"{name}[{i}]", v) for i, v in enumerate(value)))
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool) and not _is_numpy_bool(value):
                raise ValueError(f"InterFormerConfig.{name} must be a bool (True or False), got {value!r}")
            setattr(self, name, bool(value))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"InterFormerConfig.{name} must be a number, got {value!r}")
            try:
                setattr(self, name, float(value))
            except OverflowError:  # an int or Fraction past fp64: refused by the range checks below
                setattr(self, name, math.inf if value > 0 else -math.inf)
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
            raise ValueError(f"rotary attention needs an even head dim, got d_model={self.d_model} / "
                             f"num_heads={self.num_heads} = {self.d_model // self.num_heads}")
        for name in _CHOICE_FIELDS:  # a str subclass (numpy.str_, a str Enum) as the plain str it equals
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, str.__str__(value))
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
        for name in ("sparse_vocab_sizes", "seq_vocab_sizes"):
            for i, v in enumerate(getattr(self, name)):
                if v < 2:
                    raise ValueError(f"InterFormerConfig.{name}[{i}]: every vocabulary needs size >= 2 (id 0 is "
                                     f"reserved for missing/padding), got {v}")
        if self.n_tokens < 1:
            raise ValueError("the model needs at least one non-sequence token (n_dense > 0 or a sparse field)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if any(v < 1 for v in self.head):
            raise ValueError(f"every head layer needs >= 1 unit, got head={self.head}")
        if not (_FP32_TINY <= self.ln_eps < math.inf):  # LN of an all-zero padded row would be 0/0
            raise ValueError(f"ln_eps must be finite and >= {_FP32_TINY:.6g} (the smallest normal fp32 number: a "
                             f"smaller one is 0 in the fp32 LayerNorm, and a padded row's LN 0/0), got {self.ln_eps}")
        if not (1.0 <= self.rope_base < math.inf):
            raise ValueError(f"rope_base must be finite and >= 1 (rotary inverse frequencies rope_base**(-2i/dh) "
                             f"at most 1), got {self.rope_base}")
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


_INT_FIELDS = ("n_dense", "max_seq_len", "d_model", "num_heads", "num_layers", "n_sum", "n_pma", "n_recent",
               "n_ssum", "dhen_layers", "dcn_layers", "pffn_hidden")
_INT_TUPLE_FIELDS = ("sparse_vocab_sizes", "seq_vocab_sizes", "head")
_BOOL_FIELDS = ("causal", "validate_inputs")
_CHOICE_FIELDS = ("dense_tokens", "backbone", "pffn_mode")  # (backend: check_backend returns a plain str)
_FLOAT_FIELDS = ("dropout", "rope_base", "ln_eps")
_FP32_TINY = 2.0**-126  # the smallest normal fp32 number


def _is_numpy_bool(value: Any) -> bool:
    """Whether ``value`` is a NumPy bool scalar (``numpy.bool_``, ``numpy.bool`` in NumPy 2), without
    importing NumPy."""
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


def _as_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` for the size field ``name``: an integer (a NumPy integer too), or a
    real number with an integral value (``16.0``, ``numpy.float32(16.0)``); anything else (``2.5``,
    ``inf``, ``True``, ``"16"``, None) raises ``ValueError`` naming the field and the value."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
        if isinstance(value, numbers.Real):
            try:
                as_int = int(value)
            except (OverflowError, ValueError):  # inf, nan
                as_int = None
            if as_int is not None and as_int == value:
                return as_int
    raise ValueError(f"InterFormerConfig.{name} must be an integer, got {value!r}")
