"""What each Triton kernel compiles to on an H100 (sm_90), found without a GPU.

Three parts:

* :func:`record_launches` -- a context manager that records every ``kernel[grid](...)`` launch made
  inside it as a *case*: the kernel's module and name, its constexprs, the types of its other
  arguments as Triton specialises them, ``num_warps`` / ``num_stages`` / ``maxnreg``. The launches are skipped
  (as with :func:`interformer.profiling.triton_launches` ``(run=False)``), so a whole training step
  at a benchmark shape costs only its eager parts, under the interpreter too: block sizes are
  chosen by the launchers from the shapes alone, never from the device, so the cases are the ones
  a GPU would compile (grid sizes, which are not part of a kernel's specialisation, aside).
* :func:`build_sm90` -- compiles cases ahead of time for ``GPUTarget("cuda", 90, 32)`` in child
  processes (without ``TRITON_INTERPRET``, which replaces ``triton.jit``) and reports, per case, the
  shared memory, the number of warp-group (``wgmma``) dots and async copies in the TTGIR, and from
  the cubin (``cuobjdump``, bundled with Triton's NVIDIA backend) the registers per thread, the
  stack frame, the spill store / load instructions in the SASS, the SASS instruction count
  (``instructions``) and ``sass_sha``, a fingerprint of
  the SASS instructions (addresses and encodings left out): a change meant to leave a kernel's
  machine code as it was (a refactor of its source) shows that it did when the fingerprints of
  ``profiling/sm90_audit.py --json`` before and after agree.
* :func:`inductor_writes` -- for the same cases, which pointer arguments ``torch.compile``'s
  analysis of a traced Triton kernel takes it to write (the graph copies each of them before the
  launch), found the way Inductor finds them, on the kernel's TTIR.

``profiling/sm90_audit.py`` runs the first two over a training step and prints the table; the tests use
:func:`build_sm90` to check shared-memory limits and compiler choices at chosen shapes, and
:func:`inductor_writes` to check that no inlined kernel has an input taken for an output. The result
depends on the Triton that compiles: run it with the version a GPU machine has (e.g. a second
environment on ``PYTHONPATH``) to see what that machine builds.

Case format (JSON-able): ``module``, ``kernel``, ``consts`` (name -> value), ``args`` (name -> a
dtype name for a pointer -- "fp32", "bf16", ... or torch's "float32", "bfloat16" --, a list of them
for a tuple of pointers, an int, a bool, a float, or None), optionally ``unaligned`` (pointers whose
address is not a multiple of 16: ``name``, or ``name[j]`` inside a tuple), options ``num_warps``
(4), ``num_stages`` (Triton's default) and ``maxnreg`` (no cap), and ``float_type``: how float
arguments are typed, "fp32" (the default: a plain launch) or "fp64" (Inductor launching a kernel of
a compiled graph, which types Python floats fp64 to keep their precision). Other pointers are taken
as 16-byte aligned. An int is specialised as Triton does: 1 becomes the constexpr 1, a multiple of 16 an i32 with that
divisibility, one outside int32 an i64; a bool is a u1; None is the constexpr None; an argument a
case does not name is a plain i32. A constexpr ``tl.dtype`` (a kernel's compute dtype) is
``{"tl_dtype": "bf16"}``; other constexprs that are not JSON values raise when recorded. Not
modelled: ``do_not_specialize`` (no kernel here uses it). Other keys pass through to the result.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Sequence

import torch

#: shared memory per block an H100 (and H200) allows, in bytes
H100_SHARED_MEMORY = 232448

_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
                 "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}
_ALIGNED = [["tt.divisibility", 16]]


def tl_dtype_name(spec):
    """The dtype's name of a case's ``{"tl_dtype": name}`` constexpr, else None."""
    return spec["tl_dtype"] if isinstance(spec, dict) and set(spec) == {"tl_dtype"} else None


def const_value(spec):
    """A case's constexpr as the kernel takes it: ``{"tl_dtype": name}`` is that ``tl.dtype``."""
    name = tl_dtype_name(spec)
    if name is not None:
        import triton.language as tl

        return tl.dtype(name)
    return spec


def triton_signature(case: dict, arg_names: Sequence[str]):
    """``(signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` from a case (see the
    module docstring), for a kernel whose parameters are ``arg_names``."""
    sig, consts, attrs = {}, {}, {}
    unaligned = set(case.get("unaligned", ()))
    for i, name in enumerate(arg_names):
        a = case.get("args", {}).get(name, 0)
        if name in case["consts"]:
            sig[name], consts[(i,)] = "constexpr", const_value(case["consts"][name])
        elif a is None or (type(a) is int and a == 1):  # Triton specialises these as constexprs
            sig[name], consts[(i,)] = "constexpr", a
        elif isinstance(a, list):  # a tuple of pointers
            sig[name] = tuple("*" + _TRITON_TYPES.get(t, t) for t in a)
            for j in range(len(a)):
                attrs[(i, j)] = [] if f"{name}[{j}]" in unaligned else _ALIGNED
        elif isinstance(a, str):  # a pointer
            sig[name], attrs[(i,)] = "*" + _TRITON_TYPES.get(a, a), [] if name in unaligned else _ALIGNED
        elif isinstance(a, float):  # a launch types a Python float fp32, Inductor fp64 (``float_type``)
            sig[name] = case.get("float_type", "fp32")
        elif isinstance(a, bool):
            sig[name] = "u1"
        else:
            sig[name] = "i32" if -2**31 <= a < 2**31 else "i64"
            attrs[(i,)] = _ALIGNED if a % 16 == 0 else []
    return sig, consts, attrs


#: the launch options a case records and a build passes on (``maxnreg``: a register cap per thread)
_OPTIONS = ("num_warps", "num_stages", "maxnreg")

_BUILD_SCRIPT = r"""
import hashlib, importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from interformer.kernel_audit import _OPTIONS, triton_signature

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cubin_usage(cubin):
    if not os.path.exists(CUOBJDUMP):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if not m:
        return {}
    # the instructions alone (no addresses, encodings or file headers): equal for equal machine code
    instructions = "\n".join(i.strip() for i in re.findall(r"/\*[0-9a-f]{4,}\*/\s*([^;]*;)", sass))
    return dict(registers=int(m.group(1)), stack=int(m.group(2)),
                spill_stores=len(re.findall(r"\bSTL\b", sass)), spill_loads=len(re.findall(r"\bLDL\b", sass)),
                sass_sha=hashlib.sha256(instructions.encode()).hexdigest()[:16],
                instructions=instructions.count(";"))


for case in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(case["module"]), case["kernel"])
    sig, consts, attrs = triton_signature(case, fn.arg_names)
    opts = {k: case[k] for k in _OPTIONS if k in case}
    opts.setdefault("num_warps", 4)
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    ir = k.asm["ttgir"]
    print(json.dumps(dict(case, shared=k.metadata.shared, wgmma=ir.count("warp_group_dot"),
                          async_copies=ir.count("async_copy"), **cubin_usage(k.asm["cubin"]))), flush=True)
"""


def build_sm90(cases: Sequence[dict], workers: int = 1, timeout: int = 900) -> List[dict]:
    """Compile each case (see the module docstring) for sm_90 in ``workers`` child processes; returns
    the cases, in the given order, with ``shared``, ``wgmma``, ``async_copies`` added, and
    ``registers``, ``stack``, ``spill_stores``, ``spill_loads`` where Triton ships ``cuobjdump``."""
    env, root = _child_env()
    workers = max(1, workers)
    indexed = [dict(case, _index=i) for i, case in enumerate(cases)]
    chunks = [c for c in (indexed[i::workers] for i in range(workers)) if c]

    def build(chunk):
        res = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(chunk)], env=env, cwd=root,
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"sm_90 build failed:\n{res.stderr[-3000:]}")
        return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]

    if not chunks:
        return []
    with ThreadPoolExecutor(len(chunks)) as pool:
        results = [r for rs in pool.map(build, chunks) for r in rs]
    if len(results) != len(cases):
        raise RuntimeError(f"{len(results)} sm_90 builds for {len(cases)} cases")
    return [{k: v for k, v in r.items() if k != "_index"} for r in sorted(results, key=lambda r: r["_index"])]


def _child_env():
    """``(environment, package root)`` for a child process that runs Triton's compiler: this one's
    environment without ``TRITON_INTERPRET`` (which replaces ``triton.jit``), the package importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([p for p in (env.get("PYTHONPATH"), root) if p])
    return env, root


_WRITES_SCRIPT = r"""
import importlib, inspect, json, logging, sys
import torch, triton
from triton.backends.compiler import GPUTarget


class Sm90Driver:  # all the analysis asks of a driver: the target to build the TTIR for (no GPU)
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


triton.runtime.driver.set_active(Sm90Driver())
from torch._higher_order_ops import triton_kernel_wrap as W

from interformer.kernel_audit import const_value

failures = []


class Failures(logging.Handler):  # the analysis logs its exception and takes every input as written
    def emit(self, record):
        failures.append(record.getMessage() + ("\n" + logging.Formatter().formatException(record.exc_info)
                                               if record.exc_info else ""))


logging.getLogger(W.__name__).addHandler(Failures())


def argument(spec, unaligned):
    if isinstance(spec, str):  # a pointer: a small CPU tensor of its dtype (16-byte aligned unless not)
        dtype = getattr(torch, spec)
        return torch.empty(64, dtype=dtype)[1:] if unaligned else torch.empty(64, dtype=dtype)
    return spec  # an int of the recorded class, a float, a bool, None


for case in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(case["module"]), case["kernel"])
    unaligned = set(case.get("unaligned", ()))
    consts = case["consts"]
    kwargs = {n: const_value(consts[n]) if n in consts else argument(case["args"].get(n, 0), n in unaligned)
              for n in fn.arg_names}
    failures.clear()
    if hasattr(W, "identify_accessed_tensors"):  # torch 2.12 on
        written = [d.name for d in W.identify_accessed_tensors(fn, kwargs, {}).read_writes.writes]
    elif len(inspect.signature(W.identify_mutated_tensors).parameters) == 3:
        written = W.identify_mutated_tensors(fn, kwargs, {})
    else:
        written = W.identify_mutated_tensors(fn, kwargs)
    # the tensors among them, as Inductor keeps them (an analysis may also name a scalar argument)
    written = [n for n in written if isinstance(kwargs.get(n), torch.Tensor)]
    print(json.dumps(dict(case, written=sorted(written), analysis_error="\n".join(failures))), flush=True)
"""


def inductor_writes(cases: Sequence[dict], timeout: int = 600) -> List[dict]:
    """Which pointer arguments Inductor takes each case's kernel to write: the analysis that
    ``torch.compile`` runs on a user-defined Triton kernel it traces (torch's ``triton_kernel_wrap``,
    on the kernel's TTIR for sm_90 before inlining), run in a child process without a GPU. A traced
    launch copies every argument found here before the kernel runs (``tensors_to_clone``), so an
    input taken for an output costs a copy per launch in every compiled graph that inlines the op.
    Returns the cases, in order, with ``written`` (sorted names) and ``analysis_error`` (the
    analysis's logged failure, after which it takes every pointer as written; "" when none).
    Pointers are described by dtype as :func:`record_launches` records them; tuples of pointers
    (the cross nets' kernels, which no compiled graph inlines) are not supported."""
    env, root = _child_env()
    res = subprocess.run([sys.executable, "-c", _WRITES_SCRIPT], input=json.dumps(list(cases)), env=env, cwd=root,
                         capture_output=True, text=True, timeout=timeout)  # on stdin: no limit on an argument's length
    if res.returncode != 0:
        raise RuntimeError(f"the write analysis failed:\n{res.stderr[-3000:]}")
    results = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    if len(results) != len(cases):
        raise RuntimeError(f"{len(results)} write analyses for {len(cases)} cases")
    return results


def _constexpr_names(fn) -> set:
    """The parameters of a ``@triton.jit`` function annotated ``tl.constexpr`` (strings under
    ``from __future__ import annotations``)."""
    return {name for name, p in inspect.signature(fn).parameters.items()
            if "constexpr" in str(p.annotation)}


def _arg_spec(value):
    if isinstance(value, torch.Tensor):
        return str(value.dtype).replace("torch.", "")
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [str(v.dtype).replace("torch.", "") for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and value != 1:
        # only the class Triton specialises on matters: int32 or int64, a multiple of 16 or not
        wide = 0 if -2**31 <= value < 2**31 else 2**31
        return wide + (16 if value % 16 == 0 else 17)
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    raise TypeError(f"cannot describe a kernel argument of type {type(value).__name__}")


def _unaligned(args: dict) -> List[str]:
    """Pointer arguments whose address is not a multiple of 16 (Triton gives those no divisibility):
    ``name`` or, inside a tuple, ``name[j]``."""
    out = []
    for name, value in args.items():
        if isinstance(value, torch.Tensor) and value.data_ptr() % 16:
            out.append(name)
        elif isinstance(value, (tuple, list)):
            out += [f"{name}[{j}]" for j, v in enumerate(value) if isinstance(v, torch.Tensor) and v.data_ptr() % 16]
    return out


def _const_spec(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    raise TypeError(f"cannot describe a constexpr of type {type(value).__name__} as JSON")


#: SMs of an H100 SXM (the H200 has the same)
H100_SMS = 132


def gpu_sized_patches(sms: int = H100_SMS) -> List[tuple]:
    """``(module, attribute, replacement)`` for every kernel module's ``num_sms`` and
    ``persistent_programs``, so that launchers size their grids, and choose what depends on the SM
    count (the gated LCE's dgate_weight strategy), as on a GPU with ``sms`` SMs."""
    from interformer.kernels import kernel_modules

    replacements = (("num_sms", lambda device: sms), ("persistent_programs", lambda device: 4 * sms))
    return [(mod, attr, value) for mod in kernel_modules() for attr, value in replacements if hasattr(mod, attr)]


@contextlib.contextmanager
def gpu_sized(sms: int = H100_SMS) -> Iterator[None]:
    """Inside the block, the launchers act as on a GPU with ``sms`` SMs (:func:`gpu_sized_patches`)."""
    patches = gpu_sized_patches(sms)
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in patches]
    for mod, attr, value in patches:
        setattr(mod, attr, value)
    try:
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


@contextlib.contextmanager
def record_launches() -> Iterator[List[dict]]:
    """Record (and skip) every Triton launch inside the block as a case for :func:`build_sm90`;
    yields the list, filled as launches happen. Duplicates stay: see :func:`unique_cases`."""
    from interformer.profiling import replaced_triton_run

    cases = []

    def record(self, *args, grid=None, warmup=False, **kwargs):
        fn = self.fn
        names = list(self.arg_names)
        constexprs = _constexpr_names(fn)
        bound = dict(zip(names, args))
        options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        bound.update(kwargs)
        plain = {n: bound[n] for n in names if n not in constexprs and n in bound}
        case = dict(module=fn.__module__, kernel=fn.__name__,
                    consts={n: _const_spec(bound[n]) for n in names if n in constexprs and n in bound},
                    args={n: _arg_spec(v) for n, v in plain.items()}, **options)
        unaligned = _unaligned(plain)
        if unaligned:
            case["unaligned"] = unaligned
        dims = grid(bound) if callable(grid) else grid
        case["programs"] = math.prod(int(g) for g in (dims if isinstance(dims, (tuple, list)) else (dims,)))
        cases.append(case)
        return None

    with replaced_triton_run(lambda original: record):
        yield cases


def unique_cases(cases: Sequence[dict]) -> List[dict]:
    """One case per distinct specialisation, in first-seen order, with its number of ``launches``
    and, from the recorded grids, the most ``programs`` any of them had."""
    seen: Dict[str, dict] = {}
    for case in cases:
        key = json.dumps({k: v for k, v in case.items() if k != "programs"}, sort_keys=True)
        programs = case.get("programs", 0)
        if key in seen:
            seen[key]["launches"] += 1
            seen[key]["programs"] = max(seen[key]["programs"], programs)
        else:
            seen[key] = dict(case, launches=1, programs=programs)
    return list(seen.values())


def occupancy(build: dict, sms: int = H100_SMS) -> dict:
    """From a build's registers, shared memory and warps: programs one SM holds at once
    (``blocks_per_sm``, by the H100's limits, as the CUDA occupancy calculator counts:
    :func:`interformer.kernels._common.programs_per_sm`), and for the recorded grid (``programs``)
    the ``waves`` it takes and the warps resident per SM in the first (``resident_warps``; 64 is the
    most an SM holds). Memory-bound kernels want many."""
    from interformer.kernels._common import programs_per_sm

    warps = build.get("num_warps", 4)
    per_sm = programs_per_sm(build["registers"], build["shared"], warps)
    programs = build.get("programs", 0)
    on_one_sm = min(per_sm, -(-programs // sms)) if programs else per_sm
    return dict(blocks_per_sm=per_sm, waves=programs / (sms * per_sm) if per_sm else float("inf"),
                resident_warps=on_one_sm * warps)
