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
``torch.compiler.is_compiling()`` is true (dynamo, export), ``torch.jit.trace`` is tracing (which
records a custom op as a node and would record nothing of a launch), or any tensor argument is a
``FakeTensor``/functional wrapper rather than a plain tensor; ``torch.fx.symbolic_trace`` records
a call of the public function itself (:func:`fx_call`).

Under ``torch.compile`` the ops registered through :func:`inline_when_compiled` are traced into
their launchers' aten ops and Triton launches (the last section of this file), which Inductor then
runs from its own generated code, where their tensors are on a CUDA device
(``interformer.set_compile_inline``: by default; True: on every device). Any other op, and every op
under ``set_compile_inline(False)``, is one opaque call in the compiled code.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def tracing(tensors: Sequence[torch.Tensor]) -> bool:
    """True when the call must go through the registered custom op: a compiler or ``torch.jit.trace``
    is tracing, or an argument is not a plain tensor (FakeTensor, functional tensor, fx Proxy,
    tensor subclass, a ``torch.func`` transform's wrapper, which is of type Tensor but has no
    storage). The type is compared exactly: ``isinstance(t, nn.Parameter)`` also holds for a
    subclass tensor made a parameter (``nn.Parameter(DTensor)``, a FakeTensor converted from a
    parameter), whose data the launchers cannot read."""
    if torch.compiler.is_compiling() or _jit_tracing():
        return True
    transform = _functorch_transform() is not None  # its wrappers exist only inside one: cheap outside
    for t in tensors:
        if type(t) not in _PLAIN or (transform and _functorch_wrapped(t)):
            return True
    return False


def fx_call(fn: Callable, proxy: "torch.fx.Proxy", *args):
    """``fn(proxy, *args)`` recorded as one ``call_function`` node of ``fn`` itself: what a public
    function does when ``torch.fx.symbolic_trace`` hands it a Proxy (no sizes to check). The traced
    module then calls ``fn`` on its real tensors, so its checks, its autocast cast, its reference
    fallback past the kernels' limits and its lean autograd path run as in the module.

    Reason: until 2026-11-28 the custom op was recorded instead, and a traced module ran it with
    none of those. Past the limits it launched a kernel anyway (a ``GatedLCE`` at d = 160: one
    launch where the module runs the reference), and under autocast it computed in fp32 (fp16
    autocast on a CPU: the module gave fp16, the traced one fp32)."""
    return proxy.tracer.create_proxy("call_function", fn, (proxy, *args), {})


#: whether ``torch.jit.trace`` is tracing (``torch.jit.is_tracing`` less its Python frames)
_jit_tracing = torch._C._is_tracing
#: the innermost active ``torch.func`` transform (vmap, grad, jvp), None outside any
_functorch_transform = torch._C._functorch.peek_interpreter_stack
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_FUNCTIONALIZE = torch._C._functorch.TransformType.Functionalize


def _functorch_interpreters():
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return retrieve_all_functorch_interpreters()


def transformed() -> bool:
    """True inside a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``, ``jacfwd``,
    ``hessian``, ...; not ``functionalize``, a tracing aid that keeps the custom ops) outside
    ``torch.compile``: the fused ops then run their eager reference, whose aten ops every transform
    knows. Any active transform counts, not only one that wrapped the op's own arguments: inside
    ``grad`` an op of plain tensors (a batch the function closes over, real parameters) still makes
    its outputs with the transform's wrappers, which a launcher cannot read, and its autograd node
    would be the transform's.

    Decision: the kernels have no batching rule and no forward-mode formula, and the autograd formula
    of a ``torch.library`` custom op cannot be used under ``torch.func`` at all: the
    ``autograd.Function`` PyTorch generates for it has no separate ``setup_context``, which functorch
    requires (PyTorch issues 168393, 170834, 179652; a fused module failed ``torch.func.grad``
    with that error). Per-sample gradients (``vmap(grad(...))``), Jacobians and Hessians of a fused
    model are therefore the reference's, computed by aten ops, not the kernels. While compiling the
    custom ops are kept (what dynamo and export record); a transform inside a compiled function
    (``torch.compile(torch.func.grad(f))``) over a fused op is not supported (the custom op's
    autograd formula is refused there, as above): compile the eager model for that."""
    if _functorch_transform() is None or torch.compiler.is_compiling():
        return False
    return any(i.key() != _FUNCTIONALIZE for i in _functorch_interpreters())


def onnx_exporting() -> bool:
    """True while ``torch.onnx.export`` traces a model (either exporter: ``dynamo=True``, which
    traces with ``torch.export``, or the TorchScript one, which traces with ``torch.jit.trace``).
    Checked only while something traces, so that the eager path pays nothing for it
    (``torch.onnx.is_in_onnx_export`` takes about 1 us a call)."""
    return (torch.compiler.is_compiling() or _jit_tracing()) and torch.onnx.is_in_onnx_export()


def forward_ad() -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level()``, where tensors may carry tangents.

    Decision: the fused ops run their eager reference there, whose aten ops propagate tangents, as
    they do under ``torch.func.jvp`` (:func:`transformed`). Reason: the kernels have no forward-mode
    formula, and a dual tensor is a plain tensor to :func:`tracing`, so before 2026-11-28 a fused
    op given one launched its kernels and returned an output with no tangent, silently (no input
    needing a gradient), or raised autograd's "jvp is not implemented" (an attention fuzzing
    helper's case). Any active level counts, whether or not this op's inputs are duals: reading
    each input's tangent would cost host time on every call, and a level is opened only for
    forward-mode work. Reads a module global (``_current_level``, -1 outside any level)."""
    return _forward_ad._current_level >= 0


def reference_only(t: Optional[torch.Tensor] = None) -> bool:
    """True where a fused op must run its eager reference instead of its kernels: inside a
    ``torch.func`` transform (:func:`transformed`), inside a forward-mode AD level
    (:func:`forward_ad`), while ``torch.onnx.export`` traces (:func:`onnx_exporting`), and when
    ``t`` (the op's main input) is on the meta device.

    Decision for meta tensors: they have shapes and dtypes but no data (a model built on the meta
    device, run to infer shapes or count FLOPs). The reference's aten ops have meta kernels and
    give the shapes and dtypes eager gives; a launcher has nothing to read. The modules already
    routed a meta model to the reference (``interformer.backend``); before 2026-11-29 the public
    op functions raised on meta inputs instead (autocast has no meta device type: :func:`autocast_dtype`).
    A ``FakeTensor`` (``torch.compile``, ``torch.export``) is not a meta tensor here: it goes to the
    custom op, whose fake implementation is what tracing needs.

    Decision for ONNX: an ONNX graph runs on ONNX Runtime, TensorRT and the like, with their own
    kernels; the custom ops (``interformer::*``) have no ONNX translation, and one for each would
    only restate the reference math in ONNX operators. So the fused ops record the reference's aten
    ops, which the exporter translates, and a fused model exports to the same graph as the eager
    one (same parameters, same outputs). ``torch.export`` itself still keeps the custom ops."""
    return (t is not None and t.is_meta) or transformed() or forward_ad() or onnx_exporting()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on ``device_type`` where it is on, else None; None also for a
    device type autocast does not know (``meta``), where ``torch.is_autocast_enabled`` raises and
    eager's aten ops do not autocast."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device_type: str):
    """A context with autocast off on ``device_type`` (the references' fallbacks run in the dtype
    they are given); nothing for a device type autocast does not know (``meta``: entering
    ``torch.autocast`` there raises)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def layer_norm_takes(param_dtypes, input_dtype: torch.dtype) -> bool:
    """Whether ``F.layer_norm`` outside autocast takes parameters of ``param_dtypes`` (those of the
    weight and the bias it is given, together) for an input of ``input_dtype``: all of the input's
    dtype, or all fp32 with a 16-bit input. It refuses, e.g., fp16 parameters for an fp32 input,
    and an fp32 weight with an fp16 bias for an fp16 input (a review found the rule, stated per
    parameter until then, taking that pair). The one statement of the rule: the fused path's eager
    fallbacks cast parameters it refuses (``_common.layer_norm_params``), ``ResidualLayerNorm`` and
    ``PersonalizedFFN`` (for its norm) raise."""
    dtypes = set(param_dtypes)
    return dtypes <= {input_dtype} or (dtypes == {torch.float32} and input_dtype in (torch.float16, torch.bfloat16))


def savable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or where it is an inference tensor (made under ``torch.inference_mode``, in a data
    loader's collate say) a copy of it: autograd refuses to save inference tensors, and the fused
    ops save ``lengths`` for their backward where eager saves only the masks built from it, and
    the add + LayerNorm op its two inputs where eager saves only their sum (so eager trained on
    such tensors and the fused path raised; reviews, 2026-11-29). Called on the eager entry's path
    where some input needs a gradient: no copy otherwise. Not under ``torch.compile``, where
    Dynamo refuses ``is_inference()`` and a copy on every call would cost a kernel: there the
    custom ops raise autograd's error on such tensors, as ``torch.compile`` of the eager model does
    (its compiled autograd function saves the inference tensor as well: a training step of the tiny
    model, torch 2.13 on a CPU, 2026-11-29), so the two paths still fail alike there."""
    return t.clone() if t.is_inference() else t


def needs_grad(tensors: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def needed(grads: Sequence, need: Sequence[bool]) -> tuple:
    """``grads`` with None where ``need`` (``ctx.needs_input_grad``'s flags for them) is False, so
    that a backward hands autograd no gradient it would drop (and frees the buffer sooner)."""
    return tuple(g if n else None for g, n in zip(grads, need))


class _WithSaved:
    """``ctx`` with its ``saved_tensors`` already unpacked (every other attribute is ctx's)."""

    def __init__(self, ctx, saved) -> None:
        self._ctx, self.saved_tensors = ctx, saved

    def __getattr__(self, name):
        return getattr(self._ctx, name)


#: whether a tensor is one of the legacy vmap's batched tensors (``torch.autograd.grad(...,
#: is_grads_batched=True)``, ``torch.autograd.functional.jacobian(..., vectorize=True)``); about 0.1 us
_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _batched(grads) -> bool:
    """Whether an incoming gradient is batched: one of the legacy vmap's tensors, or a ``torch.func``
    transform's wrapper (``vmap`` over ``torch.autograd.grad``), which a launcher cannot read either."""
    transform = _functorch_transform() is not None
    for g in grads:
        if g is not None and (_legacy_batched(g) or (transform and _functorch_wrapped(g))):
            return True
    return False


def saving_forward(impl: Callable, setup_context: Callable) -> Callable:
    """The ``forward(ctx, *inputs)`` of a :func:`lean_function` for an op whose custom op registers
    ``setup_context`` with its autograd formula: ``impl(*inputs)`` (the launcher), then
    ``setup_context(ctx, inputs, output)``, so that both entry points save the same tensors."""
    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output
    return forward


def lean_function(name: str, forward: Callable, backward: Callable, batched_backward: Callable) -> type:
    """A ``torch.autograd.Function`` named ``name`` whose forward is ``forward(ctx, *args)`` and
    backward ``backward(ctx, *grads)``; both receive exactly what ``Function`` passes.

    ``batched_backward`` (same signature) computes the same gradients without handing a launcher a
    batched tensor; it runs instead of ``backward`` when an incoming gradient is one of the legacy
    vmap's batched tensors, under which ``torch.autograd.grad(..., is_grads_batched=True)`` runs the
    backward (and ``torch.autograd.functional.jacobian(..., vectorize=True)`` with it). Eager's
    backward takes those; a launcher cannot read one ("Cannot access storage of
    BatchedTensorImpl"). The ops' ``batched_backward`` call their registered ``torch.library``
    backward ops instead, which the dispatcher's batching fallback runs once per gradient of the
    batch on plain tensors; the cross nets, whose backward ops take tensor lists (which the fallback
    refuses), differentiate their eager reference. With ``create_graph=True`` as well it raises,
    naming the op (``DelayedError`` below cannot take batched tensors). ``torch.func.vmap`` over a
    backward (``vmap(lambda g: torch.autograd.grad(out, x, g))``, whose gradients are functorch's
    wrappers rather than the legacy batched tensors) takes the same ``batched_backward``.

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
    batched_message = (f"interformer: the fused op {name} cannot run a batched backward (is_grads_batched=True, "
                       "or a torch.func transform over autograd.grad) with create_graph=True; use the eager path "
                       "(backend='eager') for that")

    def first_order_backward(ctx, *grads):
        batched = _batched(grads)
        bwd = batched_backward if batched else backward
        if not torch.is_grad_enabled():  # a plain backward (create_graph=False)
            return bwd(ctx, *grads)
        if batched:  # DelayedError, below, cannot take the legacy vmap's tensors (it corrupts memory)
            raise RuntimeError(batched_message)
        # saved tensors are unpacked once (non-reentrant checkpointing allows no second unpack)
        saved = ctx.saved_tensors
        with torch.no_grad():
            outputs = bwd(_WithSaved(ctx, saved), *grads)
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


# ============================================================================ inlining under torch.compile
# What follows lets a compiled graph launch the kernels itself (``interformer.set_compile_inline``):
# while AOTAutograd traces, a registered op runs its own Python body under FunctionalTensorMode, with
# every launch going through ``torch.library.wrap_triton``. That is ``torch.library.triton_op``'s
# mechanism; it is done by hand here so that it can be switched off (and is, by default, for tensors
# off a GPU, where Inductor cannot launch Triton kernels) and so that the eager path keeps launching
# the kernels directly: ``wrap_triton`` dispatches through a higher-order op whenever it is enabled,
# which ``triton_op`` itself avoids in eager.
#
# Float arguments: a plain launch types a Python float fp32; Inductor, launching a traced kernel,
# types it fp64 (``_use_fp64_for_unbacked_floats``, to keep a float's precision). A scale or an
# epsilon of fp64 turns every product it touches fp64: slower, and a loop-carried accumulator that
# changes type fails to compile (the H200 lease of 2026-11-27 at c77021c: attention's qk_scale, so
# that no inlined model compiled). So each kernel that takes a float casts it to fp32 first
# (``x = tl.cast(x, tl.float32)``, a no-op for a plain launch, and accepted by the interpreter,
# which passes a Python float); tests/test_compile_inline.py builds every such kernel with its
# floats typed fp64 for sm_90.

class _Trace(threading.local):
    """Per thread: whether :func:`inline_when_compiled` is tracing an op into its kernels. ``on``
    defaults to False through the class (read on every launch: ``getattr(local, "on", False)`` on a
    bare ``threading.local`` took 0.42 us on the CI CPU, this 0.06 us)."""
    on = False


_TRACE = _Trace()


def _decomposing() -> bool:
    return _TRACE.on


def launch(kernel):
    """``kernel`` itself, or while :func:`inline_when_compiled` traces an op, a traceable wrapper
    that records the launch in the graph (``kernel[grid](...)`` either way). Every launcher of an
    op registered with :func:`inline_when_compiled` writes its launches as
    ``launch(_my_kernel)[grid](...)`` (the cross nets' are not registered, and launch directly)."""
    return _traceable(kernel) if _decomposing() else kernel


def unused_arg(like: torch.Tensor) -> torch.Tensor:
    """A tensor to pass for a pointer the kernel will not touch (a disabled output, padding): ``like``
    itself outside tracing, a fresh empty tensor while an op is traced into its kernels.

    Reason: the traced launch treats each tensor argument a kernel may write as its own output
    (functionalized: copied, written, copied back). Two arguments that are one tensor, one of them
    written, would then be written back twice, and the later write-back (the untouched copy) would
    undo the earlier. Which arguments a kernel can write is found from its Triton IR on a GPU, with
    constexpr branches resolved, and by :func:`written_params` under the interpreter, without."""
    return like.new_empty((0,)) if _decomposing() else like


def inline_when_compiled(*ops) -> None:
    """Register, for each ``torch.library.custom_op`` in ``ops``, the rule that replaces it by its own
    Python body while AOTAutograd traces a graph (FunctionalTensorMode), when
    :func:`interformer.backend.compile_inline` asks for it (True; or None, the default, and a tensor
    argument on a CUDA device: :func:`_inlines`) and the call's sizes are static; otherwise
    (dynamic shapes, see :func:`_symbolic`), and always for ``torch.export``, the op stays one
    opaque node. The body must launch through :func:`launch` and pass
    :func:`unused_arg` for aliases of outputs."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for op in ops:
        op.register_torch_dispatch(FunctionalTensorMode, _inline_rule(op._init_fn))


def _export_keeps_ops() -> bool:
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # an older torch: no such switch
        return False
    return custom_triton_ops_decomposition_disabled()


def _inline_rule(body: Callable) -> Callable:
    def rule(mode, op, types, args, kwargs):
        from interformer.backend import compile_inline

        if not _inlines(compile_inline(), args, kwargs) or _export_keeps_ops() or _symbolic(args, kwargs):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        from torch._subclasses import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor

        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
            return NotImplemented  # another tensor subclass: let it handle the op
        previous = _decomposing()
        _TRACE.on = True
        try:
            with mode:
                return body(*args, **kwargs)
        finally:
            _TRACE.on = previous
    return rule


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor):
                yield t


def _inlines(setting, args, kwargs) -> bool:
    """Whether a traced call is inlined under the setting ``setting`` (True, False, or None: where a
    tensor argument is on a CUDA device; :func:`interformer.backend.inline_decision`)."""
    from interformer.backend import inline_decision

    return inline_decision(setting, (t.device.type for t in _tensors(args, kwargs)))


def _symbolic(args, kwargs) -> bool:
    """Whether a tensor argument has a symbolic size or stride (a graph traced with dynamic shapes).

    Such a call stays one opaque op: the launchers choose block sizes and grids from the sizes,
    and a traced launch takes its constexprs as constants, so inlining it would pin the graph to
    one size (a guard per size) or fail in the launchers' caches."""
    return any(isinstance(x, torch.SymInt) for t in _tensors(args, kwargs) for x in (*t.shape, *t.stride()))


_INTERPRETED: dict = {}


def _traceable(kernel):
    """``wrap_triton(kernel)``; under ``TRITON_INTERPRET=1``, where ``wrap_triton`` hands back the
    interpreted function (which a trace cannot record), a wrapper around a stand-in that the graph
    can record and that runs the interpreted kernel when the graph runs (``aot_eager`` on a CPU; the
    CPU tests' only way to run a traced launch)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper

    stand_in = _INTERPRETED.get(kernel)
    if stand_in is None:
        stand_in = _INTERPRETED[kernel] = _interpreted_stand_in(kernel)
    return TraceableTritonKernelWrapper(stand_in, None, None)


def _interpreted_stand_in(kernel):
    from triton.runtime.jit import JITFunction

    _answer_writes_for_stand_ins()

    class _StandIn(JITFunction):
        """A JITFunction built from the interpreted kernel's source (what the trace records), whose
        launches run the interpreted kernel; ``written`` names the parameters it can store to."""

        written = written_params(kernel.fn)

        @property
        def cache_key(self):  # JITFunction's hashes the source of every helper, which it cannot do for
            return f"interpreted-{id(self)}"  # interpreted helpers; one stand-in per kernel, so id serves

        def __hash__(self):
            return id(self)

        def __getitem__(self, grid):
            return kernel[grid]

        def run(self, *args, grid, warmup=False, **kwargs):
            return kernel.run(*args, grid=grid, warmup=warmup, **kwargs)

    return _StandIn(kernel.fn)


def _answer_writes_for_stand_ins() -> None:
    """Make the trace ask :func:`written_params` which arguments a stand-in kernel writes.

    The trace finds them by compiling the kernel to Triton IR, which needs a GPU target; on a CPU it
    fails, and the trace then takes every argument as written. That is correct for the kernel's own
    outputs, not for a graph: a backward kernel's read-only inputs (an input of the forward, the
    forward's output) would count as mutated in the backward, which AOTAutograd's partitioner
    rejects. Installed once, under the interpreter only; kernels that are not stand-ins keep the
    trace's own analysis."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    original = wrap.get_mutated_tensors
    if getattr(original, "_interformer", False):
        return

    def get_mutated_tensors(kernel_idx, constant_args_idx, kwargs, *rest, **kw):
        kernel = wrap.kernel_side_table.get_kernel(kernel_idx)
        while not hasattr(kernel, "written") and hasattr(kernel, "fn"):  # launch options wrap it in an Autotuner
            kernel = kernel.fn
        written = getattr(kernel, "written", None)
        if written is None:
            return original(kernel_idx, constant_args_idx, kwargs, *rest, **kw)
        return [name for name in kernel.arg_names if name in written and isinstance(kwargs.get(name), torch.Tensor)]

    get_mutated_tensors._interformer = True
    wrap.get_mutated_tensors = get_mutated_tensors


#: calls whose arguments can carry a pointer on to the pointer they return
_POINTER_CALLS = frozenset({"where", "multiple_of", "max_contiguous", "advance", "make_block_ptr"})


def written_params(fn, _seen=None) -> frozenset:
    """The parameters of the Triton function ``fn`` (its Python source) that can reach the pointer
    operand of a ``tl.store`` or ``tl.atomic_*``, directly, through local assignments, or through
    a call to another ``@triton.jit`` function whose such parameter they are passed as.

    Syntactic, and exact only for kernels written as this package's are: a name counts if it appears
    in the pointer expression or in what is assigned to a name that does, except inside the
    arguments of calls (a loaded value, a cast), which yield values, not pointers (``tl.where`` and
    the block-pointer helpers pass pointers through and are followed); constexpr branches are not
    resolved, so an output written only in some configurations counts. It would miss a helper
    called through an attribute (``module.helper(...)``), a pointer cast (``ptr.to(...)``), a
    store through a tensor descriptor, and a store through a pointer a helper returns (the kernels
    form such addresses themselves and take offsets from pointer-free helpers, e.g. attention's
    ``_pivot_half``); the kernels here use none of these. Used for the interpreter's
    stand-in kernels, where Triton's own IR cannot be built; ``tests/test_compile_inline.py`` checks
    it against every kernel an inlined op launches."""
    import ast
    import inspect
    import textwrap

    _seen = {} if _seen is None else _seen
    if fn in _seen:
        return _seen[fn]
    _seen[fn] = frozenset()  # recursion guard
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
    params = [a.arg for a in node.args.args]

    def names(expr):
        found = set()

        def visit(e):
            if isinstance(e, ast.Name):
                found.add(e.id)
            elif isinstance(e, ast.Call):
                if isinstance(e.func, ast.Attribute) and e.func.attr in _POINTER_CALLS:
                    for a in (*e.args, *(k.value for k in e.keywords)):
                        visit(a)
            else:
                for child in ast.iter_child_nodes(e):
                    visit(child)
        visit(expr)
        return found

    assigned = {}  # local name -> names its values come from
    sinks = set()
    for n in ast.walk(node):
        if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and n.value is not None:
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        assigned.setdefault(t.id, set()).update(names(n.value))
        if not isinstance(n, ast.Call):
            continue
        if isinstance(n.func, ast.Attribute) and (n.func.attr == "store" or n.func.attr.startswith("atomic_")):
            pointer = n.args[0] if n.args else next((k.value for k in n.keywords if k.arg == "pointer"), None)
            if pointer is not None:
                sinks |= names(pointer)
        elif isinstance(n.func, ast.Name):
            helper = getattr(fn, "__globals__", {}).get(n.func.id)
            inner = getattr(helper, "fn", None)
            if inner is None or not callable(inner):
                continue
            inner_params = [a for a in inspect.signature(inner).parameters]
            written = written_params(inner, _seen)
            for i, a in enumerate(n.args):
                if i < len(inner_params) and inner_params[i] in written:
                    sinks |= names(a)
            for k in n.keywords:
                if k.arg in written:
                    sinks |= names(k.value)
    reached, todo = set(), list(sinks)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(assigned.get(name, ()))
    result = frozenset(p for p in params if p in reached)
    _seen[fn] = result
    return result
