"""Element offsets past 2**31: the kernels read their inputs and upstream gradients in int64 where
an offset can overflow.

A kernel that forms ``b * stride_b`` in int32 reads the wrong memory once a tensor is big enough
(``[B, D]`` activations past 2**31 elements: B = 262144 at D = 9216 in serving). Allocating such a
tensor and running the kernels over all of it is out of reach here (the interpreter), so each
case gives the op its inputs, and the upstream gradient, as views whose *batch stride* is
``2**30 + a little``: sample 2 then starts past element 2**31 while the data stays tiny. The views
share one storage of about 4 GiB (fp16): on a CPU lazily allocated address space of which a few
pages are touched, on a GPU real memory (the child holds two such, input and gradient). A
launcher hands those strides to its kernels as they are, so an int32 product there wraps around:

* under ``TRITON_INTERPRET=1`` (numpy int32 arithmetic) to an address outside the tensor, which
  the access check below reports (unchecked, it crashes the process), or into another sample's rows;
* on a GPU, the same, in the compiled kernel.

Each case therefore runs in a child process (a crash fails that case only, with its op named) and
checks the forward and every input gradient against the same op on contiguous copies of the same
values. Under the interpreter the child checks every access (:mod:`memcheck`), so a wrapped offset
fails there naming the kernel and the distance (removing the DOT forward's ``.to(tl.int64)``: a
load 2**32 - 256 bytes before z's view); on a GPU it crashes or reads the wrong sample.

What this does not reach: the outputs, gradients and scratch buffers the launchers allocate stay
small and contiguous, so their offsets are checked only by reading the kernels. The cases cover
every kernel of the ops' usual paths, attention's long-sequence backward (Lq > 128) included;
the full-rank cross net's wide-layer kernels take contiguous copies (below).

The ``*_rows`` cases do the same with the rows (dim 1, tokens) of each sample ``2**30 + a little``
elements apart (``far_rows``: a time-major buffer seen batch-major): the offsets inside one
sample, which the kernels form in int32, would pass 2**31 at row 2; PFFN, DOT and attention (q, k,
v and the upstream gradient; a review found its rows unguarded, 2026-11-29) then copy the view
(``int32_block`` with one sample), the gated LCE and LayerNorm already did; the feed-forward block
copies nothing (its kernels form every row's offset in int64).

Where a launcher copies instead, a case checks that copy rather than the kernels' arithmetic:
the cross nets take x0 and the gradient as contiguous rows, and the gated LCE, whose blocks of
several samples use int32 offsets inside the block, copies a view whose block would span 2**31
elements (``kernels._common.int32_block``; its ``wide`` case has one sample per block, no copy).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
#: batch stride of the far-apart views, in elements: sample 2 starts past 2**31
FAR = 2**30 + 64
CASES = ["dot_interaction", "gated_lce", "gated_lce_wide", "pffn_mlp", "pffn_linear", "attention_self", "attention_long", "attention_shared_query",
         "add_layer_norm", "low_rank_cross_net", "cross_net", "feed_forward"]
#: the same ops given views whose rows (dim 1: tokens) lie FAR apart, so that row 2 of every
#: sample starts past 2**31 (a time-major buffer seen batch-major has such strides): the offsets
#: inside one sample, which the kernels form in int32, would overflow; the launchers copy such views
ROW_CASES = ["dot_interaction_rows", "pffn_mlp_rows", "pffn_linear_rows", "gated_lce_rows", "add_layer_norm_rows",
             "feed_forward_rows", "attention_rows"]
#: an op given feature-major views (the last dimension's stride FAR: column 2 past 2**31), input and
#: upstream gradient; the feed-forward kernels read x and dy through their strides, columns in int64
COL_CASES = ["feed_forward_cols"]


def _far(dim: int, *tensors: torch.Tensor):
    """Copies of ``tensors`` (the same sizes up to ``dim``) as views whose stride along ``dim`` is
    :data:`FAR`, in one storage: index i along ``dim`` of every tensor sits past ``i * FAR``
    elements (past 2**31 from i = 2), the other dims of all tensors packed below FAR."""
    n = tensors[0].shape[dim]
    sizes = [t.select(dim, 0).numel() for t in tensors]
    assert all(t.shape[:dim + 1] == tensors[0].shape[:dim + 1] for t in tensors) and sum(sizes) <= FAR
    store = torch.empty(FAR * (n - 1) + sum(sizes), dtype=tensors[0].dtype, device=tensors[0].device)
    views, offset = [], 0
    for t, size in zip(tensors, sizes):
        strides = list(t.select(dim, 0).contiguous().stride())  # the other dims packed
        strides.insert(dim, FAR)
        v = store.as_strided(t.shape, strides, offset)
        v.copy_(t)
        views.append(v)
        offset += size
    assert views[0].stride(dim) * (n - 1) >= 2**31
    return views


def far_apart(*tensors: torch.Tensor):
    """Copies of ``tensors`` (each ``[B, ...]``, the same B) as views with batch stride :data:`FAR`
    into one storage: sample b of every tensor sits at ``b * FAR`` elements, past 2**31 from b = 2."""
    return _far(0, *tensors)


def far_rows(*tensors: torch.Tensor):
    """Copies of ``tensors`` (each ``[B, R, ...]``, the same B and R <= 3) as views whose dim-1 stride
    is :data:`FAR`, in one storage: row r of every sample sits past ``r * FAR`` elements (row 2
    past 2**31), the samples and the other dims packed below FAR."""
    assert tensors[0].shape[1] <= 3
    return _far(1, *tensors)


def _inputs(case: str, device):
    """``(fn, far, near, grad_index)``: the op, its argument list with the batch tensors far apart,
    the same arguments contiguous, and which arguments get gradients."""
    from interformer.kernels import attention, crossnet, dot_interaction, feed_forward, gated_lce, layernorm, pffn

    g = torch.Generator().manual_seed(0)
    dt = torch.float16

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dt)

    B = 3
    lengths = torch.tensor([5, 0, 3], device=device)
    if case == "feed_forward_cols":  # three features, FAR apart
        x, rest = r(B, 2, 3), [r(40, 3, scale=0.3), r(40), r(3, 40, scale=0.2), r(3)]
        return feed_forward.feed_forward, _far(2, x) + [t.clone() for t in rest], [x.clone()] + rest, [0, 1, 2, 3, 4]
    if case in ROW_CASES:  # three rows a sample: row 2 past 2**31
        row_lengths = torch.tensor([3, 0, 2], device=device)
        if case == "dot_interaction_rows":
            fn, batch, rest, grads = dot_interaction.dot_interaction, [r(B, 3, 8)], [], [0]
        elif case == "pffn_mlp_rows":
            fn = lambda s, w_b, *p: pffn.pffn_mlp(s, row_lengths, w_b, *p, 1e-5)  # noqa: E731
            batch, rest, grads = [r(B, 3, 8)], [r(B, 8, 8, scale=0.3), r(8), r(8)], [0, 1, 2, 3]
        elif case == "pffn_linear_rows":
            fn = lambda s, x_sum, *p: pffn.pffn_linear(s, row_lengths, x_sum, *p, 1e-5)  # noqa: E731
            batch, rest, grads = [r(B, 3, 8)], [r(B, 2, 8, scale=0.5), r(2, 8, scale=0.5), r(8), r(8)], [0, 1, 2, 3, 4]
        elif case == "gated_lce_rows":
            fn, batch = gated_lce.gated_lce, [r(B, 3, 8)]
            rest, grads = [r(3, 3, scale=0.5), r(3), r(8, 8, scale=0.3), r(8)], [0, 1, 2, 3, 4]
        elif case == "attention_rows":  # q, k, v and the upstream gradient time-major
            fn = lambda q, k, v: attention.attention(q, k, v, row_lengths, causal=True, rope_base=10000.0)  # noqa: E731
            batch, rest, grads = [r(B, 3, 2, 16), r(B, 3, 2, 16), r(B, 3, 2, 16)], [], [0, 1, 2]
        elif case == "feed_forward_rows":  # no copy: the kernels take every row's offset in int64
            fn, batch = feed_forward.feed_forward, [r(B, 3, 8)]
            rest, grads = [r(40, 8, scale=0.3), r(40), r(8, 40, scale=0.2), r(8)], [0, 1, 2, 3, 4]
        else:
            fn = lambda x, res, w, b: layernorm.add_layer_norm(x, res, w, b, 1e-5)  # noqa: E731
            batch, rest, grads = [r(B, 3, 8), r(B, 3, 8)], [r(8), r(8)], [0, 1, 2, 3]
        return fn, far_rows(*batch) + [t.clone() for t in rest], [t.clone() for t in batch] + rest, grads
    if case == "dot_interaction":
        fn, batch, rest, grads = dot_interaction.dot_interaction, [r(B, 5, 8)], [], [0]
    elif case == "gated_lce":
        fn, batch = gated_lce.gated_lce, [r(B, 4, 8)]
        rest, grads = [r(4, 3, scale=0.5), r(3), r(8, 8, scale=0.3), r(8)], [0, 1, 2, 3, 4]
    elif case == "gated_lce_wide":  # one sample per block (n_in = d = 128): no copy, the kernels' own offsets
        fn, batch = gated_lce.gated_lce, [r(B, 128, 128, scale=0.2)]
        rest, grads = [r(128, 2, scale=0.1), r(2), r(128, 128, scale=0.1), r(128)], [0, 1, 2, 3, 4]
    elif case == "pffn_mlp":
        fn = lambda s, w_b, *p: pffn.pffn_mlp(s, lengths, w_b, *p, 1e-5)  # noqa: E731
        batch, rest, grads = [r(B, 5, 8), r(B, 8, 8, scale=0.3)], [r(8), r(8)], [0, 1, 2, 3]
    elif case == "pffn_linear":
        fn = lambda s, x_sum, *p: pffn.pffn_linear(s, lengths, x_sum, *p, 1e-5)  # noqa: E731
        batch, rest, grads = [r(B, 5, 8), r(B, 2, 8, scale=0.5)], [r(2, 8, scale=0.5), r(8), r(8)], [0, 1, 2, 3, 4]
    elif case == "attention_self":
        fn = lambda q, k, v: attention.attention(q, k, v, lengths, causal=False, rope_base=10000.0)  # noqa: E731
        batch, rest, grads = [r(B, 5, 2, 16), r(B, 5, 2, 16), r(B, 5, 2, 16)], [], [0, 1, 2]
    elif case == "attention_long":  # Lq > 128: the general backward (dq with its delta pass, dk/dv)
        long_lengths = torch.tensor([129, 0, 77], device=device)
        fn = lambda q, k, v: attention.attention(q, k, v, long_lengths, causal=True, rope_base=10000.0)  # noqa: E731
        batch, rest, grads = [r(B, 129, 1, 16), r(B, 129, 1, 16), r(B, 129, 1, 16)], [], [0, 1, 2]
    elif case == "attention_shared_query":
        q = r(1, 2, 2, 16)
        fn = lambda k, v, q: attention.attention(q, k, v, lengths, rope_base=None, rope_q=False,  # noqa: E731
                                                 mask_queries=False)
        batch, rest, grads = [r(B, 5, 2, 16), r(B, 5, 2, 16)], [q], [0, 1, 2]
    elif case == "add_layer_norm":
        fn = lambda x, res, w, b: layernorm.add_layer_norm(x, res, w, b, 1e-5)  # noqa: E731
        batch, rest, grads = [r(B, 24), r(B, 24)], [r(24), r(24)], [0, 1, 2, 3]
    elif case == "low_rank_cross_net":
        fn = lambda x0, *p: crossnet.low_rank_cross_net(x0, p[0:2], p[2:4], p[4:6])  # noqa: E731
        batch = [r(B, 24)]
        rest = [r(24, 4, scale=0.3), r(24, 4, scale=0.3), r(4, 24, scale=0.3), r(4, 24, scale=0.3), r(24, 1), r(24, 1)]
        grads = list(range(7))
    elif case == "cross_net":
        fn = lambda x0, *p: crossnet.cross_net(x0, p[0:2], p[2:4])  # noqa: E731
        batch, rest, grads = [r(B, 24)], [r(24, 24, scale=0.2), r(24, 24, scale=0.2), r(24, 1), r(24, 1)], list(range(5))
    elif case == "feed_forward":  # x read through its strides as [R1, R2, K] (no copy); H = 40: two hidden chunks
        fn, batch = feed_forward.feed_forward, [r(B, 5, 8)]
        rest, grads = [r(40, 8, scale=0.3), r(40), r(8, 40, scale=0.2), r(8)], [0, 1, 2, 3, 4]
    else:
        raise ValueError(case)
    near = [t.clone() for t in batch] + rest
    far = far_apart(*batch) + [t.clone() for t in rest]
    return fn, far, near, grads


def run_case(case: str) -> None:
    """The child process: the op on far-apart views against the op on contiguous copies."""
    sys.path.insert(0, str(HERE))
    from contextlib import nullcontext

    from memcheck import checked_accesses
    from utils import assert_rel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fn, far, near, grads = _inputs(case, device)
    results = []
    # under the interpreter an access outside the views raises, naming the kernel, before it can crash
    checked = checked_accesses() if os.environ.get("TRITON_INTERPRET") == "1" else nullcontext()
    with checked:
        for args, far_grad in ((near, False), (far, True)):
            args = [a.detach().requires_grad_(i in grads) for i, a in enumerate(args)]
            out = fn(*args)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
            if far_grad:  # the upstream gradient far apart too (a backward reads it through its strides)
                if case in COL_CASES:
                    (g,) = _far(g.dim() - 1, g)
                else:
                    (g,) = far_rows(g) if case in ROW_CASES and g.dim() >= 2 and g.shape[1] == 3 else far_apart(g)
            d = torch.autograd.grad(out, [args[i] for i in grads], g)
            results.append((out, d))
    (out_n, d_n), (out_f, d_f) = results
    # near against far: the same values through other strides (or a copy), so a wrapped offset reads
    # other memory, errors of order 1; 1e-3 leaves room for a plan that sums in another order
    assert_rel(out_f, out_n, 1e-3, f"{case}: output")
    for i, a, b in zip(grads, d_f, d_n):
        assert_rel(a, b, 1e-3, f"{case}: gradient of argument {i}")
    print(f"{case}: ok")


@pytest.mark.parametrize("case", CASES + ROW_CASES + COL_CASES)
def test_offsets_past_two_to_the_31(case):
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True, timeout=300)
    log = (proc.stdout + proc.stderr)[-3000:]
    if proc.returncode < 0:
        pytest.fail(f"{case}: the child crashed with {signal.Signals(-proc.returncode).name}: a kernel "
                    f"addressed memory outside its tensors (an int32 offset overflow?)\n{log}")
    assert proc.returncode == 0 and f"{case}: ok" in proc.stdout, log



def test_int32_block_copies_only_views_whose_block_spans_two_to_the_31():
    """The launcher-side guard: a contiguous tensor and a view whose block stays below 2**31 pass
    through (no copy); a view whose block of samples would span 2**31 elements is copied."""
    from interformer.kernels._common import int32_block

    t = torch.zeros(6, 4, 8)
    assert int32_block(t, 4) is t
    store = torch.empty(FAR * 3 + 32, dtype=torch.uint8)  # 3 GiB of address space, no page touched
    far = store.as_strided((4, 4, 8), (FAR, 8, 1))
    assert int32_block(far, 1) is far          # one sample per block: its offsets stay small
    two = far[:2]
    assert int32_block(two, 2) is two           # FAR + one sample < 2**31
    copy = int32_block(far, 3)                 # samples 0..2 of a block span 2 * FAR > 2**31
    assert copy.is_contiguous() and copy.data_ptr() != far.data_ptr()


if __name__ == "__main__":
    run_case(sys.argv[1])
