"""studies/bench.py — how much faster the fused mask_gather op (csrc/) is than the reference,
what the paper's training steps cost, and what the deployed segmenter costs per input.

Times torch.ops.maskmentor.mask_gather against masking.mask_gather_reference on the same
inputs, in one run: the forward alone, and forward + backward (the gradient w.r.t. x),
at two shapes:

    tiny   B=32, K=3, N=64,  D=128, V=32    (the CI-sized model)
    vit-b  B=12, K=3, N=196, D=768, V=98    (MultiMAE ViT-B at 224/16: 98 of 3x196 visible)

in fp32 and bf16. The per-modality counts are real Dirichlet splits of V
(masking.dirichlet_visible_counts), so modalities get unequal shares, as in training.

Each timing is the median of --reps repetitions after a warm-up; the op and the
reference alternate within a repetition, so that a noisy machine slows both alike. On
CUDA the forward's achieved bandwidth (bytes read + written / time) is also reported, as
a fraction of the GPU's peak (queried, or --peak_gbps).

    python studies/bench.py                      # CPU
    python studies/bench.py --device cuda --reps 200
    python studies/bench.py --threads 1          # single-threaded CPU kernels
    python studies/bench.py --steps none         # skip the end-to-end pre-training steps

Then, end to end: one pre-training step (sttp.mim: masking, forward, the pixel losses,
backward, AdamW) of the `tiny` and `base` models with the op and with the reference,
alternating, so the op's share of a whole training step is visible too.

With --cost base (or tiny), the paper's training steps at the preset's sizes (base: ViT-B
at 224/16, batch 12; fine-tuning batch 2 on 640 crops): one MIM, one M²IM and one STTP
batch (3 teacher + 1 student steps), with the op and with the reference, and one
fine-tuning step. For each: seconds, images/s, peak memory (GPU: max allocated; CPU: the
process's max RSS so far), FLOPs (torch.utils.flop_counter), and where the time goes
(data / forward / backward / optimizer, from a torch.profiler trace of the training
code's record_function ranges). From these, an ESTIMATE of the paper's whole schedule in
H100-hours at an assumed utilisation (--peak_tflops, --mfu), and the same schedule
extrapolated from the step times measured here.

    python studies/bench.py --device cuda --cost base
    python studies/bench.py --cost base --cost_reps 1 --steps none    # CPU: ~20 min, ~18 GB (fine-tuning)

With --memory base (or tiny): the peak memory of one fine-tuning step at the preset's sizes
(base: ViT-B, 640x640, batch 2) as it is, with --grad_ckpt, with --accum_steps 2 and with
both, each in a fresh process (a process's peak RSS never goes down), beside the memory
held before the step (weights, optimiser state, the batch), and the step's time.

    python studies/bench.py --memory base --steps none     # CPU: ~10 min, up to ~17 GB

--gpu_check is the ready check for a machine with a GPU, one command under 10 minutes:
it builds the CUDA op in place, runs `pytest -m gpu`, the op benchmark (forward bandwidth
as a fraction of the device's peak), one bfloat16 pre-training batch of each objective and
one fine-tuning step of the base preset (images/s, peak memory), the --memory table, and,
with two or more GPUs, a 2-process NCCL run of train.py with --stop_after.

    python studies/bench.py --gpu_check

With --compile_steps all (or tiny), eager against --compile (util/runtime.Runtime: the
whole pass compiled with fullgraph=True) for the tiny preset at its training batch and
the base preset at batch 4: one MIM step, one STTP batch (3 teacher + 1 student steps) and
one fine-tuning step (at the pre-training image size), each in a fresh subprocess with
inductor's caches off, so that the compile time is a cold one. Per step: the median time
of --compile_reps steps after the first, the peak tensor memory of one more step above
what is live when it starts (GPU: max allocated; CPU: from a profile_memory trace,
`tensor_memory_peak`), compiled / eager ratios, and the compile time (the first call's
time minus a step's).

    python studies/bench.py --compile_steps all --steps none --reps 5    # CPU, idle machine
    python studies/bench.py --compile_steps tiny --compile_quick --compile_reps 2 --steps none --reps 2  # a check

With --deploy (a preset or a fine-tuned checkpoint), the segmenter a user deploys, as
evaluate.py runs it on one image of --deploy_size (padded to the fine-tuning crop, depth
standardised, forward, argmax): per input condition (rgb + depth, rgb only, depth only) its
parameters, GFLOPs (torch.utils.flop_counter), median latency and peak tensor memory, on
the CPU and, when one is visible, on CUDA; the three conditions are timed in turn in each
repetition, and the table gives each one's GFLOPs and latency over rgb + depth's.

    python studies/bench.py --deploy out/finetune/ckpt.pt --deploy_size 640x480
    python studies/bench.py --deploy base --deploy_reps 3         # ViT-B at NYU's 640x480

On CPU, torch allocates with malloc. glibc hands blocks this large (a ViT-B gradient is
22 MB) back to the kernel when they are freed, or not, depending on the process's
history; a fresh block costs a page fault per 4 KiB on first write (~5 ms per 22 MB on
a small VM), which made timings jump between runs by more than the ops themselves
cost. So by default the benchmark asks glibc to keep freed memory for reuse, as a
caching allocator would; --raw_malloc keeps glibc's defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.utils.flop_counter as flop_counter_lib
from torch.utils.flop_counter import FlopCounterMode

import masking
from util import ops

SHAPES = {
    "tiny": dict(B=32, K=3, N=64, D=128, V=32),
    "vit-b": dict(B=12, K=3, N=196, D=768, V=98),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def keep_freed_memory() -> str:
    """Make glibc reuse freed blocks instead of unmapping them (see the docstring)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # from glibc's malloc.h
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):                    # not glibc
        ok = False
    return "freed memory reused (mallopt)" if ok else "malloc defaults (mallopt unavailable)"


def make_inputs(B, K, N, D, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(B, K, dtype=torch.bool)                        # all modalities present
    num_visible = masking.dirichlet_visible_counts(keep, V, alpha=1.0, generator=g)
    x = torch.randn(B, K * N, D, generator=g).to(device=device, dtype=dtype)
    noise = torch.rand(B, K * N, generator=g).to(device)
    grad_visible = torch.randn(B, V, D, generator=g).to(device=device, dtype=dtype)
    return x, noise, num_visible.to(device), grad_visible


# torch.utils.flop_counter has formulas for the CUDA attention kernels only. On the CPU,
# scaled_dot_product_attention runs aten._scaled_dot_product_flash_attention_for_cpu (with or
# without a mask), which it counts as 0 FLOPs (measured, torch 2.14: a ViT's attention
# matmuls went missing from every CPU count). These give it, and its backward, the same
# formulas as the CUDA kernels (4 B H L_q L_k d forward, 2.5 times that backward).
_ATEN = torch.ops.aten
CPU_ATTENTION = {
    _ATEN._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, out_shape=None, **__: flop_counter_lib.sdpa_flop_count(q, k, v),
    _ATEN._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *_, out_shape=None, **__: flop_counter_lib.sdpa_backward_flop_count(g, q, k, v),
}


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, the CPU attention kernel counted (CPU_ATTENTION)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


def timer(device):
    """A function that runs fn() once and returns its wall time in seconds."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
    return run


def median_times(fns, device, reps, warmup):
    """Median seconds of each function over `reps` rounds, after `warmup` untimed ones; in
    each round every function runs once, in turn, so that load changes on a noisy machine
    hit all of them alike. Every timing here and studies/reproduce.py's cost table take it."""
    run = timer(device)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            ts.append(run(fn))
    return [statistics.median(ts) for ts in times]


def forward_bytes(x, noise, num_visible, V):
    """Bytes the fused forward must move: noise and counts in; the V kept rows in and
    out; ids_keep and mask out."""
    B, L, D = x.shape
    rows = B * V * D * x.element_size()
    return noise.numel() * 4 + num_visible.numel() * 8 + 2 * rows + B * V * 8 + B * L


def peak_gbps(device, override):
    if override:
        return override
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)   # not in every torch version
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None  # DDR: 2/clock


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions of each op measurement (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed repetitions before them")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--raw_malloc", action="store_true",
                    help="CPU: keep glibc's defaults, page faults on fresh blocks included")
    ap.add_argument("--peak_gbps", type=float, default=None,
                    help="peak memory bandwidth for the CUDA fraction (default: queried)")
    ap.add_argument("--steps", choices=("none", "tiny", "all"), default="all",
                    help="end-to-end pre-training steps to time: none, tiny, or tiny and base")
    ap.add_argument("--step_reps", type=int, default=None,
                    help="repetitions of the step timing (default: 20 tiny, 3 base)")
    ap.add_argument("--cost", choices=("none", "tiny", "base"), default="none",
                    help="the paper's training steps at this preset's sizes: time, memory, FLOPs, schedule cost")
    ap.add_argument("--cost_reps", type=int, default=3, help="timed repetitions per --cost step")
    ap.add_argument("--peak_tflops", type=float, default=989.0,
                    help="GPU peak for the schedule estimate (H100 SXM, dense bf16: 989)")
    ap.add_argument("--mfu", type=float, default=0.35,
                    help="assumed model FLOP utilisation for the schedule estimate")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="autocast dtype of the --cost and --memory steps (train.py --dtype)")
    ap.add_argument("--memory", choices=("none", "tiny", "base"), default="none",
                    help="peak memory of a fine-tuning step with and without --grad_ckpt / --accum_steps 2")
    ap.add_argument("--gpu_check", action="store_true",
                    help="the GPU machine check: build, pytest -m gpu, op bandwidth, bf16 steps, memory, NCCL")
    ap.add_argument("--compile_steps", choices=("none", "tiny", "all"), default="none",
                    help="eager vs --compile (whole pass, fullgraph): MIM step, STTP batch, fine-tuning step; "
                         "step time, peak memory, compile time; tiny at its batch, all: also base at batch 4")
    ap.add_argument("--compile_reps", type=int, default=5, help="timed steps per --compile_steps measurement")
    ap.add_argument("--compile_quick", action="store_true",
                    help="--compile_steps check in a few minutes: tiny model at batch 2, 32x32, inductor caches kept")
    ap.add_argument("--deploy", default="",
                    help="the deployed segmenter's cost per input condition (params, GFLOPs, latency, peak memory; "
                         "CPU, and CUDA when visible): a preset (tiny/base) or a fine-tuned ckpt.pt; then stops")
    ap.add_argument("--deploy_size", default="640x480", help="--deploy: the image, WIDTHxHEIGHT (run as evaluate.py "
                                                             "runs it: padded to the fine-tuning crop)")
    ap.add_argument("--deploy_reps", type=int, default=10, help="--deploy: timed calls per input condition (median)")
    ap.add_argument("--compile_worker", nargs=3, metavar=("PRESET", "STEP", "MODE"), help=argparse.SUPPRESS)
    return ap


def main():
    args = parser().parse_args()
    if args.gpu_check:
        return gpu_check()
    if args.compile_worker:
        return compile_worker(*args.compile_worker, args)
    if args.deploy:
        return bench_deploy(args)

    if not ops.LOADED:
        raise SystemExit(f"studies/bench.py: the fused op is not available: {ops.backend()}")
    device = torch.device(args.device)
    if device.type == "cuda" and not ops.CUDA:
        raise SystemExit("studies/bench.py: maskmentor_C was built without its CUDA kernels; rebuild with nvcc on PATH")
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "malloc defaults" if args.raw_malloc or device.type != "cpu" else keep_freed_memory()
    op = torch.ops.maskmentor.mask_gather
    ref = masking.mask_gather_reference
    peak = peak_gbps(device, args.peak_gbps) if device.type == "cuda" else None

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads, {malloc}")
    print(f"mask_gather: fused op vs reference — torch {torch.__version__}, {where}, "
          f"median of {args.reps} reps after {args.warmup} warm-up")
    head = f"{'shape':6} {'dtype':5} {'pass':8} {'reference ms':>13} {'op ms':>9} {'ref/op':>7}"
    if device.type == "cuda":
        head += f" {'op GB/s':>8} {'of peak':>8}"
    print(head)
    print("-" * len(head))
    for shape_name, s in SHAPES.items():
        for dtype_name, dtype in DTYPES.items():
            x, noise, num_visible, grad_visible = make_inputs(**s, dtype=dtype, device=device)
            xg = x.clone().requires_grad_()

            def forward(fn):
                return lambda: fn(x, noise, num_visible)

            def forward_backward(fn):
                # autograd.grad, not .backward(): no accumulation into xg.grad to time
                return lambda: torch.autograd.grad(fn(xg, noise, num_visible)[0], xg, grad_visible)

            for pass_name, wrap in (("fwd", forward), ("fwd+bwd", forward_backward)):
                t_ref, t_op = median_times([wrap(ref), wrap(op)], device, args.reps, args.warmup)
                line = (f"{shape_name:6} {dtype_name:5} {pass_name:8} {t_ref * 1e3:13.3f} "
                        f"{t_op * 1e3:9.3f} {t_ref / t_op:6.1f}x")
                if device.type == "cuda" and pass_name == "fwd":
                    gbps = forward_bytes(x, noise, num_visible, s["V"]) / t_op / 1e9
                    line += f" {gbps:8.1f} " + (f"{gbps / peak:7.1%}" if peak else "     n/a")
                print(line)
                if shape_name == "vit-b" and dtype_name == "fp32" and pass_name == "fwd+bwd":
                    vit_b_ratio = t_ref / t_op
                    # The same two, each timed in a loop of its own: its buffers stay cached
                    # from one call to the next, which the alternating timing above denies
                    # both (as a training step does, where the network runs in between).
                    (a_ref,), (a_op,) = (median_times([wrap(fn)], device, args.reps, args.warmup) for fn in (ref, op))
                    alone = (f"  each timed alone, warm caches: reference {a_ref * 1e3:.3f} ms, op {a_op * 1e3:.3f} ms, "
                             f"{a_ref / a_op:.1f}x")
    print(f"ViT-B fp32 forward + backward: the op is {vit_b_ratio:.2f}x the reference (goal: >= 3x)")
    print(alone)
    if peak:
        print(f"peak bandwidth {peak:.0f} GB/s ({'--peak_gbps' if args.peak_gbps else 'queried'})")
    if args.steps != "none":
        print()
        bench_pretrain_steps(["tiny"] if args.steps == "tiny" else ["tiny", "base"], device, args)
    if args.cost != "none":
        print()
        bench_paper_steps(args.cost, device, args)
    if args.memory != "none":
        print()
        bench_memory(args.memory, device, args)
    if args.compile_steps != "none":
        print()
        bench_compile_steps(["tiny"] if args.compile_steps == "tiny" or args.compile_quick else ["tiny", "base"], args)


STEP_SHAPES = {"tiny": dict(B=32, size=64, budget=32, reps=20), "base": dict(B=12, size=224, budget=98, reps=3)}


def bench_pretrain_steps(presets, device, args):
    """Median time of one whole pre-training step (sttp.mim) with the op and with the
    reference (ops.reference_only)."""
    import dataclasses

    import model as M
    import sttp
    from util.runtime import Runtime

    print(f"{'pre-training step (sttp.mim)':30} {'reference s':>12} {'op s':>9} {'ref/op':>7}")
    for name in presets:
        s = STEP_SHAPES[name]
        torch.manual_seed(0)
        net = M.MaskMentor(dataclasses.replace(M.PRESETS[name], num_classes=40)).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        cfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=s["budget"]))
        g = torch.Generator(device=device).manual_seed(0)
        B, H = s["B"], s["size"]
        batch = {"rgb": torch.randn(B, 3, H, H, device=device),
                 "depth": torch.rand(B, 1, H, H, device=device) * 5 + 0.5,
                 "semseg": torch.randint(0, 40, (B, H, H), device=device)}

        rt = Runtime(device)

        def step(fused):
            def run():
                with contextlib.nullcontext() if fused else ops.reference_only():
                    rt.run_objective(sttp.OBJECTIVES["mim"], net, opt, batch, cfg, g)
            return run

        reps = s["reps"] if args.step_reps is None else args.step_reps
        t_ref, t_op = median_times([step(False), step(True)], device, reps, warmup=1)
        print(f"{name + f' (B={B}, {H}x{H})':30} {t_ref:12.3f} {t_op:9.3f} {t_ref / t_op:6.2f}x")


# -----------------------------------------------------------------------------
# Eager against --compile: step time, peak memory, compile time


COMPILE_BATCH = {"tiny": None, "base": 4}       # None: the preset's training batch
COMPILE_STEPS = ("mim", "sttp", "finetune")


# kineto's own log lines ("USDT:... profiler_start", and on a machine without a GPU "ERROR:...
# gpuGetDeviceCount failed"): written by C++ straight to file descriptor 2, they would read as
# failures in the middle of a table.
KINETO_LINE = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\.cpp:\d+\] ")


@contextlib.contextmanager
def profiled(**kw):
    """torch.profiler.profile(**kw) with stderr (fd 2) held in a temporary file meanwhile and
    passed on afterwards, less kineto's log lines: every other line still reaches the user."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            with torch.profiler.profile(**kw) as prof:
                yield prof
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            sys.stderr.write("".join(line for line in held.read().decode(errors="replace").splitlines(True)
                                     if not KINETO_LINE.match(line)))


def tensor_memory_peak(fn) -> int:
    """CPU: the peak of live tensor bytes during one call of fn, above those live when it
    starts: the running sum of the allocation (+) and free (-) records of a torch.profiler
    trace with profile_memory, in time order (the raw kineto records: the per-op summaries
    net each op's allocations against its frees, which would hide the inside of a compiled
    graph). The allocator's view: unlike the resident set it does not depend on what malloc
    keeps, and compiled code is counted like eager (inductor allocates through torch)."""
    with profiled(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def compile_worker(preset: str, step: str, mode: str, args) -> None:
    """One measurement of bench_compile_steps, in its own process; prints one JSON line."""
    import dataclasses

    import finetune
    import model as M
    import sttp
    import train
    from util import runtime

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and not args.raw_malloc:
        keep_freed_memory()
    pre = train.TRAIN_PRESETS[preset]
    B, H = COMPILE_BATCH[preset] or pre["batch_size"], pre["image_size"]
    budget = pre["budget"]
    if args.compile_quick:
        B, H, budget = 2, 32, 8
    torch.manual_seed(0)
    g = torch.Generator(device=device).manual_seed(0)
    batch = {"rgb": torch.randn(B, 3, H, H, device=device),
             "depth": torch.rand(B, 1, H, H, device=device) * 5 + 0.5,
             "semseg": torch.randint(0, 40, (B, H, H), device=device)}
    rt = runtime.Runtime(device, compile=mode == "compiled")
    model_cfg = dataclasses.replace(M.PRESETS[preset], image_size=H, num_classes=40)
    if step == "finetune":
        net = M.Segmenter(model_cfg).to(device)
        fcfg = finetune.FinetuneConfig(config=preset, image_size=H, batch_size=B)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5, **rt.optimizer_options())
        model = rt.wrap(net)
        fn = lambda: finetune.train_step(model, opt, batch, fcfg, g, rt)
    else:
        net = M.MaskMentor(model_cfg).to(device)
        ocfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=budget))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5, betas=(0.9, 0.95), **rt.optimizer_options())
        fn = lambda: rt.run_objective(sttp.OBJECTIVES[step], net, opt, batch, ocfg, g)
    net.train()
    first = timer(device)(fn)                # compiles, with --compile
    (median,) = median_times([fn], device, args.compile_reps, warmup=0)
    # The peak of a steady step, above what is live when it starts (weights, optimiser state).
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = tensor_memory_peak(fn)
    print(json.dumps({"batch": B, "size": H, "step_s": median, "first_s": first,
                      "compile_s": max(0.0, first - median), "peak_bytes": peak}))


def bench_compile_steps(presets, args):
    """Eager vs compiled, side by side: one subprocess per (preset, step, mode), inductor's
    caches off (a cold compile each time), the same inputs and seeds."""
    env = dict(os.environ) if args.compile_quick else dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    common = ["--device", args.device, "--compile_reps", str(args.compile_reps)]
    if args.compile_quick:
        common.append("--compile_quick")
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.raw_malloc:
        common.append("--raw_malloc")
    print(f"eager vs --compile (whole pass, fullgraph=True; util/runtime.Runtime), {args.device}: median of "
          f"{args.compile_reps} steps after the first; peak tensor memory of a step above its start; "
          f"compile s = first call - a step" + ("" if args.compile_quick else ", inductor caches off"))
    head = (f"{'preset':14} {'step':9} {'eager s':>9} {'compiled s':>10} {'c/e':>6} {'eager MB':>9} "
            f"{'compiled MB':>11} {'c/e':>6} {'compile s':>9}")
    print(head)
    print("-" * len(head))
    for preset in presets:
        for step in COMPILE_STEPS:
            r = {}
            for mode in ("eager", "compiled"):
                cmd = [sys.executable, os.path.abspath(__file__), "--compile_worker", preset, step, mode] + common
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"studies/bench.py: {preset} {step} {mode} failed:\n{out.stderr[-3000:]}")
                r[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            e, c = r["eager"], r["compiled"]
            name = f"{preset} B={e['batch']} {e['size']}px"
            mb = lambda x: x["peak_bytes"] / 2**20
            print(f"{name:14} {step:9} {e['step_s']:9.3f} {c['step_s']:10.3f} {c['step_s'] / e['step_s']:6.2f} "
                  f"{mb(e):9.1f} {mb(c):11.1f} {mb(c) / max(mb(e), 1e-9):6.2f} {c['compile_s']:9.1f}", flush=True)


# -----------------------------------------------------------------------------
# The paper's training steps at full size: speed, memory, where the time goes, FLOPs, and
# what the paper's whole schedule would cost


# The paper's schedule (§4.1; docs/method.md §4-5): NYU Depth V2's 795 training images; pre-training
# 100 MIM + 400 STTP epochs at batch 12, fine-tuning 500 epochs at batch 2 (the base presets'
# batch sizes; with --cost tiny, the tiny presets' sizes on the same schedule).
PAPER_IMAGES, MIM_EPOCHS, STTP_EPOCHS, FINETUNE_EPOCHS = 795, 100, 400, 500
LABELS = ("data", "forward", "backward", "optimizer")    # the record_function ranges of the training code


def time_split(prof, device) -> dict:
    """Seconds per label in a profiler trace. CPU: the wall time of the labelled ranges
    (the backward runs on the calling thread too). CUDA: the GPU time kineto gives each
    range (its gpu_user_annotation) where it recorded one, else the CPU range."""
    cpu, gpu = {}, {}
    for e in prof.events():
        if e.name in LABELS:
            where = cpu if e.device_type == torch.autograd.DeviceType.CPU else gpu
            where[e.name] = where.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e6
    return {k: (gpu.get(k) if device.type == "cuda" and k in gpu else cpu.get(k, 0.0)) for k in LABELS}


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"   # KiB on Linux


def measure(fn, device, reps):
    """(median seconds of fn over reps runs, the fraction of one profiled run's time in each
    label and outside them ("other"), peak memory). Run it warm."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with profiled(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    total = time.perf_counter() - t0
    split = time_split(prof, device)
    split["other"] = max(0.0, total - sum(split.values()))
    (t,) = median_times([fn], device, reps, warmup=0)
    return t, {k: v / total for k, v in split.items()}, peak_memory(device)


def bench_paper_steps(name, device, args):
    """For the `name` preset at its batch sizes (base: ViT-B at 224/16, batch 12; fine-tuning
    at batch 2 on 640 crops): one MIM, one M²IM and one STTP batch (3 teacher + 1 student
    steps) with the fused op and with the reference, and one fine-tuning step (no masking,
    so one backend). Batches come from the synthetic rooms rendered at the training size,
    through util/engine.fetch (the loop's "data" range)."""
    import dataclasses

    import data
    import finetune
    import model as M
    import sttp
    import train
    from util import engine, runtime
    from util.lr_sched import param_groups

    pre, ft = train.TRAIN_PRESETS[name], finetune.FINETUNE_PRESETS[name]
    classes = data.num_classes("nyu")                       # the paper's 40 classes, for the FLOPs

    def batches(image_size, batch_size):
        """The same images, rendered anew each time (as training renders every batch)."""
        ds = data.build_dataset("synthetic", None, "train", train=True, image_size=image_size)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=itertools.repeat(list(range(batch_size))),
                                             collate_fn=data.collate)
        return engine.fetch(loader, device)

    g = torch.Generator(device=device).manual_seed(0)
    # Its profiler labels split the time; --dtype: autocast as train.py --dtype does.
    rt = runtime.Runtime(device, runtime.DTYPES[args.dtype])

    def pretraining():
        """(name, images, one batch's function) for mim, m2im and sttp."""
        torch.manual_seed(0)
        net = M.MaskMentor(dataclasses.replace(M.PRESETS[name], image_size=pre["image_size"],
                                               num_classes=classes)).to(device)
        opt = torch.optim.AdamW(param_groups(net, 0.05), lr=pre["lr"], betas=(0.9, 0.95))
        ocfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=pre["budget"]))
        loader = batches(pre["image_size"], pre["batch_size"])
        for mode in ("mim", "m2im", "sttp"):
            yield mode, pre["batch_size"], lambda mode=mode: rt.run_objective(sttp.OBJECTIVES[mode], net, opt,
                                                                              next(loader), ocfg, g)

    def finetuning():
        """The same for one fine-tuning step, built once the pre-training steps are measured."""
        fcfg = finetune.FinetuneConfig(config=name, **ft)
        seg = M.Segmenter(dataclasses.replace(M.PRESETS[name], image_size=ft["image_size"], num_classes=classes,
                                              drop_path=ft["drop_path"])).to(device)
        opt = torch.optim.AdamW(param_groups(seg, fcfg.weight_decay, fcfg.layer_decay), lr=ft["lr"])
        loader = batches(ft["image_size"], ft["batch_size"])
        yield "finetune", ft["batch_size"], lambda: finetune.train_step(seg, opt, next(loader), fcfg, g, rt)

    print(f"{name} preset, {args.dtype}: pre-training batch {pre['batch_size']} at {pre['image_size']}px, "
          f"fine-tuning batch {ft['batch_size']} at {ft['image_size']}px; s/batch: median of {args.cost_reps} after a warm-up, a "
          f"FLOP-counting and a profiled run, whose time is split by the training code's profiler ranges")
    head = (f"{'batch':9} {'masking':9} {'s/batch':>8} {'img/s':>7} {'GFLOP':>8} {'TFLOP/s':>8}  "
            + " ".join(f"{k:>9}" for k in LABELS + ("other",)) + "  peak memory")
    print(head)
    print("-" * len(head))
    cost = {}
    for step_name, B, fn in itertools.chain(pretraining(), finetuning()):
        fn()                      # warm-up: first-touch page faults, oneDNN's kernel choices
        with flop_counter() as flops:
            fn()
        F = flops.get_total_flops()
        for backend in (("op", "reference") if step_name != "finetune" else ("n/a",)):
            with ops.reference_only() if backend == "reference" else contextlib.nullcontext():
                t, split, mem = measure(fn, device, args.cost_reps)
            cost.setdefault(step_name, (t, F))              # the op's time: what training uses
            parts = " ".join(f"{split[k]:9.0%}" for k in LABELS + ("other",))
            print(f"{step_name:9} {backend:9} {t:8.2f} {B / t:7.2f} {F / 1e9:8.0f} {F / t / 1e12:8.3f}  "
                  f"{parts}  {mem}")
    schedule_estimate(cost, pre["batch_size"], ft["batch_size"], device, args)


def schedule_estimate(cost, pre_batch, ft_batch, device, args):
    """The paper's whole schedule, from FLOPs on an H100 at an assumed utilisation, and
    from the step times measured here."""
    pre_steps, ft_steps = PAPER_IMAGES // pre_batch, PAPER_IMAGES // ft_batch     # batches per epoch
    runs = {"pre-training": [("mim", MIM_EPOCHS * pre_steps), ("sttp", STTP_EPOCHS * pre_steps)],
            "fine-tuning": [("finetune", FINETUNE_EPOCHS * ft_steps)]}
    rate = args.peak_tflops * 1e12 * args.mfu
    print(f"\nThe paper's schedule ({MIM_EPOCHS} MIM + {STTP_EPOCHS} STTP epochs at batch {pre_batch}, "
          f"{FINETUNE_EPOCHS} fine-tuning epochs at batch {ft_batch}, {PAPER_IMAGES} images; the op's step times):")
    print(f"  ESTIMATE from counted FLOPs (matmuls, convolutions, attention; forward + backward), assuming an "
          f"H100 at {args.peak_tflops:g} TFLOP/s dense bf16 peak and {args.mfu:.0%} model FLOP utilisation "
          f"(an assumption, not a measurement):")
    total_gpu = total_here = 0.0
    for stage, parts in runs.items():
        flops = sum(n * cost[s][1] for s, n in parts)
        here = sum(n * cost[s][0] for s, n in parts)
        total_gpu, total_here = total_gpu + flops / rate / 3600, total_here + here / 3600
        batches = " + ".join(f"{n} {s} batches" for s, n in parts)
        print(f"    {stage:13} {batches}: {flops / 1e15:.4g} PFLOP -> {flops / rate / 3600:.3g} H100-hours; "
              f"at the step times measured here ({device.type}): {here / 3600:.4g} hours")
    print(f"    total         {total_gpu:.3g} H100-hours (estimate); {total_here:.4g} hours "
          f"({total_here / 24:.3g} days) extrapolated from the step times measured here ({device.type})")


def _memory_child(name: str, device: str, dtype: str, grad_ckpt: bool, accum: int, threads) -> tuple:
    """In a fresh process: (bytes held before the step, peak bytes, seconds) of the second
    of two fine-tuning steps of the `name` preset (the first allocates the optimiser state)."""
    import dataclasses

    import data
    import finetune
    import model as M
    from util import engine, runtime
    from util.lr_sched import param_groups

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    ft = finetune.FINETUNE_PRESETS[name]
    fcfg = finetune.FinetuneConfig(config=name, **ft)
    torch.manual_seed(0)
    seg = M.Segmenter(dataclasses.replace(M.PRESETS[name], image_size=ft["image_size"],
                                          num_classes=data.num_classes("nyu"), drop_path=ft["drop_path"])).to(device)
    seg.grad_ckpt = grad_ckpt
    opt = torch.optim.AdamW(param_groups(seg, fcfg.weight_decay, fcfg.layer_decay), lr=ft["lr"])
    ds = data.build_dataset("synthetic", None, "train", train=True, image_size=ft["image_size"])
    batch = engine.to_device(data.collate([ds[i] for i in range(ft["batch_size"])]), device)
    rt = runtime.Runtime(device, runtime.DTYPES[dtype], accum_steps=accum)
    model = rt.wrap(seg)
    g = torch.Generator(device=device).manual_seed(0)
    finetune.train_step(model, opt, batch, fcfg, g, rt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/statm") as f:
            held = int(f.read().split()[1]) * resource.getpagesize()
    t0 = time.perf_counter()
    finetune.train_step(model, opt, batch, fcfg, g, rt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024          # KiB on Linux
    return held, peak, time.perf_counter() - t0


def bench_memory(name, device, args):
    """Peak memory of one fine-tuning step, plain, --grad_ckpt, --accum_steps 2, both."""
    import multiprocessing

    ft = __import__("finetune").FINETUNE_PRESETS[name]
    what = "GPU memory allocated" if device.type == "cuda" else "process RSS"
    print(f"{name} preset fine-tuning step, batch {ft['batch_size']} at {ft['image_size']}x{ft['image_size']}, "
          f"{args.dtype}, {device.type}: {what}, each setting in a fresh process")
    head = f"{'setting':28} {'held before GiB':>16} {'peak GiB':>9} {'peak/plain':>11} {'s/step':>7}"
    print(head)
    print("-" * len(head))
    plain = None
    ctx = multiprocessing.get_context("spawn")
    for label, grad_ckpt, accum in (("plain", False, 1), ("--grad_ckpt", True, 1),
                                    ("--accum_steps 2", False, 2), ("--grad_ckpt --accum_steps 2", True, 2)):
        with ctx.Pool(1) as pool:
            held, peak, secs = pool.apply(_memory_child, (name, str(device), args.dtype, grad_ckpt, accum,
                                                          args.threads))
        plain = plain or peak
        print(f"{label:28} {held / 2**30:16.2f} {peak / 2**30:9.2f} {peak / plain:10.2f}x {secs:7.1f}")


# -----------------------------------------------------------------------------
# The deployed segmenter: what one input costs under each input condition


def deploy_model(spec: str):
    """--deploy's segmenter: (net, the fine-tuning crop it pads to, what it is). A preset
    (tiny, base) is built at its fine-tuning crop with NYU's 40 classes and untrained
    weights (its cost does not depend on them); anything else is a fine-tuned checkpoint."""
    import dataclasses

    import data
    import evaluate
    import finetune
    import model as M
    from util.cli import UserError

    if spec in M.PRESETS:
        crop = finetune.FINETUNE_PRESETS[spec]["image_size"]
        torch.manual_seed(0)
        net = M.Segmenter(dataclasses.replace(M.PRESETS[spec], image_size=crop, num_classes=data.num_classes("nyu")))
        return net.eval(), crop, f"the {spec} preset (untrained, {net.cfg.num_classes} classes)"
    if not os.path.isfile(spec):
        raise SystemExit(f"studies/bench.py: --deploy {spec}: neither a preset ({', '.join(M.PRESETS)}) nor a file")
    try:
        net, ckpt = evaluate.load_segmenter(spec, "cpu")
        conv = evaluate.conventions(ckpt, net, spec)
    except UserError as e:
        raise SystemExit(f"studies/bench.py: --deploy {e}") from None
    return net, conv.image_size, f"{spec} ({conv.dataset}, {net.cfg.num_classes} classes)"


def deploy_params(net, setting: str) -> int:
    """The parameters an input condition runs through: all but the absent inputs' adapters."""
    import evaluate
    names = evaluate.SETTINGS[setting]
    return sum(p.numel() for n, p in net.named_parameters()
               if not (n.startswith("input_adapters.") and n.split(".")[1] not in names))


def deploy_flops(fn) -> int:
    """FLOPs of one call of fn as flop_counter() counts them: matmuls, convolutions and
    attention, a multiply-add as 2 (normalisation, activations, resampling not counted)."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def deploy_peak(fn, device) -> int:
    """Peak bytes of tensors one call of fn holds above what is live when it starts
    (CUDA: max allocated; CPU: tensor_memory_peak)."""
    if device.type != "cuda":
        return tensor_memory_peak(fn)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def parse_size(text: str) -> tuple:
    """--deploy_size WxH -> (H, W)."""
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or not all(1 <= int(v) <= 8192 for v in m.groups()):
        raise SystemExit(f"studies/bench.py: --deploy_size {text}: give WIDTHxHEIGHT in pixels, each 1 to 8192 "
                         f"(e.g. 640x480)")
    return int(m.group(2)), int(m.group(1))


def bench_deploy(args) -> dict:
    """--deploy: the segmenter as evaluate.py runs it on one image of --deploy_size (padded to
    the fine-tuning crop, depth standardised, forward, argmax: evaluate.predict) under rgb +
    depth, rgb only and depth only: parameters, GFLOPs, median latency, peak memory, on the
    CPU and on CUDA when one is visible. The three inputs are timed in turn within each
    repetition (median_times), so the ratios are measured side by side."""
    import evaluate

    H, W = parse_size(args.deploy_size)
    if args.deploy_reps < 1:
        raise SystemExit(f"studies/bench.py: --deploy_reps must be >= 1, got {args.deploy_reps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    net, crop, what = deploy_model(args.deploy)
    settings = evaluate.conditions_of(net)
    Hp, Wp = evaluate.padded_size(H, W, crop, net.cfg.patch_size)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    g = torch.Generator().manual_seed(0)
    image = {"rgb": torch.randn(1, 3, H, W, generator=g), "depth": torch.rand(1, 1, H, W, generator=g) * 5 + 0.5}
    run_at = (f"run at {Wp}x{Hp} (padded to the {crop} px fine-tuning crop, as evaluate.py runs it)"
              if (Hp, Wp) != (H, W) else f"run at its size (not below the {crop} px fine-tuning crop: no padding)")
    print(f"deployed segmenter: {what}; one {W}x{H} image, {run_at}; torch {torch.__version__}, "
          f"CPU {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name(0)}" if len(devices) > 1 else ", no CUDA device")
          + f"; latency: median of {args.deploy_reps} after 2 warm-up calls, the inputs in turn")
    head = (f"{'device':6} {'input':6} {'params M':>9} {'GFLOPs':>9} {'latency ms':>11} {'peak MB':>9} "
            f"{'GFLOPs/rgbd':>12} {'ms/rgbd':>8}")
    print(head)
    print("-" * len(head))
    table = {}
    for device in devices:
        net = net.to(device)
        batch = {m: x.to(device) for m, x in image.items()}
        fns = [lambda s=s: evaluate.predict(net, batch, [s], crop) for s in settings]
        times = median_times(fns, device, args.deploy_reps, warmup=2)
        for s, fn, t in zip(settings, fns, times):
            table[device.type, s] = {"params": deploy_params(net, s), "flops": deploy_flops(fn), "seconds": t,
                                     "peak_bytes": deploy_peak(fn, device)}
        ref = table.get((device.type, "rgbd"))
        for s in settings:
            r = table[device.type, s]
            ratios = (f"{r['flops'] / ref['flops']:12.2f} {r['seconds'] / ref['seconds']:8.2f}" if ref else
                      f"{'n/a':>12} {'n/a':>8}")
            print(f"{device.type:6} {s:6} {r['params'] / 1e6:9.3f} {r['flops'] / 1e9:9.3f} {r['seconds'] * 1e3:11.2f} "
                  f"{r['peak_bytes'] / 2**20:9.1f} {ratios}", flush=True)
    return table


def gpu_check():
    """--gpu_check: everything a GPU machine should show, in order, each part with a time
    limit; stops at the first failure with its output's tail."""
    import os
    import subprocess
    import sys

    if not torch.cuda.is_available():
        raise SystemExit("studies/bench.py --gpu_check: no CUDA device visible (torch.cuda.is_available() is False)")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))       # the project's root
    py = sys.executable
    gpus = torch.cuda.device_count()
    print(f"gpu check: {torch.cuda.get_device_name(0)} x {gpus}, torch {torch.__version__}, CUDA {torch.version.cuda}",
          flush=True)
    steps = [("build the CUDA op", [py, "setup.py", "build_ext", "--inplace"], 300),
             ("the op has its CUDA kernels", [py, "-c", "from util import ops; import sys; "
                                              "print(ops.backend()); sys.exit(0 if ops.CUDA else 1)"], 60),
             ("pytest -m gpu", [py, "-m", "pytest", "-q", "-m", "gpu"], 300),
             ("op benchmark (bandwidth of peak)", [py, "studies/bench.py", "--device", "cuda", "--reps", "50",
                                                   "--steps", "none"], 120),
             ("base preset, bfloat16 steps", [py, "studies/bench.py", "--device", "cuda", "--reps", "3",
                                              "--steps", "none", "--cost", "base", "--cost_reps", "3", "--dtype", "bfloat16"], 300),
             ("fine-tuning memory", [py, "studies/bench.py", "--device", "cuda", "--reps", "3", "--steps",
                                     "none", "--memory", "base", "--dtype", "bfloat16"], 300)]
    if gpus >= 2:
        out = os.path.join(here, "out", "gpu_check_nccl")
        steps.append(("2-process NCCL run", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                             "2", "train.py", "--config", "tiny", "--device", "cuda", "--stop_after",
                                             "20", "--vis_every", "0", "--overwrite", "--out_dir", out], 300))
    for title, cmd, limit in steps:
        print(f"\n== {title}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=here, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"gpu check: {title} ran past {limit} s")
        text = p.stdout + p.stderr
        print(text if len(text) < 6000 else text[-6000:], end="")
        if p.returncode != 0:
            raise SystemExit(f"gpu check: {title} failed (exit {p.returncode})")
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if gpus < 2:
        print("\n== 2-process NCCL run: skipped, one GPU (NCCL needs a GPU per process)")
    print("\ngpu check: all passed")


if __name__ == "__main__":
    main()
