"""Bad input raises ValueError naming the tensor (DESIGN §2); config validation; backend resolution.

Every bad batch goes through the model's forward (``validate_inputs=True``, the default), and the
message must start with the offending tensor's name.
"""

from __future__ import annotations

import pytest
import torch

import interformer
from interformer import InterFormerConfig, InterFormerCTR
from interformer.backend import FusedModule, resolve

CFG = dict(d_model=8, num_heads=2, num_layers=1, n_dense=3, sparse_vocab_sizes=(10, 5), seq_vocab_sizes=(7, 4),
           max_seq_len=5, pffn_hidden=8, head=(8,), dcn_rank=2, backend="eager")


@pytest.fixture(scope="module")
def model():
    return InterFormerCTR(InterFormerConfig(**CFG))


def good_batch(B=3, T=5):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(B, 3, generator=g)
    sparse = torch.stack([torch.randint(0, 10, (B,), generator=g), torch.randint(0, 5, (B,), generator=g)], 1)
    lengths = torch.tensor([0, T, 2])[:B]
    seq = torch.stack([torch.randint(1, 7, (B, T), generator=g), torch.randint(1, 4, (B, T), generator=g)], 1)
    seq = seq * (torch.arange(T)[None, None, :] < lengths[:, None, None])
    return dict(dense=dense, sparse=sparse, seq=seq, lengths=lengths)


def test_good_batch_runs(model):
    out = model(**good_batch())
    assert out.shape == (3,) and torch.isfinite(out).all()


def _with(**changes):
    b = good_batch()
    b.update(changes)
    return b


def _nan_dense():
    d = good_batch()["dense"].clone()
    d[1, 2] = float("nan")
    return d


def _set(name, idx, value):
    t = good_batch()[name].clone()
    t[idx] = value
    return t


BAD = {
    # wrong rank
    "dense rank 1": ("dense", lambda: _with(dense=torch.randn(3))),
    "dense rank 3": ("dense", lambda: _with(dense=torch.randn(3, 3, 1))),
    "sparse rank 1": ("sparse", lambda: _with(sparse=torch.zeros(3, dtype=torch.int64))),
    "seq rank 2": ("seq", lambda: _with(seq=torch.zeros(3, 5, dtype=torch.int64))),
    "seq rank 4": ("seq", lambda: _with(seq=torch.zeros(3, 2, 5, 1, dtype=torch.int64))),
    "lengths rank 2": ("lengths", lambda: _with(lengths=torch.zeros(3, 1, dtype=torch.int64))),
    # wrong dtype
    "dense int64": ("dense", lambda: _with(dense=torch.zeros(3, 3, dtype=torch.int64))),
    "sparse int32": ("sparse", lambda: _with(sparse=good_batch()["sparse"].int())),
    "sparse float": ("sparse", lambda: _with(sparse=good_batch()["sparse"].float())),
    "seq int32": ("seq", lambda: _with(seq=good_batch()["seq"].int())),
    "lengths int32": ("lengths", lambda: _with(lengths=good_batch()["lengths"].int())),
    "lengths float": ("lengths", lambda: _with(lengths=good_batch()["lengths"].float())),
    # wrong shape
    "dense columns": ("dense", lambda: _with(dense=torch.randn(3, 4))),
    "sparse fields": ("sparse", lambda: _with(sparse=torch.zeros(3, 3, dtype=torch.int64))),
    "seq channels": ("seq", lambda: _with(seq=torch.zeros(3, 3, 5, dtype=torch.int64))),
    "lengths batch": ("lengths", lambda: _with(lengths=torch.zeros(2, dtype=torch.int64))),
    # lengths out of range
    "lengths negative": ("lengths", lambda: _with(lengths=torch.tensor([0, -1, 2]))),
    "lengths above T": ("lengths", lambda: _with(lengths=torch.tensor([0, 6, 2]))),
    # ids out of vocabulary
    "sparse id = vocab": ("sparse", lambda: _with(sparse=_set("sparse", (2, 0), 10))),
    "sparse id > vocab, 2nd field": ("sparse", lambda: _with(sparse=_set("sparse", (0, 1), 9))),
    "sparse id negative": ("sparse", lambda: _with(sparse=_set("sparse", (1, 1), -1))),
    "seq id = vocab": ("seq", lambda: _with(seq=_set("seq", (1, 0, 3), 7))),
    "seq id > vocab, 2nd channel": ("seq", lambda: _with(seq=_set("seq", (1, 1, 0), 100))),
    "seq id negative": ("seq", lambda: _with(seq=_set("seq", (2, 0, 0), -3))),
    # bad values in dense
    "dense NaN": ("dense", lambda: _with(dense=_nan_dense())),
    "dense inf": ("dense", lambda: _with(dense=_set("dense", (0, 0), float("inf")))),
    # not a tensor
    "lengths list": ("lengths", lambda: _with(lengths=[0, 5, 2])),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_naming_the_tensor(model, case):
    name, make = BAD[case]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        model(**make())


def test_seq_id_out_of_vocab_even_at_padding(model):
    """An id >= vocab is invalid anywhere, padded positions included (it would index past the table)."""
    b = good_batch()
    b["seq"][0, 0, 4] = 7  # row 0 has length 0: position 4 is padding
    with pytest.raises(ValueError, match=r"^seq\b"):
        model(**b)


def test_validate_batch_checks_label():
    c = InterFormerConfig(**CFG)
    b = good_batch()
    interformer.validate_batch(c, **b, label=torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"^label\b"):
        interformer.validate_batch(c, **b, label=torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"^label\b"):
        interformer.validate_batch(c, **b, label=torch.tensor([0.0, 1.0]))


def test_dense_is_float32_or_the_model_parameter_dtype(model):
    """float64 dense into an fp32 model: a ValueError naming dense (it was a RuntimeError from the
    matmul). float32 dense, the data contract's dtype, goes into a model of any dtype (cast by the
    dense tokenizer; a half model refused it before), as does dense in the model's own dtype."""
    with pytest.raises(ValueError, match=r"^dense: expected torch.float32"):
        model(**_with(dense=good_batch()["dense"].double()))
    for dtype in (torch.float64, torch.float16):
        for mode in ("single", "per_field"):
            m = InterFormerCTR(InterFormerConfig(**{**CFG, "dense_tokens": mode})).to(dtype)
            b = good_batch()  # float32 dense
            out = m(**b)
            assert out.dtype == dtype
            assert torch.equal(out, m(**_with(dense=b["dense"].to(dtype))))  # the cast, nothing else
    # float32 values a half model cannot hold would be inf after the cast: refused, not NaN logits
    half = InterFormerCTR(InterFormerConfig(**CFG)).half()
    b = good_batch()
    b["dense"][0, 0] = 1e5
    with pytest.raises(ValueError, match=r"^dense: has values beyond torch.float16's range"):
        half(**b)
    with pytest.raises(ValueError, match=r"^dense: expected torch.float32, got torch.float64$"):
        model(**_with(dense=good_batch()["dense"].double()))


def test_value_checks_read_the_device_once(model):
    """All value checks of a batch come back in one transfer: no per-field ``int()``/``bool()`` reads
    (``aten._local_scalar_dense``; there were 16 per batch), one ``tolist`` of one concatenated tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    b = good_batch()
    with Count() as c:
        interformer.validate_batch(model.config, **b, label=torch.tensor([0.0, 1.0, 1.0]))
    assert "aten._local_scalar_dense.default" not in c.ops
    assert c.ops.count("aten.cat.default") == 1


def test_validation_can_be_turned_off():
    m = InterFormerCTR(InterFormerConfig(**{**CFG, "validate_inputs": False}))
    b = good_batch()
    b["dense"][0, 0] = float("nan")
    assert torch.isnan(m(**b)[0])  # no check: the NaN flows through (the caller asked for it)


# ----------------------------------------------------------------------------- config


BAD_CONFIG = [
    (dict(d_model=10, num_heads=4), "d_model"),
    (dict(d_model=12, num_heads=4), "head dim"),  # dh = 3, rotary needs it even
    (dict(d_model=0), "d_model"),
    (dict(num_heads=0), "num_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(n_sum=0), "n_sum"),
    (dict(n_ssum=0), "n_ssum"),
    (dict(n_pma=-1), "n_pma"),
    (dict(n_recent=-1), "n_recent"),
    (dict(n_dense=-1), "n_dense"),
    (dict(dcn_layers=0), "dcn_layers"),
    (dict(dhen_layers=0), "dhen_layers"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(backbone="transformer"), "backbone"),
    (dict(pffn_mode="conv"), "pffn_mode"),
    (dict(dense_tokens="pooled"), "dense_tokens"),
    (dict(dcn_rank=0), "dcn_rank"),
    (dict(seq_vocab_sizes=()), "seq_vocab_sizes"),
    (dict(sparse_vocab_sizes=(10, 1)), "vocabulary"),
    (dict(seq_vocab_sizes=(1,)), "vocabulary"),
    (dict(n_dense=0, sparse_vocab_sizes=()), "non-sequence token"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(backend="cuda"), "backend"),
    (dict(head=(8, 0)), "head"),
    (dict(ln_eps=0.0), "ln_eps"),
    (dict(ln_eps=-1e-5), "ln_eps"),
    (dict(rope_base=0.0), "rope_base"),
    (dict(rope_base=float("nan")), "rope_base"),
    # ln_eps=1e-50 is 0 in the fp32 LayerNorm: NaN logits with padding (test_config_ln_eps_and_rope_base_bounds)
    (dict(ln_eps=1e-50), "ln_eps"),
    (dict(ln_eps=float("inf")), "ln_eps"),  # every LayerNorm would output its bias alone
    (dict(rope_base=1e-60), "rope_base"),  # inverse frequencies overflow fp32: NaN attention
    (dict(rope_base=0.5), "rope_base"),
    (dict(rope_base=float("inf")), "rope_base"),
]


@pytest.mark.parametrize("kw,word", BAD_CONFIG, ids=[f"{list(k)[0]}={list(k.values())[0]}" for k, _ in BAD_CONFIG])
def test_config_rejects(kw, word):
    with pytest.raises(ValueError, match=word):
        InterFormerConfig(**{**CFG, **kw})


def test_config_accepts_edge_values():
    InterFormerConfig(**{**CFG, "n_dense": 0})
    InterFormerConfig(**{**CFG, "n_pma": 0, "n_recent": 0})
    InterFormerConfig(**{**CFG, "sparse_vocab_sizes": (), "n_dense": 2})
    InterFormerConfig(**{**CFG, "dcn_rank": None})


def test_module_constructors_reject_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        interformer.RotaryMultiHeadAttention(10, 4, backend="eager")
    with pytest.raises(ValueError, match="even head dim"):
        interformer.RotaryMultiHeadAttention(6, 2, backend="eager")
    with pytest.raises(ValueError, match="divisible"):
        interformer.PoolingMultiHeadAttention(2, 10, 4, backend="eager")
    with pytest.raises(ValueError, match="mode"):
        interformer.PersonalizedFFN(8, 2, mode="conv", backend="eager")
    with pytest.raises(ValueError, match="mode"):
        interformer.DenseTokenizer(3, 8, mode="pooled")
    with pytest.raises(ValueError):
        interformer.GatedLCE(0, 2, 8, backend="eager")
    with pytest.raises(ValueError):
        interformer.CrossNet(8, 0, backend="eager")
    with pytest.raises(ValueError):
        interformer.LowRankCrossNet(8, 2, 0, backend="eager")


# ----------------------------------------------------------------------------- backend resolution


def test_resolve_missing_kernel_file_names_the_op():
    """backend='triton' with no kernel file: NotImplementedError naming the op (made-up names, so the
    test does not depend on which kernel files exist yet)."""
    pytest.importorskip("triton")
    with pytest.raises(NotImplementedError, match="not_a_real_op"):
        resolve("not_a_real_kernel_file", "not_a_real_op", "triton", torch.device("cpu"))


def test_resolve_eager_and_auto_on_cpu_use_the_reference():
    from interformer import reference

    assert resolve("not_a_real_kernel_file", "gated_lce", "eager", torch.device("cpu")) is reference.gated_lce
    assert resolve("not_a_real_kernel_file", "gated_lce", "auto", torch.device("cpu")) is reference.gated_lce


def test_module_without_kernel_raises_on_triton_backend():
    pytest.importorskip("triton")

    class Fake(FusedModule):
        kernel_ops = (("not_a_real_kernel_file", "not_a_real_op"),)

        def __init__(self, backend=None):
            super().__init__(backend)
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self._op("not_a_real_kernel_file", "not_a_real_op")(x)

    m = Fake(backend="triton")
    assert not m.has_kernels()
    with pytest.raises(NotImplementedError, match="not_a_real_op"):
        m(torch.ones(2))


# ----------------------------------------------------------------------------- batch size, compiled models


@pytest.mark.parametrize("odd", ["dense", "sparse", "seq", "lengths"])
def test_batch_size_mismatch_names_the_tensor_whose_size_differs(model, odd):
    """One tensor with 2 rows, the other three with 3: the message names that tensor and lists every
    batch size (a short ``dense`` was blamed on ``sparse``: "expected shape (2, 2), got (3, 2)")."""
    b = good_batch()
    b[odd] = b[odd][:2]
    sizes = {n: (2 if n == odd else 3) for n in ("dense", "sparse", "seq", "lengths")}
    listed = ", ".join(f"{n} {s}" for n, s in sizes.items())
    with pytest.raises(ValueError, match=rf"^{odd}: batch size .*\(3\); batch sizes: {listed}$"):
        model(**b)
    with pytest.raises(ValueError, match=rf"^{odd}: batch size"):
        interformer.validate_batch(model.config, **b)


@pytest.mark.parametrize("odd", ["dense", "sparse", "seq", "lengths"])
def test_a_tensor_on_another_device_is_named(model, odd):
    """The model's inputs must be on its device: one on another device (``meta`` stands in for a GPU
    here) is named, before anything reads it (a fused kernel would read it through a pointer that is
    not valid on its device)."""
    b = good_batch()
    b[odd] = b[odd].to("meta")
    with pytest.raises(ValueError, match=rf"^{odd}: is on meta, expected cpu \(the model's device\); devices: .*{odd} meta"):
        model(**b)
    with pytest.raises(ValueError, match=rf"^{odd}: is on meta, expected cpu \(the device of dense\)" if odd != "dense"
                       else r"^sparse: is on cpu, expected meta \(the device of dense\)"):
        interformer.validate_batch(model.config, **b)


def test_validate_batch_checks_the_label_and_the_given_device(model):
    b = good_batch()
    with pytest.raises(ValueError, match=r"^label: is on meta, expected cpu"):
        interformer.validate_batch(model.config, **b, label=torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match=r"^dense: is on cpu, expected meta \(the model's device\)"):
        interformer.validate_batch(model.config, **b, device="meta")
    interformer.validate_batch(model.config, **b, label=torch.zeros(3), device=torch.device("cpu"))


def test_batch_size_tie_names_the_tensors_that_differ_from_dense(model):
    b = good_batch()
    b["seq"], b["lengths"] = b["seq"][:2], b["lengths"][:2]
    with pytest.raises(ValueError, match=r"^seq, lengths: batch size .*\(3\); batch sizes: dense 3, sparse 3, seq 2, lengths 2$"):
        model(**b)


def test_compiled_model_skips_value_checks_but_validate_batch_runs_them():
    """Under ``torch.compile`` the value checks are skipped (a check would read the data back and
    break the graph; README "Data contract"): the compiled model takes a batch with lengths > T or
    NaN in dense. ``interformer.validate_batch`` called on that batch before the compiled model
    still raises, naming the tensor, which is what the README tells users of compiled models to do."""
    torch._dynamo.reset()
    try:
        m = InterFormerCTR(InterFormerConfig(**CFG)).eval()
        compiled = torch.compile(m, backend="eager", fullgraph=True)
        for name, bad in (("lengths", _with(lengths=torch.tensor([0, 6, 2]))), ("dense", _with(dense=_nan_dense()))):
            with pytest.raises(ValueError, match=rf"^{name}\b"):
                m(**bad)  # eager: checked
            compiled(**bad)  # compiled: not checked (documented)
            with pytest.raises(ValueError, match=rf"^{name}\b"):
                interformer.validate_batch(m.config, **bad)
    finally:
        torch._dynamo.reset()


def test_values_checked_skips_the_value_checks_only(model):
    """Inside ``values_checked()`` (the caller ran the value checks: the trainer, on the host before
    its copy to a GPU) the model skips them, in this thread only, and still checks shapes and
    dtypes; after the block (also one left by an exception, and an inner block of two) they run
    again; a model compiled with ``fullgraph=True`` inside the block traces (dynamo never reads the
    flag)."""
    import threading

    bad = _with(lengths=torch.tensor([0, 6, 2]))
    with pytest.raises(ValueError, match=r"^lengths\b"):
        model(**bad)
    with interformer.values_checked():
        model(**bad)
        interformer.validate_batch(model.config, **bad)
        with pytest.raises(ValueError, match=r"^dense: expected 3 columns"):
            model(**_with(dense=torch.randn(3, 4)))
        with interformer.values_checked():
            pass
        model(**bad)  # still inside the outer block
        raised = []

        def other_thread():
            try:
                model(**bad)
            except ValueError as e:
                raised.append(str(e))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert raised and raised[0].startswith("lengths")
    with pytest.raises(ValueError, match=r"^lengths\b"):
        model(**bad)
    with pytest.raises(KeyError):
        with interformer.values_checked():
            raise KeyError
    with pytest.raises(ValueError, match=r"^lengths\b"):
        model(**bad)
    torch._dynamo.reset()
    try:
        with interformer.values_checked():
            compiled = torch.compile(InterFormerCTR(InterFormerConfig(**CFG)).eval(), backend="eager", fullgraph=True)
            compiled(**good_batch())
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- config types


BAD_CONFIG_TYPES = [
    (dict(d_model=16.5), "d_model", "16.5"),
    (dict(d_model="16"), "d_model", "'16'"),
    (dict(num_heads=True), "num_heads", "True"),
    (dict(num_layers=1.5), "num_layers", "1.5"),
    (dict(n_dense=2.5), "n_dense", "2.5"),
    (dict(n_pma=1.5), "n_pma", "1.5"),
    (dict(max_seq_len=None), "max_seq_len", "None"),
    (dict(dcn_rank=2.5), "dcn_rank", "2.5"),
    (dict(dcn_rank=float("inf")), "dcn_rank", "inf"),
    (dict(sparse_vocab_sizes=(10.9, 5)), r"sparse_vocab_sizes\[0\]", "10.9"),
    (dict(seq_vocab_sizes=(7, "4")), r"seq_vocab_sizes\[1\]", "'4'"),
    (dict(sparse_vocab_sizes="105"), "sparse_vocab_sizes", "'105'"),
    (dict(head=8), "head", "8"),
    (dict(causal="false"), "causal", "'false'"),
    (dict(causal=1), "causal", "1"),
    (dict(validate_inputs="no"), "validate_inputs", "'no'"),
    (dict(validate_inputs=None), "validate_inputs", "None"),
    (dict(dropout="0.1"), "dropout", "'0.1'"),
    (dict(rope_base=True), "rope_base", "True"),
    (dict(ln_eps=None), "ln_eps", "None"),
    (dict(n_sum=float("nan")), "n_sum", "nan"),
]


@pytest.mark.parametrize("kw,field,value", BAD_CONFIG_TYPES,
                         ids=[f"{list(k)[0]}={list(k.values())[0]!r}" for k, _, _ in BAD_CONFIG_TYPES])
def test_config_rejects_wrong_types_naming_field_and_value(kw, field, value):
    """Sizes must be integers and flags bools: a fractional size failed late inside torch (or a
    vocabulary was truncated), ``causal="false"`` was truthy and turned causal attention on."""
    with pytest.raises(ValueError, match=rf"InterFormerConfig\.{field} must be .*, got {value}$"):
        InterFormerConfig(**{**CFG, **kw})


def test_config_takes_integral_floats_and_numpy_integers_as_ints():
    """Decision (InterFormerConfig's docstring): ``16.0`` is the size 16, stored as an ``int``."""
    import numpy as np

    c = InterFormerConfig(**{**CFG, "d_model": 8.0, "num_layers": np.int64(1), "dcn_rank": 2.0,
                             "sparse_vocab_sizes": [10.0, np.int32(5)], "head": (8.0,)})
    assert c == InterFormerConfig(**CFG)
    for name in ("d_model", "num_layers", "dcn_rank"):
        assert type(getattr(c, name)) is int, name
    assert all(type(v) is int for v in c.sparse_vocab_sizes + c.head)
    assert InterFormerConfig(**{**CFG, "causal": True, "validate_inputs": False}).causal is True
    InterFormerCTR(c)  # builds


def test_config_takes_numpy_scalars_and_stores_plain_python_types():
    """Settings read through NumPy (or ``fractions``): a ``float32`` size was refused where a ``float64``
    one was taken, a NumPy bool was refused, and a ``float32``/``Fraction`` real number was stored as
    given: ``asdict`` then did not serialise to JSON, and a ``Fraction`` dropout built the model but
    failed on the first training forward (``dropout(): argument 'p' must be float``)."""
    import dataclasses
    import fractions
    import json

    import numpy as np

    c = InterFormerConfig(**{**CFG, "d_model": np.float32(8.0), "head": (np.float32(8.0),), "causal": np.bool_(False),
                             "validate_inputs": np.bool_(True), "dropout": fractions.Fraction(1, 10),
                             "ln_eps": np.float32(1e-5), "rope_base": np.float32(10000.0)})
    assert type(c.d_model) is int and c.head == (8,) and type(c.head[0]) is int
    assert c.causal is False and c.validate_inputs is True
    assert all(type(getattr(c, n)) is float for n in ("dropout", "ln_eps", "rope_base"))
    assert c.dropout == 0.1 and c.rope_base == 10000.0
    assert InterFormerConfig(**json.loads(json.dumps(dataclasses.asdict(c)))) == c
    m = InterFormerCTR(c).train()
    m(**good_batch()).sum().backward()
    with pytest.raises(ValueError, match=r"InterFormerConfig\.d_model must be an integer, got np\.True_$"):
        InterFormerConfig(**{**CFG, "d_model": np.bool_(True)})
    with pytest.raises(ValueError, match=r"InterFormerConfig\.d_model must be an integer, got np\.float32\(8\.5\)$"):
        InterFormerConfig(**{**CFG, "d_model": np.float32(8.5)})


def test_config_ln_eps_and_rope_base_bounds():
    """An ``ln_eps`` below fp32's smallest normal number is 0 in the fp32 LayerNorm: ``ln_eps=1e-50``
    was accepted (it is > 0) and gave NaN logits on a batch with a length-0 row; a tiny ``rope_base``
    overflowed the rotary inverse frequencies into NaN. Both are refused (BAD_CONFIG); the smallest
    accepted values give finite logits and gradients."""
    for kw in (dict(ln_eps=2.0**-126), dict(rope_base=1.0)):
        torch.manual_seed(0)
        m = InterFormerCTR(InterFormerConfig(**{**CFG, **kw}))
        out = m(**good_batch())  # row 0 has length 0: its sequence is all padding
        out.sum().backward()
        assert torch.isfinite(out).all(), kw
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None), kw
    with pytest.raises(ValueError, match="ln_eps must be finite"):  # past fp64: refused, not an OverflowError
        InterFormerConfig(**{**CFG, "ln_eps": 10**400})


@pytest.mark.parametrize("label", [[0.0, 1.0, 1.0], "numpy"])
def test_validate_batch_names_a_label_that_is_not_a_tensor(label):
    """A list or NumPy label raised ``AttributeError: 'list' object has no attribute 'dim'``."""
    import numpy as np

    label = np.array([0.0, 1.0, 1.0], dtype=np.float32) if label == "numpy" else label
    with pytest.raises(ValueError, match=r"^label: expected a torch.Tensor, got (list|ndarray)$"):
        interformer.validate_batch(InterFormerConfig(**CFG), **good_batch(), label=label)


def test_a_data_parallel_replica_runs_its_checks():
    """``nn.DataParallel`` runs the forward on replicas that register no parameters (they are plain
    attributes, ``torch/nn/parallel/replicate.py``): the device check then asks only for one device
    (reading "the model's device" from ``next(self.parameters())`` raised StopIteration). Built here
    as ``replicate`` builds them, without the GPU broadcast."""
    model = InterFormerCTR(InterFormerConfig(**CFG))
    modules = list(model.modules())
    copies = {m: m._replicate_for_data_parallel() for m in modules}
    for m in modules:
        r = copies[m]
        r._former_parameters = {}
        for k, sub in m._modules.items():
            setattr(r, k, None if sub is None else copies[sub])
        for k, p in m._parameters.items():
            if p is not None:
                t = p.detach().clone().requires_grad_()
                setattr(r, k, t)
                r._former_parameters[k] = t
    replica = copies[model]
    assert not list(replica.parameters())
    torch.testing.assert_close(replica(**good_batch()), model(**good_batch()))
    b = good_batch()
    b["lengths"] = b["lengths"].to("meta")
    with pytest.raises(ValueError, match=r"^lengths: is on meta, expected cpu \(the device of dense\)"):
        replica(**b)


@pytest.mark.parametrize("field", ["sparse_vocab_sizes", "seq_vocab_sizes", "head"])
@pytest.mark.parametrize("kind", ["set", "frozenset", "dict"])
def test_config_refuses_unordered_tuple_fields(field, kind):
    """A set of vocabulary sizes was taken in its hashes' order (``{2001, 1001, 51, 25}`` became
    ``(2001, 51, 1001, 25)``: each field built with another field's vocabulary), and a dict as its
    keys; both are refused naming the field. Ordered iterables (list, tuple, NumPy array) still pass."""
    import numpy as np

    values = list(CFG[field])
    given = {"set": set, "frozenset": frozenset, "dict": dict.fromkeys}[kind](values)
    with pytest.raises(ValueError, match=rf"^InterFormerConfig\.{field} must be a sequence of integers, got "):
        InterFormerConfig(**{**CFG, field: given})
    for ordered in (values, tuple(values), np.array(values)):
        assert getattr(InterFormerConfig(**{**CFG, field: ordered}), field) == tuple(values)


@pytest.mark.parametrize("field,sizes,i", [("sparse_vocab_sizes", (10, 1), 1), ("seq_vocab_sizes", (0, 4), 0)])
def test_config_vocabulary_too_small_names_the_entry(field, sizes, i):
    """The message named neither the field nor the entry nor the value ("every vocabulary needs size >= 2")."""
    with pytest.raises(ValueError, match=rf"^InterFormerConfig\.{field}\[{i}\]: every vocabulary needs size >= 2 "
                                         rf".*, got {sizes[i]}$"):
        InterFormerConfig(**{**CFG, field: sizes})


def test_config_odd_head_dim_names_d_model_and_num_heads():
    """The message gave the head dim alone ("got 3"), a number that is no field of the config."""
    with pytest.raises(ValueError, match=r"even head dim, got d_model=6 / num_heads=2 = 3$"):
        InterFormerConfig(**{**CFG, "d_model": 6, "num_heads": 2})


def test_config_stores_choice_strings_as_plain_str():
    """A NumPy string (as read from a NumPy or pandas table) or a ``str`` Enum member for
    ``backbone``, ``pffn_mode`` or ``dense_tokens`` was stored as given: a checkpoint holding
    ``to_dict()`` then failed ``torch.load(weights_only=True)`` (the trainer's ``load_checkpoint``)."""
    import enum
    import io

    import numpy as np

    class Mode(str, enum.Enum):
        LINEAR = "linear"

    c = InterFormerConfig(**{**CFG, "backbone": np.str_("dot"), "pffn_mode": Mode.LINEAR,
                             "dense_tokens": np.str_("per_field")})
    assert (c.backbone, c.pffn_mode, c.dense_tokens) == ("dot", "linear", "per_field")
    assert all(type(getattr(c, n)) is str for n in ("backbone", "pffn_mode", "dense_tokens", "backend"))
    buf = io.BytesIO()
    torch.save({"model_config": c.to_dict()}, buf)
    buf.seek(0)
    assert InterFormerConfig(**torch.load(buf, weights_only=True)["model_config"]) == c
