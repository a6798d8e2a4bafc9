"""ONNX export of a fused model.

An ONNX graph runs on its runtime's kernels (ONNX Runtime, TensorRT), not on this package's, and the
``interformer::`` custom ops have no ONNX translation. So while ``torch.onnx.export`` traces, every
fused op records its eager reference instead (``kernels/_dispatch.reference_only``), and a fused model
exports to the graph of the eager one:

* with the exporter's flag up, ``torch.export`` of the fused model records no ``interformer::`` op
  and gives the eager model's logits, for each structural variant (no ONNX package needed); with the
  flag down the custom ops stay, as ``torch.export``'s own route to AOTInductor needs;
* ``torch.onnx.export`` (the dynamo exporter, PyTorch's default) of the fused model with a dynamic
  batch and sequence length runs in ONNX Runtime and gives the eager logits on a batch of another
  size and length (needs ``onnxscript`` and ``onnxruntime``, which ``make test`` installs).
"""

from __future__ import annotations

import pytest
import torch

from test_fused_model import LENGTHS, VARIANTS, _fused_pair, _variant
from test_model import random_batch
from utils import DEVICE, HAS_CUDA

# DESIGN §5 fp32, as tests/test_fused_model.py: the traced reference is the eager model's own math,
# so on the CPU the two agree to rounding (ONNX Runtime's kernels reorder sums)
TOL = 1e-3 if HAS_CUDA else 1e-5


def _inputs(cfg, lengths=LENGTHS, T=6, seed=0):
    return tuple(t.to(DEVICE) for t in random_batch(cfg, lengths, T, seed=seed)[:4])


def _ops(program) -> set:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnx_export_traces_the_reference_of_every_fused_op(variant, monkeypatch):
    cfg = _variant(variant)
    eager, fused = _fused_pair(cfg, seed=1)
    eager.eval(), fused.eval()
    args = _inputs(cfg)
    kept = _ops(torch.export.export(fused, args))  # not exporting to ONNX: the fused ops stay
    assert any(op.startswith("interformer.") for op in kept), sorted(kept)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)  # what torch.onnx.export sets
    program = torch.export.export(fused, args)
    ops = _ops(program)
    assert not any(op.startswith("interformer.") for op in ops), sorted(op for op in ops if "interformer" in op)
    batch = _inputs(cfg, seed=2)
    with torch.no_grad():
        out, ref = program.module()(*batch), eager(*batch)
    assert float((out - ref).norm() / ref.norm()) <= TOL


@pytest.mark.filterwarnings("ignore:.*The axis name")  # the exporter's note on naming B's two uses once
def test_fused_model_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx.export's exporter needs onnxscript (make test installs it)")
    ort = pytest.importorskip("onnxruntime", reason="make test installs onnxruntime")
    from torch.export import Dim

    cfg = _variant("default")
    eager, fused = _fused_pair(cfg, seed=3)
    eager.eval(), fused.eval()
    B, T = Dim("B", min=2, max=4096), Dim("T", min=2, max=1024)
    program = torch.onnx.export(fused, _inputs(cfg), dynamic_shapes=({0: B}, {0: B}, {0: B, 2: T}, {0: B}),
                                dynamo=True)
    assert not any(n.domain.startswith("interformer") for n in program.model_proto.graph.node)
    path = tmp_path / "fused.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = _inputs(cfg, lengths=[1, 2, 3, 4, 5, 0, 7, 7, 2], T=7, seed=4)  # another size and length
    out = session.run(None, {i.name: t.cpu().numpy() for i, t in zip(session.get_inputs(), batch)})[0]
    with torch.no_grad():
        ref = eager(*batch).cpu()
    out = torch.from_numpy(out)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) <= TOL
