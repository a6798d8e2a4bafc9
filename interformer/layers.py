"""Fused-capable modules: one per op of DESIGN §4, and the residual LayerNorm the model uses.

Each module owns its parameters and picks its implementation through ``backend``
(see :mod:`interformer.backend`). The eager path calls :mod:`interformer.reference`; the fused
path calls the function of the same name in :mod:`interformer.kernels`. Both paths read the same
parameters, so ``state_dict`` keys and values never depend on the backend. Where an op reads a
child module's parameters (``GatedLCE.gate``, ``PersonalizedFFN.norm``, PMA's projections,
``FeedForward``'s layers), the module calls the child instead whenever that would compute
something else (:func:`_read_as_called`).
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn

from . import reference
from .backend import FusedModule, called_as_defined, global_module_hooks
from .config import _FP32_TINY
from .kernels._dispatch import autocast_dtype, layer_norm_takes  # (torch only: no Triton import)
from .profiling import ranged
from .reference import row_mask

#: the layer classes a FeedForward's fused op stands for, exactly (a subclass may compute otherwise)
_FFN_LAYERS = [nn.Linear, nn.SiLU, nn.Linear]
_FFN_LAYERS_DROPOUT = [nn.Linear, nn.SiLU, nn.Dropout, nn.Linear]


def _read_as_called(*modules: nn.Module, cls: type, bias: bool = True) -> bool:
    """Whether reading each of ``modules``' parameters computes what calling it would: exactly
    ``cls`` (a subclass may compute otherwise) with a weight and a bias, called as defined (no
    hook on it, ``prune`` included; no per-object forward; not ``Module.compile``'d) and no global
    module hook. The modules below that read a child's parameters (into the fused op or the
    reference alike) call the child instead when this is False, so that the hook runs, the pruned
    weight is the one used, the swapped-in class computes, as in a plain ``nn.Module`` tree.
    ``bias=False``: a bias is not needed (:func:`_expect_dtype` asks only whether calling the layer
    runs ``cls``'s forward)."""
    if global_module_hooks():
        return False
    for m in modules:  # (a loop, not ``all`` over a generator: once or twice every module call)
        if type(m) is not cls or m.weight is None or (bias and m.bias is None) or not called_as_defined(m):
            return False
    return True


def _sizes(module: nn.Module, minimum: int = 1, **sizes) -> None:
    """ValueError, naming ``module``'s class, unless every size is an integer (``int`` or what
    ``operator.index`` takes, such as a NumPy integer; not a bool) >= ``minimum``: a zero or negative
    head count or width used to fail later, as a ZeroDivisionError or in ``torch.empty``, or build a
    module that returned NaN."""
    for name, value in sizes.items():
        try:
            ok = not isinstance(value, bool) and operator.index(value) >= minimum
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{type(module).__name__}: {name} must be an int >= {minimum}, got {value!r}")


def _batch(t) -> Optional[int]:
    """``t``'s batch size for :func:`_expect`, None (any) for a torch.fx Proxy, whose ``shape`` would
    add a node to the traced graph."""
    return None if isinstance(t, torch.fx.Proxy) else t.shape[0]


def _expect(module: nn.Module, name: str, t, sizes: tuple, integer: bool = False) -> None:
    """ValueError, naming ``module``'s class and the argument, unless ``t`` is a tensor of
    ``len(sizes)`` dimensions whose sizes match ``sizes`` (None: any; a leading ``...``: any number of
    leading dimensions, the rest matched from the end) and whose dtype is floating point
    (``integer``: an integer dtype, bool excluded).

    Decision: the modules check their inputs' ranks, sizes and kinds themselves, before the op, on
    both backends. The fused ops check theirs, but the eager reference is PyTorch code that
    broadcasts: a ``[B, 1, d]`` input to a ``GatedLCE`` of three tokens, lengths of shape ``[1]`` or
    ``[B, 1]``, float lengths or a residual of another shape ran on the eager path, silently, where
    the fused one raised. A drop-in must fail alike. Values (lengths in range, ids in their
    vocabularies) are :func:`interformer.validate_batch`'s: reading them costs a device sync. An
    input's dtype against the parameters' is :func:`_expect_dtype`'s.
    torch.fx's Proxies pass (they have no sizes to check)."""
    # (a plain loop, not ``all`` over a generator: this runs for every input of every module call,
    # about 60 times a plain inference forward at taobao, and took 1.0 us a call on the CI CPU, 0.4-0.6 so)
    if isinstance(t, torch.Tensor):
        shape = t.shape
        if sizes and sizes[0] is ...:
            tail = sizes[1:]
            ok = len(shape) >= len(tail)
            shape = shape[len(shape) - len(tail):]
        else:
            tail = sizes
            ok = len(shape) == len(tail)
        if ok:
            for have, want in zip(shape, tail):
                if want is not None and have != want:
                    ok = False
                    break
        if ok:
            ok = (not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool) if integer \
                else t.is_floating_point()
    else:
        if isinstance(t, torch.fx.Proxy):
            return
        ok = False
    if not ok:
        want = "[" + ", ".join("..." if n is ... else "*" if n is None else str(n) for n in sizes) + "]"
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        kind = "an integer" if integer else "a floating-point"
        raise ValueError(f"{type(module).__name__}: {name} must be {kind} tensor {want}, got {got}")


def _expect_dtype(module: nn.Module, name: str, t, like) -> None:
    """ValueError, naming ``module``'s class, the argument and both dtypes, where ``t``'s dtype is not
    the parameters' outside autocast: where the eager path fails on it. ``like`` is what ``t`` meets
    first on that path: a tensor a GEMM takes only in ``t``'s dtype (a parameter, or ``W_b`` made from
    them), or a child layer ``t`` is given to, an ``nn.Linear`` or an ``nn.Sequential`` whose first
    layer is one, whose weight counts only where calling it runs ``nn.Linear``'s forward and nothing
    else (``_read_as_called``'s conditions, a bias not needed; ``called_as_defined`` for the
    Sequential): a hook or another class may cast the input, and eager then runs.

    Decision (2026-11-29): a ``ValueError``, as the other input checks (:func:`_expect`) and
    ``ResidualLayerNorm``'s own dtype rule raise, before the op, so that both backends fail alike.
    Until then the eager path raised PyTorch's ``RuntimeError`` from its first GEMM ("mat1 and mat2
    must have the same dtype", "expected scalar type Half but found Float", ...) and the fused one
    the op's ``ValueError`` ("... must share one dtype outside autocast", or "x0 must be one of
    (float32, ...)" for a float64 input), or both the ``RuntimeError`` where both call a child layer
    first (the rotary attention's ``qkv``, the DOT's ``proj``, the PFFN's hypernetwork): an audit of
    2026-11-29 listed them. Only where eager fails: under autocast for ``t``'s device type a mismatch
    is legal and both paths run (except with float64 on either side, which autocast leaves uncast, so
    that eager's GEMMs fail there as well, and the fused ops refused float64: refused alike, a
    review's find of 2026-11-29), and on the meta device (no data; both backends run the reference
    there, whose ``F.linear`` takes mixed dtypes) nothing is checked; ``ResidualLayerNorm`` has its
    own rule (a 16-bit input with fp32 parameters is legal, as in ``nn.LayerNorm``). Refused whatever
    the sizes: an empty batch (``GatedLCE``'s einsum) or an empty sequence (the PFFN's ``bmm``) ran
    on the eager path, type-promoted, where the same call with one row fails, and the fused op
    refused it.

    Cost: an ``isinstance`` and a dtype comparison per input (and a child's ``weight`` read); the
    rest only on a mismatch, or under autocast where the dtypes differ. Nothing reads the tensor's
    data. Measured on the CI CPU (2026-11-29): 0.6-1.4 us a call with the module attribute reads,
    about 30 calls an inference forward at taobao, +1% of ``profiling/step_ops.py --inference
    --time``'s fused step with the linear layers skipped (1.937 -> 1.957 ms, four alternating
    pairs). torch.fx's Proxies pass (reading their ``dtype`` would record a node); under
    ``torch.compile`` dynamo folds the comparison."""
    if not isinstance(t, torch.Tensor):  # an fx Proxy
        return
    layer = seq = None
    if isinstance(like, nn.Module):
        layer = like
        if type(like) is nn.Sequential:  # (its first layer, without Sequential.__getitem__'s 0.8 us)
            seq, layer = like, next(iter(like._modules.values()), None)
        like = getattr(layer, "weight", None)
        if not isinstance(like, torch.Tensor):
            return
    if t.dtype == like.dtype or t.is_meta:
        return
    autocast = autocast_dtype(t.device.type) is not None
    if autocast and t.dtype != torch.float64 and like.dtype != torch.float64:
        return  # (autocast casts fp32 operands, never float64 ones: a float64 mix fails there too)
    if layer is not None and not (_read_as_called(layer, cls=nn.Linear, bias=False)
                                  and (seq is None or called_as_defined(seq))):
        return  # a hook or another class may cast the input: left to the layer
    if autocast:
        raise ValueError(f"{type(module).__name__}: {name} is {t.dtype} but the parameters are {like.dtype}: "
                         "autocast does not cast float64, so under it too an input must have the parameters' dtype "
                         "where one of them is float64")
    raise ValueError(f"{type(module).__name__}: {name} is {t.dtype} but the parameters are {like.dtype}: outside "
                     "autocast an input must have the parameters' dtype (convert one to the other's, or run under "
                     "torch.autocast)")


def _one_dtype(tensors) -> bool:
    """Whether the parameters ``tensors`` that a module hands its fused op (None entries skipped)
    share one dtype.

    Decision (2026-11-29): a module whose op parameters do not (a bias or a gate left in another
    dtype than its weight: one converted by hand, or loaded with ``load_state_dict(assign=True)``
    from a checkpoint that stored it so) runs the eager reference on every backend, the function
    the ``eager`` backend calls, so that it runs, or fails, exactly as eager does. The fused ops
    refuse such a mix with their own ``ValueError`` ("... must share one dtype ..."), where
    eager's type promotion ran a low-precision bias (``GatedLCE``, the cross nets), a float64
    query (``PoolingMultiHeadAttention``, whose ``triton`` backend read the query's dtype as the
    module's and refused it) or failed with PyTorch's ``RuntimeError`` from a GEMM (a review's
    find). Not ``PersonalizedFFN``, whose op takes fp32 norm parameters beside 16-bit ones by
    :func:`interformer.kernels._dispatch.layer_norm_takes`' rule, nor the modules that call their
    child layers. Cost: a dtype comparison per parameter and call. torch.fx's Proxies pass (reading
    their ``dtype`` would record a node; the traced module calls the public fused function, which
    checks the dtypes it is given when it runs)."""
    first = None
    for t in tensors:
        if t is not None:
            if not isinstance(t, torch.Tensor):  # an fx Proxy
                return True
            if first is None:
                first = t.dtype
            elif t.dtype != first:
                return False
    return True


def _expect_norm_dtypes(module: nn.Module, name: str, x: torch.Tensor, input_dtype: torch.dtype,
                        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    """ValueError, naming ``module``'s class and the argument, where ``F.layer_norm`` refuses the norm
    parameters ``weight`` and ``bias`` (None: absent) for an input of ``input_dtype`` (``x``'s, or
    ``x + residual``'s): the one check of the rule for ``ResidualLayerNorm`` and ``PersonalizedFFN``'s
    norm, on both backends, since the fused kernels take any mix and the eager path fails.

    Where it applies, as :func:`_expect_dtype`: outside autocast for ``x``'s device type the rule is
    :func:`interformer.kernels._dispatch.layer_norm_takes`; under autocast only a mix with float64
    is refused (autocast never casts float64, so eager's ``layer_norm`` fails on it there too; other
    mixes are left to the op: CUDA's autocast runs ``layer_norm`` in fp32 and takes any, as the
    kernels do, CPU autocast does not cast its operands and the op's reference fallback decides).
    Not on the meta device, where ``layer_norm``'s meta kernel takes any mix. Until 2026-11-29 the two
    modules each had a copy of this with different corners: the PFFN let every mix through under
    autocast (so float64 norm parameters ran fused where eager failed), and ``ResidualLayerNorm``
    refused mixes on the meta device that ``nn.LayerNorm`` runs. torch.fx's Proxies pass (reading
    their ``dtype`` would record a node)."""
    if not isinstance(x, torch.Tensor) or x.is_meta or (
            (weight is None or weight.dtype == input_dtype) and (bias is None or bias.dtype == input_dtype)):
        return  # (an fx Proxy; the common case, all one dtype, pays two comparisons)
    params = {n: p.dtype for n, p in (("weight", weight), ("bias", bias)) if p is not None}
    autocast = autocast_dtype(x.device.type) is not None
    if autocast and torch.float64 not in (input_dtype, *params.values()):
        return
    if not layer_norm_takes(params.values(), input_dtype):
        got = " and ".join(f"{d} ({n})" for n, d in params.items())
        when = "under autocast, which does not cast float64," if autocast else "outside autocast"
        raise ValueError(f"{type(module).__name__}: {name} is {input_dtype} but the norm's parameters are {got}: "
                         f"{when} the norm, like nn.LayerNorm, takes parameters of the input's dtype, or fp32 ones "
                         "with a 16-bit input")


__all__ = [
    "GatedLCE",
    "PersonalizedFFN",
    "CrossNet",
    "LowRankCrossNet",
    "DotInteraction",
    "RotaryMultiHeadAttention",
    "PoolingMultiHeadAttention",
    "ResidualLayerNorm",
    "FeedForward",
]


class GatedLCE(FusedModule):
    """Self-gating linear compressed embedding: ``n_in`` tokens -> ``n_out`` tokens.

    ``Y[b, m] = sum_n weight[n, m] X[b, n] + bias[m]``, ``out = Y * sigmoid(gate(Y))`` with
    ``gate = nn.Linear(d_model, d_model)``. The paper prints the gate alone; like every port we
    multiply it by ``Y``. ``weight`` is initialised as ``nn.Linear(n_in, n_out)`` would be.

    Under ``torch.autocast`` both paths return eager's dtype (fp32 with an fp32 bias: ``Y``'s
    type promotion), and the fused backward sums the bias gradient from that fp32 upstream gradient
    as eager does (:mod:`interformer.kernels.gated_lce`, "Dtypes and precision"). Decision
    (2026-11-29): the fused path returned the autocast dtype until then, which rounded the gradient
    coming back to 16 bits before that sum; where it nearly cancels (the output feeds LayerNorms,
    whose input gradient has zero mean over the width) the bias gradient's error reached 4-5x
    eager's under fp16 autocast, against DESIGN §5's 2x (a fuzzing helper and a review).
    """

    kernel_ops = (("gated_lce", "gated_lce"),)
    read_children = ("gate",)

    def __init__(self, n_in: int, n_out: int, d_model: int, backend: Optional[str] = None) -> None:
        super().__init__(backend)
        if min(n_in, n_out, d_model) < 1:
            raise ValueError(f"GatedLCE sizes must be positive, got n_in={n_in}, n_out={n_out}, d_model={d_model}")
        self.n_in, self.n_out, self.d_model = n_in, n_out, d_model
        bound = 1.0 / math.sqrt(n_in)
        self.weight = nn.Parameter(torch.empty(n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_out).uniform_(-bound, bound))
        self.gate = nn.Linear(d_model, d_model)

    @ranged("GatedLCE")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _expect(self, "x", x, (None, self.n_in, self.d_model))
        _expect_dtype(self, "x", x, self.weight)  # (both paths' first op: einsum with weight)
        if not _read_as_called(self.gate, cls=nn.Linear):  # a hooked, pruned or swapped gate: call it
            return reference._gated_lce_with(x, self.weight, self.bias, self.gate)
        params = (self.weight, self.bias, self.gate.weight, self.gate.bias)
        fn = self._op("gated_lce", "gated_lce") if _one_dtype(params) else reference.gated_lce  # (_one_dtype)
        return fn(x, *params)

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}, d_model={self.d_model}, {super().extra_repr()}"


class PersonalizedFFN(FusedModule):
    """Personalized FFN: ``S_mid = S + LN(S) @ W_b`` with a per-sample ``d x d`` weight ``W_b``.

    * ``mode="mlp"`` (paper main text): ``W_b = reshape(hyper(flatten X_sum_b)) / sqrt(d)`` with
      ``hyper = Linear(n_sum*d, hidden) -> SiLU -> Linear(hidden, d*d)``. The hypernetwork runs on
      cuBLAS in both paths; the fused kernel does LN + per-sample matmul + residual + padding.
    * ``mode="linear"`` (paper appendix): ``W_b = X_sum_b^T A`` with ``A [n_sum, d]`` initialised
      ``N(0, 1/(n_sum*d))``; computed as ``(LN(S) @ X_sum_b^T) @ A`` so ``W_b`` is never formed.

    forward ``(s [B, L, d], x_sum [B, n_sum, d], lengths [B])``: ``lengths`` counts the valid
    leading rows of ``s`` (CLS tokens included); rows past it are returned as exact zeros.
    """

    kernel_ops = (("pffn", "pffn_mlp"), ("pffn", "pffn_linear"))
    read_children = ("norm",)

    MODES = ("mlp", "linear")

    def __init__(
        self,
        d_model: int,
        n_sum: int,
        mode: str = "mlp",
        hidden: int = 256,
        eps: float = 1e-5,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(backend)
        if mode not in self.MODES:
            raise ValueError(f"PersonalizedFFN mode must be one of {self.MODES}, got {mode!r}")
        _sizes(self, d_model=d_model, hidden=hidden)
        _sizes(self, minimum=0, n_sum=n_sum)
        if not (_FP32_TINY <= eps < math.inf):  # InterFormerConfig.ln_eps's rule (its docstring)
            raise ValueError(f"PersonalizedFFN: eps must be finite and >= {_FP32_TINY:.6g}, got {eps}")
        self.d_model, self.n_sum, self.mode, self.hidden = d_model, n_sum, mode, hidden
        self.norm = nn.LayerNorm(d_model, eps=eps)
        if mode == "mlp":
            self.hyper = nn.Sequential(
                nn.Linear(n_sum * d_model, hidden), nn.SiLU(), nn.Linear(hidden, d_model * d_model)
            )
        else:
            self.A = nn.Parameter(torch.randn(n_sum, d_model) / math.sqrt(n_sum * d_model))

    @property
    def eps(self) -> float:
        """The LayerNorm's epsilon: ``norm.eps``, one value for both backends (the fused kernels get
        it from here), so that setting ``norm.eps`` after construction changes both alike."""
        return self.norm.eps

    def personal_weight(self, x_sum: torch.Tensor) -> torch.Tensor:
        """``W_b [B, d, d]`` (materialised; the fused linear mode never calls this)."""
        d = self.d_model
        if self.mode == "mlp":
            _expect_dtype(self, "x_sum", x_sum, self.hyper)
            return self.hyper(x_sum.flatten(1)).view(-1, d, d) / math.sqrt(d)
        _expect_dtype(self, "x_sum", x_sum, self.A)
        return torch.matmul(x_sum.transpose(1, 2), self.A)

    @ranged("PersonalizedFFN")
    def forward(self, s: torch.Tensor, x_sum: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _expect(self, "s", s, (None, None, self.d_model))
        _expect(self, "x_sum", x_sum, (_batch(s), self.n_sum, self.d_model))
        _expect(self, "lengths", lengths, (_batch(s),), integer=True)
        # dtypes (_expect_dtype): x_sum meets the hypernetwork (in personal_weight) or A; s meets the norm's
        # parameters (_expect_norm_dtypes), then W_b or A through the norm, whose output has s's dtype, except a
        # hooked norm's (it may cast): s unchecked
        if not _read_as_called(self.norm, cls=nn.LayerNorm):  # a hooked, pruned or swapped norm: call it
            if self.mode == "mlp":
                return reference._pffn_mlp_with(s, lengths, self.personal_weight(x_sum), self.norm)
            _expect_dtype(self, "x_sum", x_sum, self.A)
            return reference._pffn_linear_with(s, lengths, x_sum, self.A, self.norm)
        ln_w, ln_b = self.norm.weight, self.norm.bias
        if self.mode == "mlp":
            w_b = self.personal_weight(x_sum)
            _expect_dtype(self, "s", s, w_b)
            _expect_norm_dtypes(self, "s", s, s.dtype, ln_w, ln_b)
            fn = self._op("pffn", "pffn_mlp")
            return fn(s, lengths, w_b, ln_w, ln_b, self.eps)
        _expect_dtype(self, "s", s, self.A)
        _expect_dtype(self, "x_sum", x_sum, self.A)
        _expect_norm_dtypes(self, "s", s, s.dtype, ln_w, ln_b)
        fn = self._op("pffn", "pffn_linear")
        return fn(s, lengths, x_sum, self.A, ln_w, ln_b, self.eps)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_sum={self.n_sum}, mode={self.mode!r}, {super().extra_repr()}"


def _load_biases(module, state_dict, prefix) -> None:
    """Accept a cross net's biases saved as ``[D]`` or as ``[D, 1]``, whichever the module holds, by
    viewing them in its own shape: torchrec's ``LowRankCrossNet`` keeps ``[D]`` in its current
    releases and ``[D, 1]`` in earlier ones (as this package did before 2026-11-29), and its
    ``CrossNet`` ``[D, 1]``. Any other shape is left to ``load_state_dict``'s size-mismatch error."""
    for i, own in enumerate(module.bias):
        key = f"{prefix}bias.{i}"
        saved = state_dict.get(key)
        D = own.numel()
        if isinstance(saved, torch.Tensor) and saved.shape != own.shape and saved.shape in ((D,), (D, 1)):
            state_dict[key] = saved.reshape(own.shape)


class CrossNet(FusedModule):
    """DCNv2 full-rank cross layers, a drop-in for ``torchrec.modules.crossnet.CrossNet``.

    ``x_{i+1} = x0 * (W_i x_i + b_i) + x_i``. Parameters as torchrec's: ``kernels`` (ParameterList of
    ``[D, D]``, Xavier-normal) and ``bias`` (ParameterList of ``[D, 1]``, zeros), so torchrec
    ``state_dict``s load unchanged.

    Under ``torch.autocast`` both paths return eager's dtype (x0's, the autocast dtype and the bias's
    promoted: fp32 with fp32 parameters; until 2026-11-29 the fused path returned the autocast dtype,
    half the output's bytes but no drop-in), and the fused path rounds no more than eager: the GEMM
    operands (``x_i``, and the parameters' copies), not x0 in ``x0 * (W x_i + b)``, the bias, the
    running ``x_i`` or the carried gradient, which stay fp32 as in eager (where eager rounds a GEMM's
    output before adding the bias, the kernels keep ``y`` fp32 too). (Until 2026-11-29 the
    kernels rounded x0 first, which put the bias gradients at fp16's rounding, 4.8e-4 relative to
    float64 against eager's 5.5e-8, out of DESIGN §5's 2x.) See
    ``tests/test_kernel_crossnet.py::test_autocast_meets_the_design_rule_per_parameter`` and
    :mod:`interformer.kernels.crossnet`, "Dtypes and precision".
    """

    kernel_ops = (("crossnet", "cross_net"),)

    def __init__(self, in_features: int, num_layers: int, backend: Optional[str] = None) -> None:
        super().__init__(backend)
        if in_features < 1 or num_layers < 1:
            raise ValueError(f"CrossNet needs in_features >= 1 and num_layers >= 1, got {in_features}, {num_layers}")
        self.in_features, self._num_layers = in_features, num_layers
        self.kernels = nn.ParameterList(
            [nn.Parameter(nn.init.xavier_normal_(torch.empty(in_features, in_features))) for _ in range(num_layers)]
        )
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(in_features, 1)) for _ in range(num_layers)])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _load_biases(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @ranged("CrossNet")
    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        _expect(self, "x0", x0, (None, self.in_features))
        _expect_dtype(self, "x0", x0, self.kernels[0])
        kernels, biases = list(self.kernels), list(self.bias)
        fn = self._op("crossnet", "cross_net") if _one_dtype(kernels + biases) else reference.cross_net  # (_one_dtype)
        return fn(x0, kernels, biases)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_layers={self._num_layers}, {super().extra_repr()}"


class LowRankCrossNet(FusedModule):
    """DCNv2 low-rank cross layers, a drop-in for ``torchrec.modules.crossnet.LowRankCrossNet``.

    ``x_{i+1} = x0 * (U_i (V_i x_i) + b_i) + x_i`` with ``W_kernels`` (U, ``[D, r]``), ``V_kernels``
    (``[r, D]``), both Xavier-normal, and ``bias`` (``[D]``, zeros) -- torchrec's names and shapes.
    Under autocast both paths return eager's dtype and the fused path rounds no more than eager, as
    :class:`CrossNet`'s do (the kernels keep each ``x_i`` in fp32 registers and never store it).

    Decision: the biases are ``[D]``, as torchrec's current ``LowRankCrossNet`` holds them (its
    earlier releases, and this package before 2026-11-29, held ``[D, 1]``), so that a ``state_dict``
    goes both ways between the two modules; a ``[D, 1]`` one loads too, viewed as ``[D]``, and a
    resumed training run reshapes its optimiser's saved state to match (``interformer.train``).
    """

    kernel_ops = (("crossnet", "low_rank_cross_net"),)

    def __init__(self, in_features: int, num_layers: int, low_rank: int = 1, backend: Optional[str] = None) -> None:
        super().__init__(backend)
        if in_features < 1 or num_layers < 1 or low_rank < 1:
            raise ValueError(
                f"LowRankCrossNet needs positive in_features, num_layers, low_rank; got {in_features}, {num_layers}, {low_rank}"
            )
        self.in_features, self._num_layers, self._low_rank = in_features, num_layers, low_rank
        self.W_kernels = nn.ParameterList(
            [nn.Parameter(nn.init.xavier_normal_(torch.empty(in_features, low_rank))) for _ in range(num_layers)]
        )
        self.V_kernels = nn.ParameterList(
            [nn.Parameter(nn.init.xavier_normal_(torch.empty(low_rank, in_features))) for _ in range(num_layers)]
        )
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(in_features)) for _ in range(num_layers)])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _load_biases(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @ranged("LowRankCrossNet")
    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        _expect(self, "x0", x0, (None, self.in_features))
        _expect_dtype(self, "x0", x0, self.V_kernels[0])
        w, v, biases = list(self.W_kernels), list(self.V_kernels), list(self.bias)
        fused = _one_dtype(w + v + biases)  # (else the reference: _one_dtype)
        fn = self._op("crossnet", "low_rank_cross_net") if fused else reference.low_rank_cross_net
        return fn(x0, w, v, biases)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_layers={self._num_layers}, low_rank={self._low_rank}, "
            f"{super().extra_repr()}"
        )


class DotInteraction(FusedModule):
    """DOT interaction module of the Interaction Arch.

    ``P = strict_upper(Z Z^T)`` (``N(N-1)/2`` values, the fused op) -> ``Linear -> [B, N*d]`` -> tokens
    ``[B, N, d]``. With a single token there is no pair; the module then returns the projection's
    bias broadcast over the batch.
    """

    kernel_ops = (("dot_interaction", "dot_interaction"),)

    def __init__(self, num_tokens: int, d_model: int, backend: Optional[str] = None) -> None:
        super().__init__(backend)
        _sizes(self, num_tokens=num_tokens, d_model=d_model)
        self.num_tokens, self.d_model = num_tokens, d_model
        self.num_pairs = num_tokens * (num_tokens - 1) // 2
        self.proj = nn.Linear(self.num_pairs, num_tokens * d_model)

    @ranged("DotInteraction")
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _expect(self, "z", z, (None, self.num_tokens, self.d_model))
        _expect_dtype(self, "z", z, self.proj)  # (the products have z's dtype)
        fn = self._op("dot_interaction", "dot_interaction")
        return self.proj(fn(z)).view(z.shape[0], self.num_tokens, self.d_model)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, d_model={self.d_model}, {super().extra_repr()}"


class RotaryMultiHeadAttention(FusedModule):
    """Multi-head self-attention with rotary positions and key/query padding from lengths.

    ``q, k, v = split(qkv(s))`` into ``num_heads`` heads; rotary (rotate-half, ``rope_base``) on q and
    k at positions ``0 .. L-1``; keys at positions ``>= valid_lengths[b]`` masked; output
    ``out_proj(attention)`` with rows at padded positions set to exactly 0. The caller owns the
    pre-norm and the residual (the Sequence Arch does ``S + attn(LN(S))``). ``causal=True`` restricts
    each query to keys at or before it.
    """

    kernel_ops = (("attention", "attention"),)

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        rope_base: float = 10000.0,
        causal: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(backend)
        _sizes(self, d_model=d_model, num_heads=num_heads)
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        if not (1.0 <= rope_base < math.inf):  # InterFormerConfig.rope_base's rule (its docstring)
            raise ValueError(f"RotaryMultiHeadAttention: rope_base must be finite and >= 1, got {rope_base}")
        if (d_model // num_heads) % 2:
            raise ValueError(f"rotary needs an even head dim, got d_model/num_heads={d_model // num_heads}")
        self.d_model, self.num_heads, self.rope_base, self.causal = d_model, num_heads, float(rope_base), causal
        self.head_dim = d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    @ranged("RotaryMultiHeadAttention")
    def forward(self, s: torch.Tensor, valid_lengths: torch.Tensor) -> torch.Tensor:
        _expect(self, "s", s, (None, None, self.d_model))
        _expect(self, "valid_lengths", valid_lengths, (_batch(s),), integer=True)
        _expect_dtype(self, "s", s, self.qkv)
        B, L, _ = s.shape
        qkv = self.qkv(s).view(B, L, 3, self.num_heads, self.head_dim)
        fn = self._op("attention", "attention")
        kw = dict(causal=self.causal, rope_base=self.rope_base, rope_q=True, mask_queries=True)
        packed = getattr(fn, "packed", None)  # the fused attention's entry for one packed tensor
        o = packed(qkv, valid_lengths, **kw) if packed is not None else fn(*qkv.unbind(2), valid_lengths, **kw)
        out = self.out_proj(o.reshape(B, L, self.d_model))
        return out * row_mask(valid_lengths, L).unsqueeze(-1).to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, rope_base={self.rope_base}, "
            f"causal={self.causal}, {super().extra_repr()}"
        )


class PoolingMultiHeadAttention(FusedModule):
    """PMA pooling: ``num_queries`` learned queries attend over the valid rows of a sequence.

    The queries are parameters (``query [num_queries, d]``, so no query projection); keys, values
    and output have their own projections (``k_proj``, ``v_proj``, ``o_proj``); no rotary. A row
    with length 0 returns exact zeros (the output projection's bias included).

    forward ``(s [B, L, d], lengths [B])`` -> ``[B, num_queries, d]``.

    Fused path (DESIGN §4: "reads the sequence once"): the projections are folded into the few
    queries and into one output matrix, so neither K nor V is ever computed. For head ``h`` with
    rows ``W_k,h``, ``W_v,h`` of the key and value projections and columns ``W_o,h`` of the output one,

    * ``q_h . (W_k,h s_l + b_k,h) = (W_k,h^T q_h) . s_l + q_h . b_k,h``; the last term is the same
      for every key of a row and softmax ignores it, so the scores are those of the folded queries
      ``W_k,h^T q_h`` (``num_queries * num_heads`` of them, ``d`` wide) against ``s`` itself;
    * the probabilities sum to 1 over the valid keys, so ``sum_l p_l (W_v,h s_l + b_v,h) =
      W_v,h a_h + b_v,h`` with ``a_h = sum_l p_l s_l``, and the output projection of the heads'
      concatenation is ``sum_h (W_o,h W_v,h) a_h + W_o b_v + b_o``: one ``[B*num_queries, H*d] x
      [H*d, d]`` GEMM.

    So the fused attention kernel runs once with one ``d``-wide head, the folded queries shared
    over the batch and ``s`` as both keys and values (``sm_scale = 1/sqrt(head_dim)``): it reads
    the sequence and writes ``B * num_queries * H * d`` values, where the unfolded path writes
    and reads back K and V (``2 B L d`` each way); its backward kernel writes ``ds = dk + dv``
    itself. The weights are folded on every call (``H * d * d`` products, nothing cached, so a
    training step and ``torch.compile`` see the parameters as they are), and outside tracing the
    whole fused op is one autograd node with closed-form gradients
    (:func:`interformer.kernels.attention.pooled_attention`), the fold one Triton launch and its
    gradients one more. ``k_proj.bias`` has an exact zero gradient on this path; on the eager path
    its gradient is rounding noise around zero. Outside tracing a sequence wider than autocast's
    dtype (fp32 under bf16 autocast) is not copied to that dtype: the kernels round each tile as
    they load it, and its gradient comes back in fp32 from them (the eager projections each cast it;
    in a fully fused model it arrives in the autocast dtype already, but behind eager modules it may
    be fp32, and then a compiled model, whose traced path casts it first, rounds its gradient
    otherwise than an uncompiled one: both about equally far from float64, a compile fuzzing helper
    found). The kernel takes heads up to 128 wide, so a module with ``d_model > 128`` keeps the
    unfolded path (``d_model / num_heads``-wide heads). The math of both paths: ``pooled_attention``
    in :mod:`interformer.reference` and :mod:`interformer.kernels.attention`.
    """

    kernel_ops = (("attention", "pooled_attention"),)
    read_children = ("k_proj", "v_proj", "o_proj")

    def __init__(self, num_queries: int, d_model: int, num_heads: int, backend: Optional[str] = None) -> None:
        super().__init__(backend)
        _sizes(self, d_model=d_model, num_heads=num_heads)
        _sizes(self, minimum=0, num_queries=num_queries)
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_queries, self.d_model, self.num_heads = num_queries, d_model, num_heads
        self.head_dim = d_model // num_heads
        self.query = nn.Parameter(torch.randn(num_queries, d_model) / math.sqrt(d_model))
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    @ranged("PoolingMultiHeadAttention")
    def forward(self, s: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _expect(self, "s", s, (None, None, self.d_model))
        _expect(self, "lengths", lengths, (_batch(s),), integer=True)
        if not _read_as_called(self.k_proj, self.v_proj, self.o_proj, cls=nn.Linear):  # hooked, pruned, swapped
            return reference._pma_with(reference.attention, s, lengths, self.query, self.k_proj, self.v_proj,
                                       self.o_proj, self.num_heads)
        _expect_dtype(self, "s", s, self.k_proj.weight)
        params = (self.query, self.k_proj.weight, self.k_proj.bias, self.v_proj.weight, self.v_proj.bias,
                  self.o_proj.weight, self.o_proj.bias)
        fn = self._op("attention", "pooled_attention") if _one_dtype(params) else reference.pooled_attention
        return fn(s, lengths, *params, self.num_heads)  # (the reference where the dtypes differ: _one_dtype)

    def extra_repr(self) -> str:
        return (
            f"num_queries={self.num_queries}, d_model={self.d_model}, num_heads={self.num_heads}, "
            f"{super().extra_repr()}"
        )


class ResidualLayerNorm(FusedModule, nn.LayerNorm):
    """``nn.LayerNorm(d_model, eps)`` with an optional residual: ``forward(x, residual=None)`` returns
    ``LayerNorm(x + residual)``.

    A drop-in ``nn.LayerNorm`` (it is one: same ``weight``/``bias`` parameters, initialisation and
    ``state_dict``, ``isinstance(m, nn.LayerNorm)`` holds) that is also fused-capable: on the
    ``triton`` backend the add and the normalisation run in one kernel, with a backward whose
    weight/bias reduction is split over row tiles (:mod:`interformer.kernels.layernorm`, where the
    reason is measured). Normalises over the last dimension only.

    Decision: while ``torch.compile`` traces the module, it takes the reference ops whatever the
    backend (``add_layer_norm`` is in :func:`interformer.backend.set_compile_reference_ops`'s default
    set). Inductor generates its own fused add + LayerNorm with a split weight/bias reduction
    and can also fold in the producer of the residual (a bias add, an activation); the custom op
    would be an opaque boundary in its graph, paid for with a dispatch per call. The fused kernel
    is for the paths Inductor does not see. (``interformer.kernels.layernorm.add_layer_norm`` called
    directly still goes through the custom op under ``torch.compile``.)
    """

    kernel_ops = (("layernorm", "add_layer_norm"),)

    def __init__(self, d_model: int, eps: float = 1e-5, backend: Optional[str] = None) -> None:
        super().__init__(backend, d_model, eps=eps)  # FusedModule, then nn.LayerNorm(d_model, eps)

    @ranged("ResidualLayerNorm")
    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        _expect(self, "x", x, (..., *self.normalized_shape))
        if residual is not None and isinstance(x, torch.Tensor):  # LayerNorm(x + residual), not broadcast
            _expect(self, "residual", residual, tuple(x.shape))
        if isinstance(x, torch.Tensor):  # (not an fx Proxy)
            h, name = x.dtype, "x"
            if isinstance(residual, torch.Tensor):
                name = "x + residual"
                if residual.dtype != h:
                    h = torch.promote_types(h, residual.dtype)
            _expect_norm_dtypes(self, name, x, h, self.weight, self.bias)
        fn = self._op("layernorm", "add_layer_norm")
        return fn(x, residual, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{nn.LayerNorm.extra_repr(self)}, {FusedModule.extra_repr(self)}"


class FeedForward(FusedModule, nn.Sequential):
    """``Linear(d_in, hidden) -> SiLU [-> Dropout] -> Linear(hidden, d_out)``, fused-capable.

    An ``nn.Sequential`` of exactly those layers (same children, parameter names, initialisation
    and ``state_dict`` as the plain ``nn.Sequential`` it replaces: ``0.weight``, ``0.bias`` and
    ``2.*``, or ``3.*`` with the dropout), whose forward on the fused path runs the whole block as
    one op (:func:`interformer.kernels.feed_forward.feed_forward`: the hidden activation never goes
    to memory; a block wider than 64 runs the eager math there, two cuBLAS GEMMs, which a GPU
    timed faster: its ``FUSED_MAX_FEATURES``), computing ``silu(x W1^T + b1) W2^T + b2`` (:func:`interformer.reference.feed_forward`)
    from the two layers' parameters. The model uses it for the Interaction Arch's FFN (the sequence
    tokenizer's mask MLP has the same form but stays a plain ``nn.Sequential``: DESIGN §3 keeps the
    tokenizers eager).

    Decision: the block calls its layers one by one, as ``nn.Sequential`` does, whenever the fused
    op would not compute exactly what they compute: on the eager backend (and wherever the backend
    resolves to the reference: ``"auto"`` on a CPU, an op left to Inductor under ``torch.compile``),
    while the dropout can drop (training with ``p > 0``; the kernel has no dropout), and when a
    layer is not the plain layer the fused op stands for: another class (a subclass, ``GELU`` in
    place of ``SiLU``, a parametrised or quantised ``Linear``), a ``Linear`` without a bias, a hook
    on a layer or a global one
    (``torch.nn.utils.prune`` is a forward pre-hook), a ``forward`` or ``_call_impl`` set on the
    layer object, or a layer compiled with ``Module.compile``. Slicing returns a plain
    ``nn.Sequential`` of the chosen layers.
    """

    kernel_ops = (("feed_forward", "feed_forward"),)

    @property
    def read_children(self) -> tuple:  # every layer (see FusedModule.read_children)
        return tuple(self._modules)

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: Optional[float] = None,
                 backend: Optional[str] = None) -> None:
        layers = [nn.Linear(d_in, hidden), nn.SiLU()]
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, d_out))
        super().__init__(backend, *layers)  # FusedModule, then nn.Sequential(*layers)

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # nn.Sequential would build self.__class__ from the chosen layers
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return nn.Sequential.__getitem__(self, idx)

    def _plain(self) -> bool:
        """Whether calling the layers computes exactly the fused op: the plain layer classes, no
        hook, no per-object override, the dropout unable to drop (see the class docstring)."""
        layers = list(self._modules.values())
        if [type(m) for m in layers] != (_FFN_LAYERS_DROPOUT if len(layers) == 4 else _FFN_LAYERS):
            return False
        if len(layers) == 4 and layers[2].training and layers[2].p > 0:
            return False
        if layers[0].bias is None or layers[-1].bias is None:  # the op takes both biases
            return False
        return not global_module_hooks() and all(called_as_defined(m) for m in layers)

    @ranged("FeedForward")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self[0]
        if isinstance(first, nn.Linear):  # (a user's own first layer checks its input itself)
            _expect(self, "x", x, (..., first.in_features))
            _expect_dtype(self, "x", x, first)
        if self._backend != "eager" and self._plain():
            first, last = self[0], self[-1]
            params = (first.weight, first.bias, last.weight, last.bias)
            fn = self._op("feed_forward", "feed_forward") if _one_dtype(params) else reference.feed_forward
            if fn is not reference.feed_forward:  # (mixed dtypes: the layers, as eager: _one_dtype)
                return fn(x, *params)
        return nn.Sequential.forward(self, x)

    def extra_repr(self) -> str:
        return FusedModule.extra_repr(self)
