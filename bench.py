"""bench.py — how much faster the fused mask_gather op (csrc/) is than the reference.

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

    python bench.py                      # CPU
    python bench.py --device cuda --reps 200
    python bench.py --threads 1          # single-threaded CPU kernels
    python bench.py --steps none         # skip the end-to-end pre-training steps

Then, end to end: one pre-training step (sttp.mim: masking, forward, the pixel losses,
backward, AdamW) of the `tiny` and `base` models with the op and with the reference,
alternating, so the op's share of a whole training step is visible too.

On CPU, torch allocates with malloc. glibc hands blocks this large (a ViT-B gradient is
22 MB) back to the kernel when they are freed, or not, depending on the process's
history; a fresh block costs a page fault per 4 KiB on first write (~5 ms per 22 MB on
a small VM), which made timings jump between runs by more than the ops themselves
cost. So by default the benchmark asks glibc to keep freed memory for reuse, as a
caching allocator would; --raw_malloc keeps glibc's defaults.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time

import torch

import masking

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


def time_pair(fns, device, reps, warmup):
    """Median seconds of each function, run alternately rep after rep."""
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--raw_malloc", action="store_true",
                    help="CPU: keep glibc's defaults, page faults on fresh blocks included")
    ap.add_argument("--peak_gbps", type=float, default=None,
                    help="peak memory bandwidth for the CUDA fraction (default: queried)")
    ap.add_argument("--steps", choices=("none", "tiny", "all"), default="all",
                    help="end-to-end pre-training steps to time: none, tiny, or tiny and base")
    ap.add_argument("--step_reps", type=int, default=None,
                    help="repetitions of the step timing (default: 20 tiny, 3 base)")
    args = ap.parse_args()

    if not masking._FUSED_LOADED:
        raise SystemExit(f"bench.py: the fused op is not available: {masking.backend()}")
    device = torch.device(args.device)
    if device.type == "cuda" and not masking._FUSED_CUDA:
        raise SystemExit("bench.py: maskmentor_cuda is not built; rebuild with nvcc on PATH")
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
                t_ref, t_op = time_pair([wrap(ref), wrap(op)], device, args.reps, args.warmup)
                line = (f"{shape_name:6} {dtype_name:5} {pass_name:8} {t_ref * 1e3:13.3f} "
                        f"{t_op * 1e3:9.3f} {t_ref / t_op:6.1f}x")
                if device.type == "cuda" and pass_name == "fwd":
                    gbps = forward_bytes(x, noise, num_visible, s["V"]) / t_op / 1e9
                    line += f" {gbps:8.1f} " + (f"{gbps / peak:7.1%}" if peak else "     n/a")
                print(line)
    if peak:
        print(f"peak bandwidth {peak:.0f} GB/s ({'--peak_gbps' if args.peak_gbps else 'queried'})")
    if args.steps != "none":
        print()
        bench_pretrain_steps(["tiny"] if args.steps == "tiny" else ["tiny", "base"], device, args)


STEP_SHAPES = {"tiny": dict(B=32, size=64, budget=32, reps=20), "base": dict(B=12, size=224, budget=98, reps=3)}


def bench_pretrain_steps(presets, device, args):
    """Median time of one whole pre-training step (sttp.mim) with the op and with the
    reference; masking.mask_gather picks the backend from masking._FUSED_LOADED."""
    import dataclasses

    import model as M
    import sttp

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

        def step(fused):
            def run():
                masking._FUSED_LOADED = fused
                try:
                    sttp.mim(net, opt, batch, cfg, g)
                finally:
                    masking._FUSED_LOADED = True
            return run

        reps = s["reps"] if args.step_reps is None else args.step_reps
        t_ref, t_op = time_pair([step(False), step(True)], device, reps, warmup=1)
        print(f"{name + f' (B={B}, {H}x{H})':30} {t_ref:12.3f} {t_op:9.3f} {t_ref / t_op:6.2f}x")


if __name__ == "__main__":
    main()
