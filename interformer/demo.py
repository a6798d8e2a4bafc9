"""The demo behind ``make demo`` / ``python -m interformer demo``.

1. Builds the default InterFormer CTR model (DESIGN §3 defaults).
2. Runs it with the eager path and with the fused Triton path on one batch, prints how far
   apart logits, loss and parameter gradients are, and the forward+backward throughput of both.
   On a GPU this is the real kernels at the default size; on a CPU the kernels run under Triton's
   interpreter, which is slow, so the check uses a small copy of the model and a small batch.
3. Trains the default model briefly on the bundled synthetic data and prints held-out AUC,
   LogLoss and throughput (samples/s) for training and inference, eager and fused.
"""

from __future__ import annotations

import copy
import math
import os
import time

import torch

from . import optimize
from .backend import triton_available
from .config import InterFormerConfig
from .data import check_seed, iterate_batches, make_synthetic
from .backend import FusedModule
from .metrics import auc, logloss
from .model import InterFormerCTR
from .train import check_device, interactive_stderr, on_device, parse_device


def _progress(iterable, total, desc, disable):
    """A tqdm bar over ``iterable``, or ``iterable`` itself with ``--no-progress`` or when stderr is
    not interactive (:func:`interformer.train.interactive_stderr`): then no bar, no monitor thread,
    and no loss read back to the host each step for the bar's postfix."""
    if disable or not interactive_stderr():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fused_ops_missing(model: torch.nn.Module) -> list:
    """Names of the modules in ``model`` that have no fused kernel yet."""
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, FusedModule) and not m.has_kernels()})


def optimize_available(model: torch.nn.Module) -> torch.nn.Module:
    """``optimize(model, "triton")``, leaving modules whose kernel does not exist yet on eager."""
    optimize(model, "triton")
    for m in model.modules():
        if isinstance(m, FusedModule) and not m.has_kernels():
            m.backend = "eager"
    return model


def compare_paths(config: InterFormerConfig, batch, device: torch.device) -> dict:
    """Eager vs fused on one batch: relative differences of logits, loss and every parameter gradient."""
    eager = InterFormerCTR(copy.deepcopy(config)).to(device)
    optimize(eager, "eager")
    fused = optimize_available(copy.deepcopy(eager))
    b = batch.to(device)
    out, sps = {}, {}
    for name, model in (("eager", eager), ("fused", fused)):
        logits = model(*b.inputs())
        loss = model.loss(logits, b.label)
        loss.backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        out[name] = (logits.detach(), loss.detach(), grads)
        sps[name] = _step_throughput(model, b, device)
    (le, se, ge), (lf, sf, gf) = out["eager"], out["fused"]
    # Some gradients are zero in exact arithmetic (an attention key bias shifts every score of a row
    # equally, and softmax ignores that) and hold only rounding noise on both paths; each parameter's
    # error is therefore taken relative to max(its gradient norm, 1e-6 x the norm of all gradients).
    # A NaN error is the worst (Python's max() drops a NaN that is not first) and a gradient on one
    # path only is an infinite error (it was skipped): a review's find, 2026-11-29.
    total = torch.sqrt(sum(g.double().pow(2).sum() for g in ge.values() if g is not None))
    errors = [math.inf if (gf[n] is None) != (g is None) else
              float((gf[n].double() - g.double()).norm() / torch.maximum(g.double().norm(), 1e-6 * total))
              for n, g in ge.items() if g is not None or gf[n] is not None]
    grad_err = math.nan if any(math.isnan(e) for e in errors) else max(errors, default=0.0)
    return {"logits": _rel(lf, le), "loss": _rel(sf, se), "max_grad": grad_err,
            "eager_sps": sps["eager"], "fused_sps": sps["fused"]}


def _step_throughput(model, b, device, steps: int = 2) -> float:
    """Samples/s of forward + backward on batch ``b`` (after the untimed step already taken)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autograd.set_multithreading_enabled(False):  # as the trainer runs it (train.py)
            model.loss(model(*b.inputs()), b.label).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * len(b) / (time.perf_counter() - t0)


#: steps of a training run left out of its throughput: the first calls compile the Triton kernels
#: (seconds each on a GPU) and set up cuBLAS and the caching allocator, which would otherwise be
#: charged to the fused path's samples/s. An evaluation leaves out its first batch (the forward
#: kernels for its batch size).
WARMUP_STEPS = 3


class _Throughput:
    """Samples/s over the steps after the first ``warmup``; over every step when there are no more
    than that (then the warm-up is in the number)."""

    def __init__(self, device: torch.device, warmup: int = WARMUP_STEPS) -> None:
        self.device, self.warmup, self.steps, self.samples, self.t0 = device, warmup, 0, 0, time.perf_counter()
        self.all_samples, self.all_t0 = 0, self.t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, samples: int) -> None:
        """Count one finished step of ``samples`` samples."""
        self.steps += 1
        self.all_samples += samples
        if self.steps == self.warmup:
            self._sync()
            self.t0 = time.perf_counter()
        elif self.steps > self.warmup:
            self.samples += samples

    def rate(self) -> float:
        self._sync()
        now = time.perf_counter()
        if self.samples:
            return self.samples / (now - self.t0)
        return self.all_samples / (now - self.all_t0)


EVAL_BATCH = 1024  # the held-out samples' batch size


def warmup_note(args) -> str:
    """What the printed samples/s leave out (:class:`_Throughput`: nothing where a run has no step
    past its warm-up)."""
    steps = args.epochs * -(-args.train_samples // args.batch_size)
    parts = [f"the first {WARMUP_STEPS} training steps" if steps > WARMUP_STEPS else "",
             "the first inference batch" if args.test_samples > EVAL_BATCH else ""]
    parts = [p for p in parts if p]
    if not parts:
        return "samples/s include every step, warm-up too: too few steps to leave any out"
    return "samples/s leave out " + " and ".join(parts) + ": warm-up (on a GPU, kernel compilation too)"


def train(model, data, args, desc: str, device) -> float:
    """``args.epochs`` passes of AdamW over ``data``; returns training samples/s (after the first
    :data:`WARMUP_STEPS` steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    n_batches = (len(data) + args.batch_size - 1) // args.batch_size
    meter = _Throughput(device)
    for epoch in range(args.epochs):
        bar = _progress(iterate_batches(data, args.batch_size, True, args.seed + epoch), n_batches, f"{desc} epoch {epoch + 1}", args.no_progress)
        for batch in bar:
            b, checked = on_device(batch, device, model)  # on a GPU: checked on the host, before the copy
            with checked:
                loss = model.loss(model(*b.inputs()), b.label)
            opt.zero_grad(set_to_none=True)
            with torch.autograd.set_multithreading_enabled(False):  # as the trainer runs it (train.py)
                loss.backward()
            opt.step()
            meter.step(len(b))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.4f}")
    return meter.rate()


@torch.no_grad()
def evaluate(model, data, batch_size: int, device):
    """Logits over ``data`` and inference samples/s (after the first batch)."""
    model.eval()
    logits = []
    meter = _Throughput(device, warmup=1)
    for batch in iterate_batches(data, batch_size, shuffle=False):
        b, checked = on_device(batch, device, model)
        with checked:
            logits.append(model(*b.inputs()).float())
        meter.step(len(batch))
    return torch.cat(logits).cpu(), meter.rate()


class DemoSettingError(ValueError):
    """A demo setting that cannot run (a count, the learning rate, the seed or the device), found before
    any work; ``python -m interformer demo`` reports it as a usage error of the flag."""


def _check_counts(args) -> None:
    """The count settings must be >= 1 (the command line's type already says so; this catches a
    hand-built ``args``): a batch size of 0 divided by zero, a negative one trained on nothing and
    printed numbers, and no held-out samples failed in ``torch.cat``."""
    for name in ("train_samples", "test_samples", "batch_size", "epochs"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DemoSettingError(f"{name} must be a positive integer, got {value!r}")


#: the largest seed ``torch.Generator.manual_seed`` takes
_GENERATOR_MAX_SEED = 2**64 - 1


def _check_lr_and_seed(args) -> None:
    """``--lr`` must be a finite number >= 0 (AdamW takes an infinite one, and the run then printed a
    table of NaNs) and ``--seed`` an integer whose every derived seed fits the generators (at most
    ``2**64 - 1``): ``seed + 7`` (the fused check's batch; :func:`~interformer.data.check_seed`'s
    range) and ``seed + epoch``, the batch order of each epoch, so ``seed + epochs - 1`` too. A
    ValueError naming the setting, before any work. (The epochs' seeds were once left out: ``--seed
    2**64 - 8 --epochs 9`` passed the check and failed in its ninth epoch with torch's "Overflow when
    unpacking long long". Called after :func:`_check_counts`, so ``epochs`` is a positive integer.)"""
    lr = args.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise DemoSettingError(f"lr must be a finite number >= 0, got {lr!r}")
    try:
        seed = check_seed(args.seed)
    except ValueError as e:
        raise DemoSettingError(str(e)) from None
    if seed + args.epochs - 1 > _GENERATOR_MAX_SEED:
        raise DemoSettingError(f"seed must be at most 2**64 - epochs ({_GENERATOR_MAX_SEED + 1 - args.epochs}) for "
                               f"{args.epochs} epochs, whose batch orders are seeded with seed + epoch (the "
                               f"generators take up to 2**64 - 1), got {args.seed}")


def demo_device(name) -> torch.device:
    """The device ``--device name`` names (None or empty, as ``train``, ``evaluate`` and ``score`` read
    an empty one: cuda when available, else cpu): a CPU or an existing
    CUDA device, else ValueError saying why (before any work: an unknown name, a device type the demo
    does not run on, such as ``meta``, which it took for the CPU, or cuda where there is none, which
    failed after the header with torch's "Torch not compiled with CUDA enabled")."""
    if name is None or name == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # the train command's checks: cpu or cuda, then CUDA there and a GPU of that index
        device = parse_device(name)
        check_device(device)
    except ValueError as exc:
        raise DemoSettingError(str(exc)) from None
    return device


def _interpreter_on() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (``python -m interformer demo`` sets
    it before triton is imported whenever the demo runs on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")  # as Triton reads it


def agreement_tolerance(device: torch.device) -> float:
    """The bound the eager-vs-fused check holds each relative difference to: a bound for a whole model
    in fp32, chosen by this project, not DESIGN §5's, which bounds each op (fp32: 1e-5 under the
    interpreter, 1e-3 on a GPU). On a GPU it is 1e-3, the per-op bound there (tf32 allowed where
    documented); on the CPU 1e-4, ten times the interpreter's per-op bound: each fp32 op meets 1e-5
    there, and a whole model's logits, loss and gradients sum the errors of many ops."""
    return 1e-3 if device.type == "cuda" else 1e-4


def run_demo(args) -> bool:
    """Run the demo; False when the eager and fused paths disagree past
    :func:`agreement_tolerance` (``python -m interformer demo`` then exits 1), True otherwise."""
    _check_counts(args)
    _check_lr_and_seed(args)
    device = demo_device(args.device)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = InterFormerConfig(backend="eager")
    print(f"InterFormer demo on {device} (torch {torch.__version__})")
    print(f"  config: d_model={config.d_model} heads={config.num_heads} layers={config.num_layers} "
          f"n_tokens={config.n_tokens} T={config.max_seq_len} backbone={config.backbone} pffn={config.pffn_mode}")

    # --- 1. eager vs fused agreement -------------------------------------------------------
    fused_ok, checked, agree = triton_available(), False, True
    if fused_ok and device.type != "cuda" and not _interpreter_on():
        # real Triton cannot launch on CPU tensors, even where a GPU exists
        print("  fused path: on the CPU the kernels need Triton's interpreter (TRITON_INTERPRET=1 before "
              "triton is imported; `python -m interformer demo` sets it), skipping the eager-vs-fused check")
    elif fused_ok:
        probe = InterFormerCTR(config)
        missing = fused_ops_missing(probe)
        if missing:
            print(f"  fused path: no kernel yet for {', '.join(missing)} (those run eagerly)")
        if device.type == "cuda":
            check_cfg, check_batch, where = config, make_synthetic(512, config, seed=args.seed + 7), "default size, CUDA"
        else:
            check_cfg = InterFormerConfig(d_model=16, num_heads=1, num_layers=1, max_seq_len=8, pffn_hidden=32,
                                          head=(32,), dcn_rank=4, backend="eager")
            check_batch, where = make_synthetic(4, check_cfg, seed=args.seed + 7), "small copy under the Triton interpreter"
        t0 = time.perf_counter()
        diff, checked = compare_paths(check_cfg, check_batch, device), True
        print(f"  eager vs fused ({where}, {time.perf_counter() - t0:.1f}s): rel. diff logits {diff['logits']:.2e}, "
              f"loss {diff['loss']:.2e}, worst parameter gradient {diff['max_grad']:.2e}")
        tol = agreement_tolerance(device)
        agree = all(diff[k] <= tol for k in ("logits", "loss", "max_grad"))  # (False for a NaN)
        print(f"  {'they agree' if agree else 'THEY DISAGREE'}: each difference must be at most {tol:g} (the "
              "demo's bound for a whole model, not DESIGN §5's per-op one: fp32 1e-5 interpreted, 1e-3 on a GPU)")
        print(f"  forward+backward on that batch: eager {diff['eager_sps']:,.1f} samples/s, "
              f"fused {diff['fused_sps']:,.1f} samples/s")
        if device.type != "cuda":
            print("  (CPU: the fused kernels run in Triton's interpreter, which emulates them in Python; "
                  "these numbers show that the path works, not how fast it is on a GPU)")
    else:
        print("  fused path: triton is not installed, skipping the eager-vs-fused check")

    # --- 2. brief training on synthetic data ----------------------------------------------
    train_data = make_synthetic(args.train_samples, config, seed=args.seed)
    test_data = make_synthetic(args.test_samples, config, seed=args.seed + 1)
    print(f"  synthetic data: {len(train_data)} train / {len(test_data)} held-out samples, "
          f"click rate {train_data.label.mean():.3f}")
    rows = []
    paths = [("eager", "eager")]
    if fused_ok and device.type == "cuda":
        paths.append(("fused", "triton"))
    for name, backend in paths:
        torch.manual_seed(args.seed)
        model = InterFormerCTR(config).to(device)
        model = optimize_available(model) if backend == "triton" else optimize(model, backend)
        train_sps = train(model, train_data, args, name, device)
        logits, infer_sps = evaluate(model, test_data, EVAL_BATCH, device)
        rows.append((name, auc(logits, test_data.label), logloss(logits, test_data.label), train_sps, infer_sps))
    print()
    print(f"  {'path':<6} {'AUC':>7} {'LogLoss':>8} {'train samples/s':>16} {'infer samples/s':>16}")
    for name, a, ll, tr, inf in rows:
        print(f"  {name:<6} {a:>7.4f} {ll:>8.4f} {tr:>16,.0f} {inf:>16,.0f}")
    for name, a, ll, *_ in rows:  # a bare nan in the table, said why (as `train` and `evaluate` do)
        if math.isnan(a):
            label = test_data.label
            why = ("the test samples hold one label class only, and AUC needs both (more --test-samples)"
                   if bool((label == label[0]).all()) else "the model's scores are not all finite (a lower --lr?)")
            print(f"  note: the {name} path's AUC is undefined: {why}")
    print(f"  ({warmup_note(args)})")
    if device.type != "cuda":
        print("\n  note: on a CPU only the eager path trains here; the fused kernels need a GPU to be fast" +
              (" (the fused throughput above is Triton's interpreter, a correctness check)." if checked else "."))
    if not agree:
        print("\n  the eager and fused paths disagree (see the check above): exit status 1")
    return agree
