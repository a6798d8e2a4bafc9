"""Two entry points to every fused op: the ``torch.library`` custom op, and a lean eager path.

Every Triton op of this package is registered as a ``torch.library.custom_op`` pair (``<op>_fwd`` /
``<op>_bwd``, fake implementations, an autograd formula; the tokenizers' grouped lookups,
``embedding.py``, are aten ops in a plain ``torch.autograd.Function`` that tracers trace through). That registration is what
``torch.compile``, ``torch.export`` and ``opcheck`` need, and it is what runs whenever a graph is
being traced.

Outside tracing, a custom op call pays for its generality: Python-level dispatch through the
autograd, ADInplaceOrView and backend keys, schema checks and the autograd wrapper, about
50 us per forward call and another 100 us or more per backward on a typical host. At the DESIGN §6
shapes a fused kernel runs for tens of microseconds, so that overhead, not the GPU, sets the
time of an eager training step. The eager path therefore calls the same ``_impl`` launchers through
a plain ``torch.autograd.Function`` (one Python frame and the C++ autograd node), and skips
autograd entirely when no input needs a gradient.

Decision: both paths run the same launcher functions with the same arguments, so their results
are bitwise identical; tests run both (the module tests use the eager path, ``opcheck`` and the
``torch.compile`` tests the custom ops). The custom op is used whenever
``torch.compiler.is_compiling()`` is true (dynamo, export) or any tensor argument is a
``FakeTensor``/functional wrapper rather than a plain tensor; ``torch.fx.symbolic_trace`` records
the custom op (see the public functions).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def tracing(tensors: Sequence[torch.Tensor]) -> bool:
    """True when the call must go through the registered custom op: a compiler is tracing, or an
    argument is not a plain tensor (FakeTensor, functional tensor, fx Proxy, tensor subclass)."""
    if torch.compiler.is_compiling():
        return True
    for t in tensors:
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return True
    return False


def needs_grad(tensors: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _WithSaved:
    """``ctx`` with its ``saved_tensors`` already unpacked (every other attribute is ctx's)."""

    def __init__(self, ctx, saved) -> None:
        self._ctx, self.saved_tensors = ctx, saved

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def lean_function(name: str, forward: Callable, backward: Callable) -> type:
    """A ``torch.autograd.Function`` named ``name`` whose forward is ``forward(ctx, *args)`` and
    backward ``backward(ctx, *grads)``; both receive exactly what ``Function`` passes.

    The backward is first-order only (its kernels are not differentiable): under
    ``create_graph=True`` its gradients come back with the right values but a ``grad_fn`` that
    raises, naming the op, if anything differentiates through them. Without that they would have
    no ``grad_fn`` at all, and a second-order gradient would silently leave out this op's part
    (``once_differentiable`` does the same only when the incoming gradients require grad, which
    misses e.g. ``dz = (G + G^T) z`` after ``out.sum()``).

    Gradients are not materialised: an output that does not reach the loss (attention's lse, the
    cross nets' saved intermediates, LayerNorm's statistics) hands the backward None, not a zero
    tensor allocated and filled on every call."""
    message = (f"interformer: the fused op {name} has no second-order gradient (its backward runs Triton "
               "kernels); differentiate twice through the eager path (backend='eager')").encode()

    def first_order_backward(ctx, *grads):
        if not torch.is_grad_enabled():  # a plain backward (create_graph=False)
            return backward(ctx, *grads)
        # saved tensors are unpacked once (non-reentrant checkpointing allows no second unpack)
        saved = ctx.saved_tensors
        with torch.no_grad():
            outputs = backward(_WithSaved(ctx, saved), *grads)
        single = not isinstance(outputs, tuple)
        outputs = (outputs,) if single else outputs
        # the raising node's inputs are everything the gradients depend on that requires grad (the
        # saved inputs, the incoming gradients), so that a second gradient with respect to any of
        # them has to pass through it: ``autograd.grad(inputs=...)`` prunes every other node
        links = [t for t in (*saved, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
        marked = torch._C._functions.DelayedError(message, len(outputs) + len(links))(
            *[None if t is None else t.detach() for t in outputs], *links)
        marked = marked if isinstance(marked, tuple) else (marked,)
        return marked[0] if single else tuple(marked[: len(outputs)])

    def lean_forward(ctx, *args):
        ctx.set_materialize_grads(False)
        return forward(ctx, *args)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(lean_forward),
        "backward": staticmethod(first_order_backward),
    })
