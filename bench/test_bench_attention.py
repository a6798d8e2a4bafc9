"""Attention benchmarks: the Sequence Arch's rotary self-attention and the Cross Arch's PMA pooling.

``test_self_attention`` times ``attention(q, k, v, valid_lengths, rope_base=10000)`` (rotary on q and
k, key padding and query padding from lengths, bidirectional) at the DESIGN §6 shapes, with
``L = n_cls + T`` tokens, ``H = heads``, ``dh = d / heads`` and valid lengths ``n_cls + len`` (len
uniform in ``[0, T]``, one empty and one full row). q, k, v are the non-contiguous views
``qkv.view(B, L, 3, H, dh).unbind(2)`` the module makes; ``qkv`` is the leaf whose gradient is taken.
Providers, each computing the same function:

* ``eager`` -- :func:`interformer.reference.attention`; ``compile`` -- ``torch.compile`` of it;
* ``sdpa-math`` / ``sdpa-efficient`` / ``sdpa-flash`` / ``sdpa-cudnn`` -- the pipeline a user writes
  around ``F.scaled_dot_product_attention`` under ``sdpa_kernel(<backend>)``: the reference's
  rotary on q and k (its cos/sin table built once and cached, see ``_rotary``), transposes to
  ``[B, H, L, dh]``, a boolean key-padding mask ``[B, 1, 1, L]`` built from lengths (an empty row
  keeps key 0 visible so SDPA returns no NaN), SDPA, transpose back and zero the padded query rows.
  A backend that rejects this call (flash takes no arbitrary mask) is recorded as a skip with the
  error as reason;
* ``flex`` -- ``torch.compile(flex_attention)`` with a ``mask_mod`` from lengths (key AND query
  padding, so fully padded blocks are skipped) and the reference's rotary (cached table) applied
  separately; the block mask is rebuilt inside the timed forward (compiled builder), as it must be
  for every new batch of lengths;
* ``flash_attn`` -- ``flash_attn_varlen_func`` on the unpadded tokens (rotary separately, gather
  before and scatter after are timed; ``cu_seqlens`` and the gather index are built outside the timed
  region, as a data loader would) when the ``flash_attn`` package imports;
* ``fused`` -- :func:`interformer.kernels.attention.attention`;
* ``fused-delta-output`` (and its ``-cudagraph``) -- ``bwd`` and ``full`` only, for ``test_pma`` too:
  the fused function with ``BACKWARD_DELTA = "output"`` (the backward's delta from the stored
  output, flash attention's form, instead of the default's pass over the key blocks; the kernel
  module's docstring, "Backward"): what the pass costs where keys span more than one block
  (self-attention at amazon and long, PMA at long; elsewhere the two rows run the same kernels).
* ``fused-general`` (and its ``-cudagraph``) -- self-attention, ``bwd`` and ``full`` only: the fused
  function with every backward on the general path (``_FUSED_BWD_MAX_LQ = 0``: a dq kernel over
  query blocks, then a dk/dv kernel over key blocks), where the default takes one program per
  (b, h) for up to 128 queries. At amazon (104 queries, dh 16) that program is one 8-warp program an
  SM (171 registers, sm_90) over 8192 (b, h): in the compiled amazon training step of the H200
  lease of 2026-11-28b it took 430 us a launch, many times its memory floor; the general path
  launches two kernels of twice as many 4-warp programs, each on 64 rows. sm_90 builds with
  Triton 3.9 at amazon (bf16, dh 16, ``interformer.kernel_audit``): the default 174 registers, one
  program an SM, 62 waves; the general dq kernel 127 (four an SM, 31 waves), its dk/dv kernel 169
  (two an SM, 62 waves), none spilling.
* ``fused-narrow`` (and its ``-cudagraph``) -- self-attention, ``bwd`` and ``full`` only: the
  single-query-block backward on 16-key tiles at 4 warps (``FUSED_BWD_TILE = (16, 4)``; at amazon
  134 registers, three programs an SM, against the default's one), the other candidate for that
  launch. Where the keys fit the default's tile but not 16 (taobao's 64), the narrow tile also
  moves delta to a pass of its own: there the row times both.

FLOPs count only valid work: ``4 * H * dh * sum_b n_b^2`` for the forward (QK^T and PV over the
``n_b = valid_length_b`` live queries and keys), 2x that for the backward (dV = P^T dO, dP = dO V^T,
dQ = dS K, dK = dS^T Q), 3x for ``full``; padded rows and columns are not counted (they are about
2/3 of the dense ``L x L`` work at these length distributions; DESIGN's "long attention ~330 us"
counts the dense work). The backward's recomputation of ``QK^T`` (the FlashAttention papers count
the backward as 2.5x the forward) is the kernel's choice, not the op's work: it is not counted, as
no other op's benchmark counts its recomputation. Bytes, each tensor read or written once: forward
q, k, v read and O written; backward q, k, v and dO read and dq, dk, dv written (O and the
log-sum-exp a flash-style backward reads are saved activations, not inputs of the op's gradient:
not counted, as no other op's benchmark counts reading its output in the backward); ``full`` both.

``test_pma`` times the whole ``PoolingMultiHeadAttention`` module (``n_pma = 2`` learned queries over
the ``T`` body tokens: k/v projections, attention, output projection) with ``backend="eager"``,
``torch.compile`` of the eager module, ``backend="triton"`` (``fused``), against
``torch.nn.MultiheadAttention(batch_first=True)`` with a ``key_padding_mask`` from lengths (the learned
queries expanded over the batch; an empty row keeps key 0 so no NaN; rows of empty samples zeroed),
which is what a user would otherwise write. Bytes (:func:`pma_bytes`): forward the sequence and
parameters read and the pooled tokens written once; backward the sequence, parameters and upstream
gradient read and their gradients written (no FLOP count: the fused op folds the K projection into
the queries and the V projection into the output one, and the work left, ``~4 B T d n_pma``, is far below the bytes' time at every shape).

CUDA-graph variants (``<provider>-cudagraph``, ``full`` mode only; see bench/common.py): the same
callable captured once and replayed, which times the device alone. Self-attention graphs ``eager``,
the two SDPA backends that take a mask on every GPU (``sdpa-efficient``, ``sdpa-cudnn``), ``fused``
``fused-delta-output``, ``fused-general`` and ``fused-narrow``; PMA graphs ``nn.MultiheadAttention``, ``fused`` and
``fused-delta-output``.

Without a GPU only ``eager``, ``fused`` and the setting variants (``fused-delta-output``,
``fused-general``, ``fused-narrow``) run, on the tiny smoke shape,
under the Triton interpreter; every other provider is skipped with its reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import common
from interformer import reference as R
from interformer.layers import PoolingMultiHeadAttention

BASE = 10000.0
SELF_PROVIDERS = ["eager", "compile", "compile-max-autotune", "sdpa-math", "sdpa-efficient", "sdpa-flash", "sdpa-cudnn", "flex",
                  "flash_attn", "fused", "fused-delta-output", "eager-cudagraph", "compile-cudagraph",
                  "sdpa-efficient-cudagraph", "sdpa-cudnn-cudagraph", "fused-cudagraph", "fused-delta-output-cudagraph",
                  "fused-general", "fused-general-cudagraph", "fused-narrow", "fused-narrow-cudagraph"]
#: setting variants of the fused self-attention and PMA (provider, and its -cudagraph): the settings
#: of interformer.kernels.attention they run with; each changes the backward only
SETTINGS = {"fused-delta-output": {"BACKWARD_DELTA": "output"}, "fused-general": {"_FUSED_BWD_MAX_LQ": 0},
            "fused-narrow": {"FUSED_BWD_TILE": (16, 4)}}
PMA_PROVIDERS = ["eager", "compile", "compile-max-autotune", "nn.MultiheadAttention", "fused", "fused-delta-output",
                 "eager-cudagraph", "compile-cudagraph", "nn.MultiheadAttention-cudagraph", "fused-cudagraph",
                 "fused-delta-output-cudagraph"]  # eager-cudagraph: the graphed rows' baseline (bench/report.py)


def _fused_attention():
    from interformer.kernels.attention import attention

    return attention


def _skip_unsupported(provider: str, mode: str, shape_name: str) -> None:
    if provider == "flash_attn" and common.flash_attn_version() == "absent":
        pytest.skip("flash_attn not installed (an optional provider; bench/report.py notes its absence)")
    common.skip_unless_runnable(provider, mode, shape_name=shape_name)


def _skip_or_apply(provider: str, mode: str, shape_name: str, monkeypatch) -> None:
    """Skip what this machine, mode or shape does not run; for a setting variant (:data:`SETTINGS`),
    which runs on a CPU too and changes the backward only, apply its settings (not in ``fwd``
    mode, where it would time the default's forward again)."""
    settings = SETTINGS.get(common.base_provider(provider))
    if settings is None:
        _skip_unsupported(provider, mode, shape_name)
        return
    common.skip_unless_runnable(provider, mode, cpu_providers=(*common.CPU_PROVIDERS, *SETTINGS),
                                shape_name=shape_name)
    import interformer.kernels.attention as kernel

    common.apply_setting_variant(monkeypatch, kernel, SETTINGS, provider, mode)


def _try(fn, provider: str):
    """Run ``fn`` once; a provider that runs out of memory becomes a skip, and so does an outside
    implementation (SDPA's backends, flex, flash_attn, Inductor, ``nn.MultiheadAttention``) that
    rejects the call. An error of this package's fused path or of its eager reference is a failure
    (it was a skip too until 2026-11-29, so a kernel fault on a GPU showed only as a missing
    column: a review's find)."""
    try:
        fn()
    except torch.OutOfMemoryError as exc:
        if common.ON_GPU:
            torch.cuda.empty_cache()
        pytest.skip(f"{provider}: out of memory ({str(exc).splitlines()[0]})")
    except RuntimeError as exc:
        base = common.base_provider(provider)
        if base == "eager" or base.startswith("fused"):
            raise
        pytest.skip(f"{provider}: unsupported here ({str(exc).splitlines()[0][:200]})")


# ----------------------------------------------------------------------------- self-attention providers
_SDPA_BACKENDS = {
    "sdpa-math": "MATH",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}


_ROPE_TABLES: dict = {}


def _rotary(x: torch.Tensor) -> torch.Tensor:
    """The reference's rotary with its cos/sin table built once per (L, dh, dtype, device) and reused,
    as a user's pipeline would (rebuilding it cost the SDPA, Flex and flash-attn baselines about 24
    extra launches per forward that the fused kernel, which caches its table, does not pay)."""
    key = (x.shape[1], x.shape[-1], x.dtype, x.device)
    if key not in _ROPE_TABLES:
        _ROPE_TABLES[key] = R.rotary_table(x.shape[1], x.shape[-1], BASE, x.dtype, x.device)
    return R.apply_rotary(x, *_ROPE_TABLES[key])


def _sdpa_pipeline(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def fn(q, k, v, lengths):
        L = k.shape[1]
        q, k = _rotary(q), _rotary(k)
        key_mask = R.row_mask(lengths.clamp(min=1), L)[:, None, None, :]
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=key_mask)
        return o.transpose(1, 2) * R.row_mask(lengths, L)[:, :, None, None].to(o.dtype)

    return fn


def _flex_pipeline(batch_lengths: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    # one mask_mod object (a new closure per call would make the compiled block-mask builder recompile)
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < batch_lengths[b]) & (q_idx < batch_lengths[b])

    def fn(q, k, v, lengths):
        assert lengths is batch_lengths
        B, L = k.shape[0], k.shape[1]
        try:
            block_mask = create_block_mask(mask_mod, B, None, L, L, device=k.device, _compile=True)
        except TypeError:  # newer torch without the _compile flag
            block_mask = create_block_mask(mask_mod, B, None, L, L, device=k.device)
        q, k = _rotary(q), _rotary(k)
        o = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return o.transpose(1, 2)

    return fn


def _flash_attn_pipeline(lengths: torch.Tensor, L: int):
    from flash_attn import flash_attn_varlen_func

    B = lengths.shape[0]
    idx = torch.nonzero(R.row_mask(lengths, L).flatten()).flatten()
    cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)

    def fn(q, k, v, lengths):
        H, dh = k.shape[2], k.shape[3]
        q, k = _rotary(q), _rotary(k)
        qu, ku, vu = (t.reshape(B * L, H, dh).index_select(0, idx) for t in (q, k, v))
        o = flash_attn_varlen_func(qu, ku, vu, cu, cu, L, L)
        return torch.zeros(B * L, H, dh, device=o.device, dtype=o.dtype).index_copy(0, idx, o).view(B, L, H, dh)

    return fn


def _self_attention_fn(provider: str, lengths: torch.Tensor, L: int):
    if provider == "eager":
        return lambda q, k, v, n: R.attention(q, k, v, n, rope_base=BASE)
    options = common.compile_options(provider)
    if options is not None:
        compiled = torch.compile(R.attention, dynamic=False, **options)
        return lambda q, k, v, n: compiled(q, k, v, n, rope_base=BASE)
    if provider == "fused" or provider in SETTINGS:
        fused = _fused_attention()
        return lambda q, k, v, n: fused(q, k, v, n, rope_base=BASE)
    if provider in _SDPA_BACKENDS:
        return _sdpa_pipeline(_SDPA_BACKENDS[provider])
    if provider == "flex":
        return _flex_pipeline(lengths)
    if provider == "flash_attn":
        return _flash_attn_pipeline(lengths, L)
    raise ValueError(provider)


def attention_flops(lengths: torch.Tensor, H: int, dh: int, mode: str) -> float:
    """Valid-work FLOPs: ``4 * H * dh * sum_b n_b^2`` forward; x2 backward (four matmuls, no
    recomputation); x3 forward+backward."""
    fwd = 4.0 * H * dh * float((lengths.double() ** 2).sum())
    return fwd * {"fwd": 1.0, "bwd": 2.0, "full": 3.0}[mode]


def attention_bytes(B: int, L: int, H: int, dh: int, elt: int, mode: str) -> float:
    """q, k, v read and O written once forward; q, k, v, dO read and dq, dk, dv written backward."""
    n = B * L * H * dh * elt
    return n * {"fwd": 4, "bwd": 7, "full": 11}[mode]


@pytest.mark.parametrize("provider", SELF_PROVIDERS)
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("shape_name", common.SHAPE_NAMES)
def test_self_attention(benchmark, monkeypatch, shape_name, mode, provider):
    _skip_or_apply(provider, mode, shape_name, monkeypatch)
    shape = common.ALL_SHAPES[shape_name]
    B, L, H, dh = shape.B, shape.L, shape.heads, shape.head_dim
    g = torch.Generator().manual_seed(0)
    lengths = common.lengths_for(shape, g) + shape.n_cls  # valid tokens: CLS + events
    qkv = torch.randn(B, L, 3, H, dh, generator=g).to(common.DEVICE, common.DTYPE).requires_grad_()
    attn = _self_attention_fn(common.base_provider(provider), lengths, L)

    def forward():
        q, k, v = qkv.unbind(2)
        return attn(q, k, v, lengths)

    _try(forward if mode == "fwd" else (lambda: forward().sum().backward()), provider)
    qkv.grad = None
    fn = common.mode_fn(forward, mode, [qkv])
    common.run(benchmark, fn, op="attention", shape=shape, provider=provider, mode=mode,
               flops=attention_flops(lengths, H, dh, mode),
               bytes_moved=attention_bytes(B, L, H, dh, qkv.element_size(), mode))


# ----------------------------------------------------------------------------- PMA
class MHAPooling(torch.nn.Module):
    """PMA as a user writes it with ``nn.MultiheadAttention`` and a key padding mask."""

    def __init__(self, num_queries: int, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(num_queries, d_model) / d_model ** 0.5)
        self.mha = torch.nn.MultiheadAttention(d_model, num_heads, batch_first=True)

    def forward(self, s: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, _ = s.shape
        pad = ~R.row_mask(lengths.clamp(min=1), T)  # True = ignore; an empty row keeps key 0 (no NaN)
        q = self.query.to(s.dtype).expand(B, -1, -1)
        out = self.mha(q, s, s, key_padding_mask=pad, need_weights=False)[0]
        return out * (lengths > 0).to(out.dtype)[:, None, None]


@pytest.mark.parametrize("provider", PMA_PROVIDERS)
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("shape_name", common.SHAPE_NAMES)
def test_pma(benchmark, monkeypatch, shape_name, mode, provider):
    _skip_or_apply(provider, mode, shape_name, monkeypatch)
    impl = "fused" if common.base_provider(provider) in SETTINGS else common.base_provider(provider)
    shape = common.ALL_SHAPES[shape_name]
    B, T, d = shape.B, shape.T, shape.d
    g = torch.Generator().manual_seed(0)
    lengths = common.lengths_for(shape, g)
    s = torch.randn(B, T, d, generator=g).to(common.DEVICE, common.DTYPE).requires_grad_()
    torch.manual_seed(0)
    if impl == "nn.MultiheadAttention":
        module = MHAPooling(shape.n_pma, d, shape.heads)
    else:
        module = PoolingMultiHeadAttention(shape.n_pma, d, shape.heads,
                                           backend="triton" if impl == "fused" else "eager")
    module = module.to(common.DEVICE, common.DTYPE)
    options = common.compile_options(impl)
    call = module if options is None else torch.compile(module, dynamic=False, **options)

    def forward():
        return call(s, lengths)

    _try(forward if mode == "fwd" else (lambda: forward().sum().backward()), provider)
    leaves = [s, *module.parameters()]
    for t in leaves:
        t.grad = None
    fn = common.mode_fn(forward, mode, leaves)
    common.run(benchmark, fn, op="pma", shape=shape, provider=provider, mode=mode,
               bytes_moved=pma_bytes(B, T, d, shape.n_pma, s.element_size(), mode))


def pma_bytes(B: int, T: int, d: int, n_pma: int, elt: int, mode: str) -> float:
    """Each tensor read or written once: forward reads s ``[B, T, d]`` and the parameters (query
    ``[n_pma, d]``, the K, V and O projections' ``[d, d]`` weights and ``[d]`` biases) and writes the
    pooled ``[B, n_pma, d]``; backward reads s, the parameters and the upstream gradient
    ``[B, n_pma, d]`` and writes ds and the parameters' gradients; ``full`` both."""
    seq, pooled, params = B * T * d, B * n_pma * d, n_pma * d + 3 * (d * d + d)
    fwd = (seq + params + pooled) * elt
    bwd = (2 * seq + 2 * params + pooled) * elt
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]
