"""What each fused op launches and writes: the structural claims of the kernel issues, checked.

The other kernel tests show that the fused ops compute the right numbers; these show that they do it
the way their docstrings (and issues #3-#5) say, which is where the speed comes from:

* the forward of every op is ONE Triton launch (PFFN: LayerNorm, per-sample matmul and residual;
  cross nets: all layers; gated LCE: compression and gate), but where a docstring names more (the
  full-rank cross net past D = 128: one element-wise launch per layer beside cuBLAS; the low-rank
  one's phased forward: one per layer and one for the output; PMA's folded pooling: the fold of its
  parameters), and the backward launches exactly the kernels its docstring lists;
* no aten op does compute next to the kernels, except the cuBLAS GEMMs a docstring names (the
  full-rank cross net's weight gradients and wide layers, the gated LCE's ``dZ^T Y`` in "store" mode)
  and the reduction of a shared query's gradient over the batch -- in particular no element-wise
  chain falls back to eager, and no zero tensor is materialised for an unused output's gradient;
* the intermediates the issues say are never written are never allocated: the per-sample ``d x d``
  matrix of linear-mode PFFN, the ``N x N`` Gram matrix of the DOT interaction, the ``Lq x Lk``
  scores of attention (or a mask), Y and the gate of the gated LCE, ``x_i`` of the low-rank cross net,
  the ``[rows, H]`` hidden activation of the feed-forward block (and, under autocast, no cast copy).

How: Triton launches are counted and skipped (:func:`interformer.profiling.triton_launches`, so no
kernel runs and the sizes can be larger than the interpreter could afford), and a ``TorchDispatchMode`` records
every aten op of one forward and of its backward, after a warm-up call (cached rotary tables are
steady state). The launchers' Python is unchanged by the skip: what they allocate and call is what
they do on a GPU. On a GPU the same tests run with the GPU's launchers.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from interformer.profiling import triton_launches
from poison import _EMPTY
from utils import DEVICE

pytest.importorskip("triton")  # (a machine without Triton skips the file)
from interformer.kernels import attention  # noqa: E402  (an import error fails, not skips)
from interformer.kernels import crossnet, dot_interaction, feed_forward, gated_lce, layernorm, pffn  # noqa: E402


# ----------------------------------------------------------------------------- recording
@dataclass
class Made:
    """One tensor an aten op returned: the op, whether it is a fresh allocation, a view, or computed."""

    op: str
    kind: str  # "alloc" | "view" | "compute"
    shape: Tuple[int, ...]
    dtype: torch.dtype


class Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.made: List[Made] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = "alloc" if func in _EMPTY else "view" if func.is_view or func is torch.ops.aten.detach.default else "compute"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.made.append(Made(str(func).removeprefix("aten."), kind, tuple(t.shape), t.dtype))
        return out


@dataclass
class Phase:
    launches: Counter
    made: List[Made]

    def compute_ops(self) -> FrozenSet[str]:
        return frozenset(m.op for m in self.made if m.kind == "compute")

    def new(self) -> List[Made]:
        """Tensors with fresh memory (allocations and computed results, not views)."""
        return [m for m in self.made if m.kind != "view"]


def run_phases(fn: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor]) -> Tuple[Phase, Phase, list]:
    """(forward, backward, gradients of ``leaves``) of ``fn()`` and ``torch.autograd.grad``, after one
    warm-up of both. ``autograd.grad`` returns the gradients instead of accumulating them into
    ``.grad`` (which would add autograd's own copies and sums to the record)."""
    with triton_launches(run=False):
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    with triton_launches(run=False) as fwd_launches, Record() as fwd:
        out = fn()
    g = torch.ones_like(out)
    with triton_launches(run=False) as bwd_launches, Record() as bwd:
        grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return Phase(Counter(fwd_launches), fwd.made), Phase(Counter(bwd_launches), bwd.made), list(grads)


# ----------------------------------------------------------------------------- the claims
def leaf(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()


def has_adjacent(shape: Sequence[int], a: int, b: int) -> bool:
    return any(shape[i] == a and shape[i + 1] == b for i in range(len(shape) - 1))


def numel(m: "Made") -> int:
    return math.prod(m.shape)


def is_rows(m: "Made", D: int) -> bool:
    """A [B, D] tensor, or several stacked or flattened into one (the sizes below keep every
    parameter and gradient of the low-rank case off multiples of B * D)."""
    return numel(m) > 0 and numel(m) % (B * D) == 0


@dataclass
class Case:
    name: str
    build: Callable[[], Tuple[Callable[[], torch.Tensor], List[torch.Tensor]]]
    fwd_launches: Dict[str, int]
    bwd_launches: Dict[str, int]
    fwd_compute: FrozenSet[str] = frozenset()  # aten ops allowed to compute in the forward
    bwd_compute: FrozenSet[str] = frozenset()
    #: what must never be written: (description, predicate on a fresh tensor)
    never: Optional[Tuple[str, Callable[[Made], bool]]] = None
    #: (description, predicate, how many fresh tensors of the forward may match): e.g. only the output
    fwd_at_most: Optional[Tuple[str, Callable[[Made], bool], int]] = None
    bwd_at_most: Optional[Tuple[str, Callable[[Made], bool], int]] = None
    #: module-level settings of ``interformer.kernels.crossnet`` the case runs with (name -> value)
    settings: Tuple[Tuple[str, object], ...] = ()

    def apply(self, monkeypatch) -> None:
        for name, value in self.settings:
            monkeypatch.setattr(crossnet, name, value)


B = 3
# PFFN: L < d, so a per-sample d x d matrix ([B, d, d]) would be the largest tensor in sight
P_L, P_D, P_NS = 7, 24, 2
# gated LCE: B * n_out * d is the size of Y, of the gate and of the output
G_NIN, G_NOUT, G_D = 5, 4, 24
# DOT: N > d, so an N x N Gram matrix would outgrow z itself
Z_N, Z_D = 40, 16
# attention: L = 65 (fused backward), 129 (the general backward: delta, dq, dk/dv); with L > 3 dh the
# scores [B, H, L, L] outgrow the packed qkv [B, L, 3, H, dh]. PMA: 5 shared queries
A_B, A_H, A_DH = 2, 2, 16
# feed-forward block: x [B, F_T, F_K] (150 rows: three 64-row blocks), H = 72 (three hidden chunks,
# the last partial), so that the [rows, H] hidden activation outgrows all inputs together
F_T, F_K, F_H, F_N = 50, 24, 72, 24


def _pffn_linear():
    s, xs, a = leaf(B, P_L, P_D), leaf(B, P_NS, P_D), leaf(P_NS, P_D)
    w, b = leaf(P_D), leaf(P_D)
    lengths = torch.tensor([0, 3, P_L], device=DEVICE)
    return (lambda: pffn.pffn_linear(s, lengths, xs, a, w, b, 1e-5)), [s, xs, a, w, b]


def _pffn_mlp():
    s, wb, w, b = leaf(B, P_L, P_D), leaf(B, P_D, P_D), leaf(P_D), leaf(P_D)
    lengths = torch.tensor([0, 3, P_L], device=DEVICE)
    return (lambda: pffn.pffn_mlp(s, lengths, wb, w, b, 1e-5)), [s, wb, w, b]


def _gated_lce():
    x, w, b, gw, gb = leaf(B, G_NIN, G_D), leaf(G_NIN, G_NOUT), leaf(G_NOUT), leaf(G_D, G_D), leaf(G_D)
    return (lambda: gated_lce.gated_lce(x, w, b, gw, gb)), [x, w, b, gw, gb]


def _cross_net(D, L):
    def build():
        x0 = leaf(B, D)
        ks, bs = [leaf(D, D) for _ in range(L)], [leaf(D, 1) for _ in range(L)]
        return (lambda: crossnet.cross_net(x0, ks, bs)), [x0, *ks, *bs]
    return build


def _low_rank(D, r, L, dtype=torch.float32):
    def build():
        x0 = leaf(B, D, dtype=dtype)
        us, vs = [leaf(D, r, dtype=dtype) for _ in range(L)], [leaf(r, D, dtype=dtype) for _ in range(L)]
        bs = [leaf(D, 1, dtype=dtype) for _ in range(L)]
        return (lambda: crossnet.low_rank_cross_net(x0, us, vs, bs)), [x0, *us, *vs, *bs]
    return build


def _dot():
    z = leaf(B, Z_N, Z_D)
    return (lambda: dot_interaction.dot_interaction(z)), [z]


def _attention(L, packed=False, dtype=torch.float32):
    def build():
        lengths = torch.tensor([0, L - 4], device=DEVICE)
        if packed:  # one QKV projection: the packed op
            qkv = leaf(A_B, L, 3, A_H, A_DH, dtype=dtype)
            return (lambda: attention.attention_packed(qkv, lengths, rope_base=1e4)), [qkv]
        q, k, v = (leaf(A_B, L, A_H, A_DH, dtype=dtype) for _ in range(3))
        return (lambda: attention.attention(q, k, v, lengths, rope_base=1e4)), [q, k, v]
    return build


def _pma(Lq, Lk):
    def build():
        q, k, v = leaf(1, Lq, A_H, A_DH), leaf(A_B, Lk, A_H, A_DH), leaf(A_B, Lk, A_H, A_DH)
        lengths = torch.tensor([0, Lk - 4], device=DEVICE)
        return (lambda: attention.attention(q, k, v, lengths, rope_q=False, mask_queries=False)), [q, k, v]
    return build


def _one_kv(Lq, Lk, shared):
    """k and v given as one tensor s (PMA's folded call when shared, rotary self-attention else)."""
    def build():
        q, s = leaf(1 if shared else A_B, Lq, A_H, A_DH), leaf(A_B, Lk, A_H, A_DH)
        lengths = torch.tensor([0, Lk - 4], device=DEVICE)
        if shared:
            return (lambda: attention.attention(q, s, s, lengths, rope_q=False, mask_queries=False)), [q, s]
        return (lambda: attention.attention(q, s, s, lengths, rope_base=1e4)), [q, s]
    return build


def _pooled(Lk, nq=5):
    """PMA on the folded op (``attention.pooled_attention``): s ``[A_B, Lk, d]``, ``nq`` learned
    queries and the K, V, O projections."""
    def build():
        d = A_H * A_DH
        s, query = leaf(A_B, Lk, d), leaf(nq, d)
        params = [leaf(d, d) if i % 2 == 0 else leaf(d) for i in range(6)]  # k, v, o: weight, bias
        lengths = torch.tensor([0, Lk - 4], device=DEVICE)
        return (lambda: attention.pooled_attention(s, lengths, query, *params, A_H)), [s, query, *params]
    return build


def _kv_sized(Lk, n):
    """(description, predicate, n): the backward writes one [B, Lk, H, dh] tensor for the shared k/v
    (plus dq where q is as large), and neither a separate dv nor a sum of dk and dv."""
    return ("[B, Lk, H, dh] tensors (ds = dk + dv from the kernel; dq)", lambda m: numel(m) == A_B * Lk * A_H * A_DH, n)


def _layernorm():
    x, r, w, b = leaf(5, 24), leaf(5, 24), leaf(24), leaf(24)
    return (lambda: layernorm.add_layer_norm(x, r, w, b, 1e-5)), [x, r, w, b]


def _feed_forward(autocast=False):
    def build():
        x, w1, b1, w2, b2 = leaf(B, F_T, F_K), leaf(F_H, F_K), leaf(F_H), leaf(F_N, F_H), leaf(F_N)

        def fn():
            if not autocast:
                return feed_forward.feed_forward(x, w1, b1, w2, b2)
            # fp16 autocast on DEVICE (the interpreter has no bf16): x and the parameters stay fp32
            with torch.autocast(DEVICE.type, dtype=torch.float16):
                return feed_forward.feed_forward(x, w1, b1, w2, b2)
        return fn, [x, w1, b1, w2, b2]
    return build


def _hidden():
    return (f"a [{B * F_T}, {F_H}] hidden activation", lambda m: numel(m) > 0 and numel(m) % (B * F_T * F_H) == 0)


def _scores(Lq, Lk):
    return (f"an {Lq} x {Lk} score matrix or a boolean mask",
            lambda m: has_adjacent(m.shape, Lq, Lk) or m.dtype == torch.bool)


SUM_PARTIALS = "_sum_partials_kernel"
CASES = [
    Case("pffn_linear", _pffn_linear, {"_pffn_fwd_kernel": 1}, {"_pffn_bwd_kernel": 1, SUM_PARTIALS: 1},
         never=(f"a per-sample {P_D} x {P_D} matrix", lambda m: has_adjacent(m.shape, P_D, P_D))),
    # mlp mode: w_b comes from the hypernetwork, but the per-sample matmul is not on cuBLAS
    Case("pffn_mlp", _pffn_mlp, {"_pffn_fwd_kernel": 1}, {"_pffn_bwd_kernel": 1, SUM_PARTIALS: 1}),
    Case("gated_lce", _gated_lce, {"_glce_fwd_kernel": 1}, {"_glce_bwd_kernel": 1, SUM_PARTIALS: 1},
         bwd_compute=frozenset({"mm.default"}),  # "store" mode: dgate_weight = dZ^T Y on cuBLAS
         fwd_at_most=("a tensor as large as Y or the gate (only the output may be)",
                      lambda m: numel(m) >= B * G_NOUT * G_D, 1)),
    # D <= 128: one Triton GEMM launch runs every layer; backward one launch per layer, dW on cuBLAS
    Case("cross_net, D=40, 3 layers", _cross_net(40, 3), {"_fr_fwd_kernel": 1}, {"_fr_bwd_kernel": 3, SUM_PARTIALS: 1},
         bwd_compute=frozenset({"mm.out"})),
    # D > 128 ("cublas"): GEMMs on cuBLAS, every element-wise chain in a Triton kernel
    Case("cross_net, D=136, 2 layers", _cross_net(136, 2), {"_fr_residual_kernel": 2},
         {"_fr_bwd_eltwise_kernel": 2, SUM_PARTIALS: 1},
         fwd_compute=frozenset({"mm.out"}), bwd_compute=frozenset({"mm.out", "addmm.out"})),
    Case("low_rank_cross_net, D=40, r=4, 2 layers", _low_rank(40, 4, 2), {"_lr_fwd_kernel": 1},
         {"_lr_bwd_rows_kernel": 1, "_lr_bwd_weights_kernel": 1},
         fwd_at_most=("[B, D] tensors (x_i never goes to memory; only the output)", lambda m: is_rows(m, 40), 1),
         bwd_at_most=("[B, D] tensors (only dx0)", lambda m: is_rows(m, 40), 1)),
    # LOW_RANK_BACKWARD = "phases": one launch per layer for dp_i, one for dx0; still no [B, D]
    # (4 layers: 3 would make [L, D, r] a multiple of B * D, which is_rows cannot tell apart)
    # intermediate (the column-split partial sums are [L, S, B, r])
    Case("low_rank_cross_net, phased backward, D=40, r=4, 4 layers", _low_rank(40, 4, 4), {"_lr_fwd_kernel": 1},
         {"_lr_bwd_phase_kernel": 4, "_lr_bwd_dx0_kernel": 1, "_lr_bwd_weights_kernel": 1},
         fwd_at_most=("[B, D] tensors (x_i never goes to memory; only the output)", lambda m: is_rows(m, 40), 1),
         bwd_at_most=("[B, D] tensors (only dx0)", lambda m: is_rows(m, 40), 1),
         settings=(("LOW_RANK_BACKWARD", "phases"),)),
    # LOW_RANK_FORWARD = "phases": one launch per layer for p_i, one for the output; x_i still never
    # goes to memory (the column-split partial sums are [L, S, B, r])
    Case("low_rank_cross_net, phased forward, D=40, r=4, 4 layers", _low_rank(40, 4, 4),
         {"_lr_fwd_phase_kernel": 4, "_lr_fwd_out_kernel": 1}, {"_lr_bwd_rows_kernel": 1, "_lr_bwd_weights_kernel": 1},
         fwd_at_most=("[B, D] tensors (x_i never goes to memory; only the output)", lambda m: is_rows(m, 40), 1),
         bwd_at_most=("[B, D] tensors (only dx0)", lambda m: is_rows(m, 40), 1),
         settings=(("LOW_RANK_FORWARD", "phases"),)),
    Case("dot_interaction", _dot, {"_dot_fwd_kernel": 1}, {"_dot_bwd_kernel": 1},
         never=(f"the {Z_N} x {Z_N} Gram matrix", lambda m: has_adjacent(m.shape, Z_N, Z_N))),
    Case("attention, L=65", _attention(65), {"_attn_fwd_kernel": 1}, {"_attn_bwd_fused_kernel": 1},
         never=_scores(65, 65)),
    Case("attention, packed qkv, L=65", _attention(65, packed=True), {"_attn_fwd_kernel": 1},
         {"_attn_bwd_fused_kernel": 1}, never=_scores(65, 65)),
    # the general backward: delta = rowsum(P * dP) formed in a pass over the keys, by a kernel of its
    # own in fp32, by the dq kernel (which stores it for the dk/dv kernel) in fp16; no scores-sized tensor
    Case("attention, L=129", _attention(129), {"_attn_fwd_kernel": 1},
         {"_attn_bwd_delta_kernel": 1, "_attn_bwd_dkdv_kernel": 1, "_attn_bwd_dq_kernel": 1},
         never=_scores(129, 129)),
    Case("attention, fp16, L=129", _attention(129, dtype=torch.float16), {"_attn_fwd_kernel": 1},
         {"_attn_bwd_dkdv_kernel": 1, "_attn_bwd_dq_kernel": 1}, never=_scores(129, 129)),
    # shared queries: per-sample dq reduced over the batch by one aten sum
    Case("pma, 5 queries, 33 keys", _pma(5, 33), {"_attn_fwd_kernel": 1}, {"_attn_bwd_fused_kernel": 1},
         bwd_compute=frozenset({"sum.dim_IntList"}), never=_scores(5, 33)),
    # k = v = s: the kernel writes ds = dk + dv (no dv, no aten add of the two)
    Case("pma, k and v one tensor", _one_kv(5, 33, True), {"_attn_fwd_kernel": 1}, {"_attn_bwd_fused_kernel": 1},
         bwd_compute=frozenset({"sum.dim_IntList"}), never=_scores(5, 33), bwd_at_most=_kv_sized(33, 1)),
    Case("attention, k and v one tensor, L=129", _one_kv(129, 129, False), {"_attn_fwd_kernel": 1},
         {"_attn_bwd_delta_kernel": 1, "_attn_bwd_dkdv_kernel": 1, "_attn_bwd_dq_kernel": 1},
         never=_scores(129, 129), bwd_at_most=_kv_sized(129, 2)),
    # PMA folded: the fold of the parameters is its own launch, forward and backward; K and V are never
    # formed (no [B, Lk, d] tensor but ds); aten: the output projection on cuBLAS (addmm, and its two
    # mm in the backward), the zeroed rows of empty samples (gt, the mask's cast, mul), and the sums
    # of the shared queries' and the bias's gradients over the batch
    Case("pooled_attention (PMA folded), 5 queries, 33 keys", _pooled(33), {"_pma_fold_kernel": 1, "_attn_fwd_kernel": 1},
         {"_attn_bwd_fused_kernel": 1, "_pma_fold_bwd_kernel": 1},
         fwd_compute=frozenset({"addmm.out", "gt.Scalar", "_to_copy.default", "mul_.Tensor"}),
         bwd_compute=frozenset({"mm.default", "mul.Tensor", "sum.dim_IntList"}),
         never=(f"a {5 * A_H} x 33 score matrix or a boolean key mask (a sample's flag is fine)",
                lambda m: has_adjacent(m.shape, 5 * A_H, 33) or (m.dtype == torch.bool and numel(m) > A_B)),
         fwd_at_most=("[B, Lk, d] tensors (K or V)", lambda m: numel(m) == A_B * 33 * A_H * A_DH, 0),
         bwd_at_most=("[B, Lk, d] tensors (only ds)", lambda m: numel(m) == A_B * 33 * A_H * A_DH, 1)),
    Case("add_layer_norm", _layernorm, {"_ln_fwd_kernel": 1}, {"_ln_bwd_kernel": 1, SUM_PARTIALS: 1}),
    # the hidden activation is recomputed in both backward kernels, never stored
    Case("feed_forward", _feed_forward(), {"_ffn_fwd_kernel": 1},
         {"_ffn_bwd_dx_kernel": 1, "_ffn_bwd_w_kernel": 1, SUM_PARTIALS: 1}, never=_hidden()),
    # under autocast no aten cast (_to_copy) of x or of a parameter, forward or backward: each tile is
    # rounded to fp16 as it is loaded, and every gradient comes back in its input's fp32
    Case("feed_forward, fp16 autocast", _feed_forward(autocast=True), {"_ffn_fwd_kernel": 1},
         {"_ffn_bwd_dx_kernel": 1, "_ffn_bwd_w_kernel": 1, SUM_PARTIALS: 1}, never=_hidden()),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fused_op_launches_and_writes_what_its_docstring_says(case: Case, monkeypatch):
    case.apply(monkeypatch)
    fn, inputs = case.build()
    fwd, bwd, grads = run_phases(fn, inputs)
    # the gradients are allocated in the backward: an empty record saw nothing (on a GPU the
    # backward runs on the autograd engine's thread, which must inherit the dispatch mode)
    assert bwd.new(), "the backward recorded no allocation at all"
    # nothing fresh is larger than all inputs together or the output (the cross nets return each
    # gradient kind stacked over the layers); the forbidden intermediates of the "never" checks are
    # larger at these sizes, so a padded or flattened copy of one is caught here
    with triton_launches(run=False):
        largest = max(sum(t.numel() for t in inputs), fn().numel())
    for name, phase in (("forward", fwd), ("backward", bwd)):
        big = [(m.op, m.shape) for m in phase.new() if numel(m) > largest]
        assert not big, f"{name} wrote tensors larger than its inputs together or its output ({largest} elements): {big}"
    assert fwd.launches == Counter(case.fwd_launches), f"forward launches {dict(fwd.launches)}"
    assert bwd.launches == Counter(case.bwd_launches), f"backward launches {dict(bwd.launches)}"
    for name, phase, allowed in (("forward", fwd, case.fwd_compute), ("backward", bwd, case.bwd_compute)):
        extra = phase.compute_ops() - allowed
        assert not extra, f"{name}: aten ops computing next to the kernels: {sorted(extra)}"
        if case.never is not None:
            what, bad = case.never
            hits = [(m.op, m.shape) for m in phase.new() if bad(m)]
            assert not hits, f"{name} wrote {what}: {hits}"
    for name, phase, limit in (("forward", fwd, case.fwd_at_most), ("backward", bwd, case.bwd_at_most)):
        if limit is not None:
            what, match, n = limit
            hits = [(m.op, m.shape) for m in phase.new() if match(m)]
            assert len(hits) <= n, f"{name} wrote {what} {len(hits)} times: {hits}"
    # every input got its gradient from the backward that was recorded
    assert all(g is not None for g in grads)


def test_the_recorder_sees_what_it_must_reject():
    """The checks above can fail: the eager DOT interaction writes its Gram matrix and computes with
    aten ops, the eager attention its scores and mask, the eager gated LCE Y and the gate, the eager
    feed-forward block its hidden activation (and, under autocast, casts its input and parameters)."""
    from interformer import reference as R

    z = leaf(B, Z_N, Z_D)
    fwd, _, _ = run_phases(lambda: R.dot_interaction(z), [z])
    assert any(has_adjacent(m.shape, Z_N, Z_N) for m in fwd.new()) and "bmm.default" in fwd.compute_ops()
    q, k, v = (leaf(A_B, 33, A_H, A_DH) for _ in range(3))
    fwd, _, _ = run_phases(lambda: R.attention(q, k, v, torch.tensor([0, 29], device=DEVICE), rope_base=1e4), [q, k, v])
    what, bad = _scores(33, 33)
    assert any(bad(m) for m in fwd.new())
    x, w, b, gw, gb = leaf(B, G_NIN, G_D), leaf(G_NIN, G_NOUT), leaf(G_NOUT), leaf(G_D, G_D), leaf(G_D)
    fwd, _, _ = run_phases(lambda: R.gated_lce(x, w, b, gw, gb), [x, w, b, gw, gb])
    assert sum(numel(m) >= B * G_NOUT * G_D for m in fwd.new()) > 1
    x, w1, b1, w2, b2 = leaf(B, F_T, F_K), leaf(F_H, F_K), leaf(F_H), leaf(F_N, F_H), leaf(F_N)
    _, bad = _hidden()
    for autocast in (False, True):
        def ffn():
            with torch.autocast(DEVICE.type, dtype=torch.float16, enabled=autocast):
                return R.feed_forward(x, w1, b1, w2, b2)
        fwd, bwd, _ = run_phases(ffn, [x, w1, b1, w2, b2])
        assert any(bad(m) for m in fwd.new()) and any(bad(m) for m in bwd.new())
        assert ("_to_copy.default" in fwd.compute_ops()) == autocast


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_second_order_gradients_raise_instead_of_dropping_the_op(case: Case, monkeypatch):
    """The fused backwards are first order. Under ``create_graph=True`` their gradients keep their
    values (same code, no_grad) but carry a ``grad_fn`` that raises, naming the op, when a second
    gradient reaches it -- also through ``autograd.grad(inputs=...)``, which prunes every node
    that does not lead to those inputs. Before, the gradients had no ``grad_fn`` and a second-order
    gradient silently left the fused op's part out."""
    case.apply(monkeypatch)
    fn, inputs = case.build()
    with triton_launches(run=False):
        out = fn()
        first = torch.autograd.grad(out.sum(), inputs, create_graph=True, allow_unused=True)
        assert all(g is not None and g.requires_grad for g in first)
        total = sum(g.float().sum() for g in first)
        with pytest.raises(RuntimeError, match="has no second-order gradient"):
            torch.autograd.grad(total, inputs, allow_unused=True)
        # with respect to the incoming gradient (a vector-Jacobian product differentiated in its
        # vector, the double-vjp trick): the first-order gradients depend on it too
        u = torch.ones_like(out).requires_grad_()
        first = torch.autograd.grad(fn(), inputs, u, create_graph=True, allow_unused=True)
        with pytest.raises(RuntimeError, match="has no second-order gradient"):
            torch.autograd.grad(sum(g.float().sum() for g in first), u)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fused_op_is_deterministic(case: Case, monkeypatch):
    """The docstrings' "no atomics, fixed-order reductions": the same inputs give bitwise the same
    output and gradients, run after run (grids sized for an H100, so that partial sums come from
    many programs; under the interpreter programs run in order anyway, the GPU run is the test)."""
    from poison import gpu_sized_grids

    gpu_sized_grids(monkeypatch)
    case.apply(monkeypatch)
    fn, inputs = case.build()
    runs = []
    for _ in range(2):
        out = fn()
        g = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view_as(out)
        runs.append([out.detach(), *torch.autograd.grad(out, inputs, g)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _shapes(tensors) -> list:
    return [None if t is None else (tuple(t.shape), t.dtype, t.device.type) for t in tensors]


# the fp16-autocast case enters torch.autocast on its inputs' device type, which has none for meta
META_CASES = [c for c in CASES if "autocast" not in c.name]


@pytest.mark.parametrize("case", META_CASES, ids=[c.name for c in META_CASES])
def test_fused_op_runs_its_reference_on_meta_tensors(case: Case, monkeypatch):
    """Meta tensors (shapes and dtypes, no data: a model built on the meta device to infer shapes
    or count FLOPs) take the op's eager reference (``_dispatch.reference_only``), as the modules
    already routed them: forward and backward launch nothing and give meta tensors of the shapes
    and dtypes the same call gives on a real device, with CPU autocast on or off (eager's aten ops
    do not autocast meta tensors, and neither does the op). Before 2026-11-29 every public op
    function raised on meta inputs (``torch.is_autocast_enabled("meta")``: autocast has no meta
    device type)."""
    case.apply(monkeypatch)
    fn, inputs = case.build()
    with triton_launches(run=False):  # only the shapes and dtypes are compared
        out = fn()
        expected = _shapes([out, *torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)])
    meta = torch.device("meta")
    monkeypatch.setitem(globals(), "DEVICE", meta)  # where the builders make their tensors
    for autocast in (False, True):
        fn, inputs = case.build()
        assert all(t.is_meta for t in inputs)
        with triton_launches(run=False) as launches, \
                torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = fn()
            got = _shapes([out, *torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)])
        assert not launches, dict(launches)
        assert got == [None if e is None else (e[0], e[1], "meta") for e in expected], (autocast, got, expected)


@pytest.mark.parametrize("forward", ["rows", "phases"])
@pytest.mark.parametrize("backward", ["rows", "phases"])
def test_low_rank_cross_net_keeps_its_projections_in_fp32(forward, backward, monkeypatch):
    """16-bit x0: the projections ``P [L, B, r]`` the forward saves, their gradients ``dP`` and the
    phased kernels' partial sums of either ``[L, S, B, r]`` are fp32 buffers, as the module
    docstring says (every other tensor of the op is in x0's or the parameters' dtype). A mutation
    test (2026-11-29) allocated dP in fp16: at these sizes the 2x-eager rule let it through."""
    monkeypatch.setattr(crossnet, "LOW_RANK_FORWARD", forward)
    monkeypatch.setattr(crossnet, "LOW_RANK_BACKWARD", backward)
    r, L = 4, 4
    fwd, bwd, _ = run_phases(*_low_rank(40, r, L, torch.float16)())
    projections = [(m.op, m.shape, m.dtype) for m in fwd.new() + bwd.new() if m.shape[-2:] == (B, r)]
    assert any(s[0] == L for _, s, _ in projections) and len(projections) >= 2, projections  # P and dP
    assert all(dt == torch.float32 for _, _, dt in projections), projections
