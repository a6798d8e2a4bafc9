"""Backend selection for fused-capable modules.

Every fused-capable module takes ``backend=`` with one of:

* ``"auto"``   -- Triton when the module's parameters live on a CUDA device in a dtype the kernels
  take (fp32, fp16, bf16) and Triton imports, the eager reference otherwise (CPU tensors never go
  through the Triton interpreter by accident; a float64 model runs as it would in eager).
* ``"eager"``  -- always the plain PyTorch reference of :mod:`interformer.reference`.
* ``"triton"`` -- always the fused kernels of :mod:`interformer.kernels`; on CPU tensors this needs
  ``TRITON_INTERPRET=1`` set before Triton is imported (without it the first fused op raises a
  RuntimeError that says so: ``kernels._common.device_guard``).

Decision: ``"auto"`` looks at the module's *parameters*, not at the input tensor. Parameters are
real tensors even while ``torch.fx.symbolic_trace`` or ``torch.compile`` traces the forward, so the
choice never depends on a traced value and the traced graph holds the op that will actually run.

The process-wide default for newly built modules comes from the environment variable
``INTERFORMER_BACKEND`` (``auto`` when unset). Names are case-insensitive everywhere (argument,
config or environment), and ``None`` means that default.

Under ``torch.compile`` a fused Triton op is a custom op: an opaque node in Inductor's graph, which
Inductor can neither fuse with its neighbours nor schedule into, and which costs a dispatch per
call. Where Inductor's own code for the reference math is as fast, the reference is the better
choice inside a compiled model. :func:`set_compile_reference_ops` names the ops that, while
``torch.compile`` (or ``torch.export``) traces a fused-capable module, take the eager reference
whatever the module's backend; outside tracing nothing changes. The default is
:data:`DEFAULT_COMPILE_REFERENCE`, ``{"add_layer_norm", "cross_net", "feed_forward",
"grouped_embedding", "low_rank_cross_net"}``. ``feed_forward`` (the fused ``Linear -> SiLU ->
Linear`` block) is in it: before the op existed a compiled model handed those layers to Inductor
(cuBLAS GEMMs, SiLU fused into a neighbour), and the first GPU timing of the op keeps it so
(an H200, 2026-11-28: graphed forward+backward at ``taobao`` 0.1515 ms fused against 0.1366 for
Inductor's code; ``bench/results/nvidia-h200-2026-11-28.md``). Decision, from device time measured op by op on an H200 (bf16,
``taobao``, forward+backward replayed from CUDA graphs, one process;
``bench/results/nvidia-h200-2026-11-27b.md``): Inductor's code for the reference took 0.99x the
fused time for the full-rank cross net and 0.88x for the low-rank one, and 1.4-4.5x longer for
attention, PMA, DOT, PFFN and the gated LCE; inside a compiled model a custom op also costs a
dispatch per call and stops Inductor fusing its neighbours into it. ``add_layer_norm`` was in the
default before that measurement and is a mixed result in it: Inductor took 0.86x and 0.96x the
fused time at the interaction and DHEN LayerNorms, 1.37x at the sequence one; it stays, since
Inductor can also fold the residual's producer (a bias add, an activation) into its fused add +
LayerNorm (with a split weight/bias reduction), which the op-level rows do not show. ``grouped_embedding`` (the tokenizers' one autograd node and one
``embedding_dense_backward`` for all tables: a ``torch.autograd.Function`` of aten ops, not a
custom op, which dynamo traces when the op is left out of the set) saves host time and launches in
plain and CUDA-graph runs; a compiled model keeps the per-table lookups, which Inductor handles
itself (the grouping is unmeasured under compile). The whole compiled model with this default is
not measured yet. The environment variable ``INTERFORMER_COMPILE_REFERENCE`` (read once, at import) sets the starting value: op names
separated by commas, ``none`` or ``all``; a value that names an unknown op fails the first module
construction (as a bad ``INTERFORMER_BACKEND`` does), not the import. The choice is read while tracing, so it is baked into a
compiled graph; dynamo guards on it, and a change recompiles on the next call. Calling an op
function of :mod:`interformer.kernels` directly is not affected.

What a compiled model does with the ops it keeps is :func:`set_compile_inline`'s (environment
variable ``INTERFORMER_COMPILE_INLINE``: ``auto``, ``1``/``0``, also true/false, yes/no, on/off; read
once at import). Inlined, an op is transparent, for the ops whose launchers allow it (attention,
PFFN, the gated LCE, DOT, add + LayerNorm, the feed-forward block): while AOTAutograd traces, each
such op is replaced by what its launcher does, its allocations as aten ops and its Triton launches
as ``torch.library.wrap_triton`` calls, so Inductor launches the same kernels from its own generated
code (no custom-op dispatch and none of this package's launcher code per call) and plans their
buffers with the rest of the graph. Otherwise it is one opaque custom op. The kernels and their
arguments are the launchers' own: under ``aot_eager`` the results are bitwise those of the custom
ops (tested on the CPU); under Inductor the aten ops around the launches become Inductor's code and
may round differently (a reduction, a cast), within the usual tolerance. Only graphs traced with
static sizes are inlined (the launchers pick block sizes from the sizes): after the recompile that
makes a compiled model's sizes dynamic (a second batch size), its graph keeps the custom ops, so
compile with ``dynamic=False`` where inlining matters. This is what ``torch.library.triton_op``
does, kept switchable here (``kernels/_dispatch.py``,
:func:`~interformer.kernels._dispatch.inline_when_compiled`).

The default, ``"auto"`` (``None``), inlines the calls whose tensors are on a CUDA device and keeps
the others opaque: Inductor launches Triton kernels on a GPU only, and a CPU graph (the interpreter)
with launches in it fails to compile there. ``True`` inlines on every device (for ``aot_eager`` on
the CPU, as the tests do), ``False`` never. Why inlined is the GPU default (plain compiled steps,
bf16, ``bench/results/``): on the H200, opaque, the compiled fused model lost to or tied with
``torch.compile`` of the eager model, ``taobao`` training 36.33 against 29.81 ms (``7bea4b3``) and
25.09 against 25.17 (``80ba0f2``), ``amazon`` training 31.39 against 25.33 (``6da4f2b``) and 26.91
against 20.53 (``80ba0f2``); on the H100 (``4648e15``) it won, 23.06 against 32.90. Inlined, on the
H200, it won or tied: ``taobao`` training 27.29 against 29.81 ms (``7bea4b3``, where opaque took
36.33 in the same process) and 23.12 against 30.75 (``5eea83c``), ``taobao`` inference 4.49 against
5.84, ``amazon`` training 20.74 against 22.57 and 23.75 against 20.02 (whichever ran second in the
process was the slower: a tie). Not yet timed inlined: ``mode="reduce-overhead"`` (opaque: 8.764
against 9.284 ms, ``7bea4b3``), which the default now inlines too.

Like the reference set, dynamo guards on the setting (a change recompiles on the next call), and it
is part of the compile caches' key with a hash of the kernels' source
(``torch.compiler.config.cache_key_tag``, :func:`_tag_compile_caches`). ``torch.export`` always
keeps the custom ops.
:func:`compile_inline` returns the setting (None by default, also where the ops do inline);
:func:`inlines_on` says what it does on a device.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
from pathlib import Path
from types import MethodType
from typing import Callable, Optional, Tuple

import torch
from torch.nn.modules.module import (_global_backward_hooks, _global_backward_pre_hooks, _global_forward_hooks,
                                     _global_forward_pre_hooks)

from . import reference

BACKENDS = ("auto", "eager", "triton")
ENV_VAR = "INTERFORMER_BACKEND"


#: dtypes the fused kernels take; ``"auto"`` leaves modules with other parameter dtypes on eager.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: every op a fused-capable module resolves (the second item of its ``kernel_ops`` pairs)
FUSED_OPS = ("gated_lce", "pffn_mlp", "pffn_linear", "cross_net", "low_rank_cross_net", "dot_interaction", "feed_forward",
             "attention", "pooled_attention", "add_layer_norm", "grouped_embedding")
COMPILE_ENV_VAR = "INTERFORMER_COMPILE_REFERENCE"
#: the ops a compiled model leaves to Inductor unless told otherwise (see the module docstring)
DEFAULT_COMPILE_REFERENCE = frozenset({"add_layer_norm", "cross_net", "feed_forward", "grouped_embedding",
                                       "low_rank_cross_net"})


def _compile_reference_set(ops, source: str) -> frozenset:
    """The op set that ``ops`` names: None or "default" the default, "none", "all", a comma-separated
    string or an iterable of names from :data:`FUSED_OPS`, any case (``source`` names the setting in
    errors)."""
    if ops is None:
        return DEFAULT_COMPILE_REFERENCE
    if isinstance(ops, str):
        word = ops.strip().lower()
        if word in ("", "default"):
            return DEFAULT_COMPILE_REFERENCE
        if word == "none":
            return frozenset()
        if word == "all":
            return frozenset(FUSED_OPS)
        ops = [name.strip() for name in word.split(",") if name.strip()]
    names = frozenset(name.strip().lower() if isinstance(name, str) else name for name in ops)
    unknown = sorted(str(n) for n in names - set(FUSED_OPS))
    if unknown:
        raise ValueError(f"{source}: unknown op(s) {unknown}; choose from {list(FUSED_OPS)}, 'none' or 'all'")
    return names


try:
    _COMPILE_REFERENCE = _compile_reference_set(os.environ.get(COMPILE_ENV_VAR), f"${COMPILE_ENV_VAR}")
    _COMPILE_ENV_ERROR = None
except ValueError as _exc:  # raised where a module is built (check_compile_environment), not at import
    _COMPILE_REFERENCE, _COMPILE_ENV_ERROR = DEFAULT_COMPILE_REFERENCE, str(_exc)


INLINE_ENV_VAR = "INTERFORMER_COMPILE_INLINE"
_FLAG_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
               "off": False, "auto": None, "": None}


def _inline_from_env():
    """``(setting, error)`` from ``$INTERFORMER_COMPILE_INLINE`` (unset: None, "auto")."""
    value = os.environ.get(INLINE_ENV_VAR, "")
    word = value.strip().lower()
    if word not in _FLAG_WORDS:
        return None, (f"${INLINE_ENV_VAR} must be one of auto, 1, 0, true, false, yes, no, on, off; "
                      f"got {value!r}")
    return _FLAG_WORDS[word], None


#: the inline setting's word in the compile caches' tag
_INLINE_WORDS = {True: "inline", False: "opaque", None: "auto"}
_TAG_PREFIX = "interformer-"


@functools.lru_cache(maxsize=None)
def _kernels_source_hash() -> str:
    """A short hash of the kernel modules' source (``interformer/kernels/*.py``: the kernels and
    their launchers, whose plans an inlined graph bakes in)."""
    spec = importlib.util.find_spec("interformer.kernels")  # (not imported: installed from kernels/)
    digest = hashlib.sha1()
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        for path in sorted(Path(folder).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _tag_compile_caches(setting: Optional[bool]) -> None:
    """Put the inline setting and a hash of the kernels' source into
    ``torch.compiler.config.cache_key_tag`` (``interformer-<auto|inline|opaque>-<hash>``), keeping the
    user's own tag. Reason: the compile caches (AOTAutograd's and Inductor's, on disk) key a graph on
    what dynamo traced, which holds this package's custom ops and nothing of what they become. So
    without the setting in the tag they would hand back a graph compiled under another setting, and
    without the hash an inlined graph compiled by an earlier version of the kernels or their
    launchers (its kernels and block sizes baked in). A process that imports the package thus keys
    all of its compiled graphs on this tag (one cache miss per package version for the user's other
    models too). The launchers' module settings (``FUSED_MAX_FEATURES`` and the like, kept for
    measurement) are not in the key: change them only with the caches off or cleared."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):  # an older torch: no such key
        return
    parts = [p for p in config.cache_key_tag.split(";") if p and not p.startswith(_TAG_PREFIX)]
    config.cache_key_tag = ";".join(parts + [f"{_TAG_PREFIX}{_INLINE_WORDS[setting]}-{_kernels_source_hash()}"])


_COMPILE_INLINE, _INLINE_ENV_ERROR = _inline_from_env()
_tag_compile_caches(_COMPILE_INLINE)


def check_compile_environment() -> None:
    """Raise the ``ValueError`` of a bad ``$INTERFORMER_COMPILE_REFERENCE`` until
    :func:`set_compile_reference_ops` replaces it, and of a bad ``$INTERFORMER_COMPILE_INLINE`` until
    :func:`set_compile_inline` does (a fused-capable module is built under both settings)."""
    _check_reference_environment()
    _check_inline_environment()


def _check_reference_environment() -> None:
    if _COMPILE_ENV_ERROR is not None:
        raise ValueError(_COMPILE_ENV_ERROR)


def _check_inline_environment() -> None:
    if _INLINE_ENV_ERROR is not None:
        raise ValueError(_INLINE_ENV_ERROR)


def compile_inline() -> Optional[bool]:
    """How the custom ops a compiled model keeps are traced (see the module docstring): None (the
    default, "auto": inlined where their tensors are on a CUDA device, opaque elsewhere), True
    (inlined on every device) or False (opaque). Raises the error of a bad
    ``$INTERFORMER_COMPILE_INLINE`` (not of the other setting's variable: an op of
    :mod:`interformer.kernels` called directly in a compiled function reads this setting alone)."""
    _check_inline_environment()
    return _COMPILE_INLINE


def inlines_on(device: torch.device) -> bool:
    """Whether a compiled graph on ``device`` inlines the kept ops under the current setting."""
    return inline_decision(compile_inline(), (device.type,))


def inline_decision(setting: Optional[bool], device_types) -> bool:
    """Whether a traced op whose tensors are on ``device_types`` is inlined under ``setting``: True
    and False hold everywhere; None (the default) inlines where one of them is CUDA, since Inductor
    launches Triton kernels on a GPU only. The one rule :func:`inlines_on` and the inlining itself
    (``kernels/_dispatch.py``) apply."""
    return any(t == "cuda" for t in device_types) if setting is None else setting


def set_compile_inline(enabled: Optional[bool]) -> Optional[bool]:
    """Trace the kept custom ops into their Triton kernels (True), keep them opaque (False), or
    inline them where their tensors are on a CUDA device (None, the default); returns the previous
    setting. Process-wide; like :func:`set_compile_reference_ops`, dynamo guards on it where a
    fused-capable module picks its op, so a model compiled before a change recompiles on its next
    call (a compiled function that calls an op of :mod:`interformer.kernels` directly keeps its
    graph until ``torch.compiler.reset()``), and the compile caches are keyed on it
    (``torch.compiler.config.cache_key_tag``, :func:`_tag_compile_caches`). Inductor launches Triton kernels on a GPU only: on
    CPU tensors (the interpreter) a graph inlined by True runs under backends such as
    ``aot_eager``, and Inductor fails at compile time."""
    global _COMPILE_INLINE, _INLINE_ENV_ERROR
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_compile_inline: enabled must be a bool or None (auto), got {enabled!r}")
    previous = _COMPILE_INLINE
    _COMPILE_INLINE, _INLINE_ENV_ERROR = enabled, None  # an explicit setting replaces the environment's
    _tag_compile_caches(enabled)
    return previous


def compile_reference_ops() -> frozenset:
    """The ops that take the eager reference while ``torch.compile`` traces a fused-capable module."""
    _check_reference_environment()
    return _COMPILE_REFERENCE


def set_compile_reference_ops(ops) -> frozenset:
    """Make ``ops`` the ops that take the eager reference while ``torch.compile`` traces a
    fused-capable module (names from :data:`FUSED_OPS` in any case, as an iterable or one string
    separated by commas; ``"none"``; ``"all"``; None or ``"default"`` for the default,
    :data:`DEFAULT_COMPILE_REFERENCE`); returns the previous set, so a caller can restore it.

    Process-wide, and read at trace time: a model compiled before the change recompiles on its
    next call (dynamo guards on the setting). Unknown names raise ``ValueError``."""
    global _COMPILE_REFERENCE, _COMPILE_ENV_ERROR
    previous = _COMPILE_REFERENCE
    _COMPILE_REFERENCE = _compile_reference_set(ops, "set_compile_reference_ops")
    _COMPILE_ENV_ERROR = None  # an explicit setting replaces the environment's
    return previous


def check_backend(backend: Optional[str]) -> str:
    """The canonical (lower-case) backend name; None means :func:`default_backend`.

    A value that is not a string raises ``ValueError`` naming its type, not its ``repr``: the
    likeliest one is a model passed where the backend goes (``optimize("triton", model)``), whose
    ``repr`` would print the whole module tree into the message."""
    if backend is None:
        return default_backend()
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, one of {BACKENDS}; got an object of type "
                         f"{type(backend).__module__}.{type(backend).__qualname__}")
    value = backend.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return value


def default_backend() -> str:
    """The backend named by ``$INTERFORMER_BACKEND``, or ``"auto"``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"${ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# (kernel file, op) -> fused function or None. Filled outside tracing (module construction, a
# backend switch, or the first eager call), so that under torch.compile ``_op`` is a plain dict
# lookup: dynamo cannot trace ``importlib`` and would break the graph there.
_KERNELS: dict[tuple[str, str], Callable | None] = {}


def _kernel_function(module_name: str, op: str) -> Callable | None:
    """The fused implementation ``interformer.kernels.<module_name>.<op>``, or None if absent."""
    key = (module_name, op)
    if key in _KERNELS:
        return _KERNELS[key]
    fn = None
    if triton_available():
        try:
            mod = importlib.import_module(f"interformer.kernels.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"interformer.kernels.{module_name}":
                raise
        else:
            fn = getattr(mod, op, None)
    _KERNELS[key] = fn
    return fn


def global_module_hooks() -> bool:
    """Whether a global module hook is registered (``register_module_forward_hook`` and its pre-,
    backward and backward-pre kin): it would run around every module call."""
    return bool(_global_forward_hooks or _global_forward_pre_hooks or _global_backward_hooks
                or _global_backward_pre_hooks)


def called_as_defined(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs its class's ``forward`` and nothing else of its own: no hook on
    it (forward, forward pre, backward, backward pre), no ``forward`` or ``_call_impl`` set on the
    object, not compiled with ``Module.compile``. A fused path that reads a submodule's parameters
    instead of calling it is exact only then (with :func:`global_module_hooks` off, and a class whose
    ``forward`` the fused path stands for: the caller's check).

    The object's ``forward`` and ``_call_impl`` are compared with the class's through attribute
    reads, which dynamo guards (a ``forward`` set after a compiled call recompiles), not through
    ``module.__dict__``, on which it installs no guard (an embedding fuzzing helper's case: the
    compiled fused lookup ignored a table's new ``forward``). ``getattr(method, "__func__", None)``
    is avoided: dynamo does not return the class's function through it. A method bound to another
    object (``m.forward = other.forward``; a ``DataParallel`` replica, whose copied ``__dict__``
    keeps the original's) is not this module's: not as defined."""
    cls, forward, call = type(module), module.forward, module._call_impl
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or module._compiled_call_impl is not None
                or not (isinstance(forward, MethodType) and forward.__func__ is cls.forward
                        and forward.__self__ is module)
                or not (isinstance(call, MethodType) and call.__func__ is cls._call_impl and call.__self__ is module))


def resolve(module_name: str, op: str, backend: str, device: Optional[torch.device],
            dtype: Optional[torch.dtype] = None) -> Callable:
    """Pick the implementation of ``op`` for ``backend`` on ``device`` with parameters of ``dtype``
    (only ``"auto"`` reads them; a None dtype is not checked).

    The eager reference is ``interformer.reference.<op>``; the fused one is
    ``interformer.kernels.<module_name>.<op>`` with the same signature.
    """
    if backend == "eager":
        return getattr(reference, op)
    if backend == "auto" and (device.type != "cuda" or (dtype is not None and dtype not in KERNEL_DTYPES)):
        return getattr(reference, op)
    fn = _kernel_function(module_name, op)
    if fn is not None:
        return fn
    if backend == "auto":
        return getattr(reference, op)
    if not triton_available():
        raise ImportError(
            f"backend='triton' for op {op!r} needs the 'triton' package (pip install triton)"
        )
    raise NotImplementedError(f"no fused Triton kernel for op {op!r} yet (interformer.kernels.{module_name})")


def _reference_only() -> bool:
    """``interformer.kernels._dispatch.reference_only`` (imported when first needed: the kernels
    package imports this module)."""
    from .kernels._dispatch import reference_only

    return reference_only()


class FusedModule(torch.nn.Module):
    """Base class of modules with an eager and a fused path.

    Subclasses call ``self._op(kernel_module, op)`` in ``forward`` to get the implementation;
    the eager and fused paths share every parameter, so switching ``backend`` never touches the
    ``state_dict``.
    """

    #: ``(kernel file, function)`` pairs this module's forward may call; used by :meth:`has_kernels`.
    kernel_ops: tuple = ()
    #: names of the children whose parameters the forward reads instead of calling them (a hook on
    #: one of them makes the module call it: ``layers._read_as_called``); tools that hook modules
    #: to watch them (``profiling/step_ops.py``) leave these alone
    read_children: tuple = ()

    def __init__(self, backend: str | None = None, *args, **kwargs) -> None:
        # *args/**kwargs go to the next class in the MRO (e.g. nn.LayerNorm for ResidualLayerNorm)
        super().__init__(*args, **kwargs)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        check_compile_environment()
        self._backend = check_backend(value)
        self._load_kernels()

    def _load_kernels(self) -> None:
        """Resolve this module's kernels now, outside any trace (see ``_KERNELS``); nothing for eager."""
        if self._backend != "eager":
            for file, op in self.kernel_ops:
                _kernel_function(file, op)

    def __setstate__(self, state) -> None:
        """Unpickling (``torch.load`` of a whole model, ``copy.deepcopy``) restores ``_backend`` without
        the setter, so the kernels are resolved here too. Reason: in a fresh process ``_KERNELS`` is
        empty, and the first call of a loaded fused model under ``torch.compile`` would import the
        kernel file while dynamo traces, which it cannot (a graph break; an error with
        ``fullgraph=True``). The compile settings' environment is not checked here: a model that
        was built once is loaded as it was saved."""
        super().__setstate__(state)
        self._load_kernels()

    def _placement(self) -> Tuple[torch.device, Optional[torch.dtype]]:
        """Device and dtype of the module's parameters: its own first, then its children's, then
        any (a module with buffers only: their device, no dtype). Called on every forward under
        ``backend="auto"``; walking ``self.parameters()`` took 1.5-2 us per call on the CI CPU,
        this 0.1-0.2 us.

        An ``nn.DataParallel`` replica registers no parameters: ``replicate`` stores each copy on
        its GPU as a plain attribute and lists it in the replica's ``_former_parameters``, which
        is read when nothing else is found. Without it every replica would look like a CPU module
        and ``"auto"`` would run the eager reference on every GPU."""
        for p in self._parameters.values():
            if p is not None:
                return p.device, p.dtype
        for m in self._modules.values():
            if m is not None:
                for p in m._parameters.values():
                    if p is not None:
                        return p.device, p.dtype
        for p in self.parameters():
            return p.device, p.dtype
        for m in self.modules():  # a DataParallel replica (see above); plain modules have no such dict
            for p in getattr(m, "_former_parameters", {}).values():
                if p is not None:
                    return p.device, p.dtype
        for b in self.buffers():
            return b.device, None
        return torch.device("cpu"), None

    def _op(self, module_name: str, op: str) -> Callable:
        if torch.compiler.is_compiling():
            if op in _COMPILE_REFERENCE:
                return getattr(reference, op)  # left to Inductor (set_compile_reference_ops)
            if _COMPILE_INLINE is None:  # read while dynamo traces, so that it guards on the setting
                pass  # (AOTAutograd acts on it: kernels/_dispatch.py, inline_when_compiled)
        backend = self._backend
        if backend == "auto":
            return resolve(module_name, op, backend, *self._placement())
        if backend == "triton":
            device, dtype = self._placement()
            if device.type == "meta":
                # parameters without data (a model built on the meta device, run to infer shapes or
                # count FLOPs): the reference's aten ops have meta kernels, the launchers nothing to read
                return getattr(reference, op)
            if dtype is not None and dtype not in KERNEL_DTYPES and module_name != "embedding" and not _reference_only():
                # (the tokenizers' grouped lookups are aten ops and take any dtype; under a torch.func
                # transform, forward-mode AD or ONNX export the ops run their reference in any dtype)
                raise ValueError(
                    f"{type(self).__name__}: backend='triton' runs its kernels on float32, float16 and bfloat16 "
                    f"parameters, got {dtype}; backend='auto' runs other dtypes on the eager reference "
                    f"(interformer.optimize(model, 'auto')), as does backend='eager'")
        return resolve(module_name, op, backend, None)  # "eager" never looks at the device

    def has_kernels(self) -> bool:
        """True when every fused kernel this module needs is importable."""
        return all(_kernel_function(f, op) is not None for f, op in self.kernel_ops)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
