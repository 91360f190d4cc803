"""util/ops.py — the fused masking op's Python side: what torch.compile needs from it, which
implementation runs, and the switch to the pure-PyTorch reference.

setup.py builds csrc/ into the extension module `maskmentor_C` (C++ always, CUDA kernels too
when a CUDA toolkit and a CUDA build of torch are there). masking.py imports it, which
registers

    torch.ops.maskmentor.mask_gather           (x, noise, num_visible) -> (visible, ids_keep, mask)
    torch.ops.maskmentor.mask_gather_backward  (grad_visible, ids_keep, num_tokens) -> grad_x

(`TORCH_LIBRARY` schemas, per-device kernels and, at the Autograd key, the gradient
formulas: csrc/README.md). What the op computes is defined by
masking.mask_gather_reference, which masking.mask_gather runs where the op has no kernel.
Importing this module adds the op's fake (shape-only) implementations, which torch.compile
and opcheck trace with; every script imports it. Set MASKMENTOR_REFERENCE=1 to run the
reference everywhere.
"""
from __future__ import annotations

import contextlib
import os

import torch

import masking

LOADED = masking.maskmentor_C is not None        # schemas and CPU kernels registered
CUDA = LOADED and bool(masking.maskmentor_C.cuda)  # ... and built with its CUDA kernels
WHY = "" if LOADED else "extension not built (no module named 'maskmentor_C')"


def _register_fake() -> None:
    @torch.library.register_fake("maskmentor::mask_gather")
    def _(x, noise, num_visible):
        # Shapes only. V is data-dependent (a row sum of num_visible), so it is a new
        # symbolic size, which lets torch.compile(fullgraph=True) trace through the op.
        # masking.mask_gather then states V = the plan's budget (torch._check), so what
        # follows the gather (attention, the MIM heads) compiles with a fixed V.
        # The checks that need no data are made here, at trace time; the kernels check
        # the rest (sizes, counts, row sums) when they run.
        torch._check_value(x.dim() == 3 and x.is_floating_point(),
                           lambda: f"mask_gather: x must be a float [B, K*N, D] tensor, got {x.dtype}")
        torch._check_value(noise.dtype == torch.float32 and noise.dim() == 2,
                           lambda: f"mask_gather: noise must be float32 [B, K*N], got {noise.dtype}")
        torch._check_value(num_visible.dtype == torch.int64 and num_visible.dim() == 2,
                           lambda: f"mask_gather: num_visible must be int64 [B, K], got {num_visible.dtype}")
        V = torch.library.get_ctx().new_dynamic_size()
        B, L, D = x.shape
        return (x.new_empty(B, V, D), x.new_empty(B, V, dtype=torch.long),
                x.new_empty(B, L, dtype=torch.bool))

    @torch.library.register_fake("maskmentor::mask_gather_backward")
    def _(grad_visible, ids_keep, num_tokens):
        B, _, D = grad_visible.shape
        return grad_visible.new_empty(B, num_tokens, D)


# Registering twice is an error, and this module may be imported again (reload, a second
# name); the extension module lives once per process, so it holds the flag.
if LOADED and not getattr(masking.maskmentor_C, "python_parts_registered", False):
    _register_fake()
    masking.maskmentor_C.python_parts_registered = True
if os.environ.get("MASKMENTOR_REFERENCE", "") not in ("", "0"):
    masking.FUSED = LOADED = CUDA = False
    WHY = "MASKMENTOR_REFERENCE is set"


def available(device: torch.device) -> bool:
    """Whether the op has a kernel for this device (and is not switched off)."""
    return masking.fused_kernel(device)


@contextlib.contextmanager
def reference_only():
    """Run the pure-PyTorch reference inside the block (studies/bench.py's side-by-side timings)."""
    before, masking.FUSED = masking.FUSED, False
    try:
        yield
    finally:
        masking.FUSED = before


def backend() -> str:
    """One line saying which implementation of the gather runs, for the CLIs' start-up."""
    if LOADED:
        devices = "CPU and CUDA kernels" if CUDA else "CPU kernel; reference on CUDA"
        return f"masking: fused mask_gather op (csrc/, maskmentor_C: {devices})"
    return f"masking: pure-PyTorch reference ({WHY})"
