"""ops.py — loads the fused masking op built from csrc/ and tells torch what it cannot read
from C++: the op's fake (shape-only) implementations and its autograd formulas.

Importing the compiled module `maskmentor_C` (setup.py builds it from csrc/: C++ always,
CUDA kernels too when a CUDA toolkit and a CUDA build of torch are there) registers

    torch.ops.maskmentor.mask_gather           (x, noise, num_visible) -> (visible, ids_keep, mask)
    torch.ops.maskmentor.mask_gather_backward  (grad_visible, ids_keep, num_tokens) -> grad_x

(`TORCH_LIBRARY` schemas and per-device kernels, csrc/README.md). What the op computes is
defined by masking.mask_gather_reference; masking.mask_gather calls the op when
`available(x.device)`, the reference otherwise. Nothing else in the project imports the
extension. Set MASKMENTOR_REFERENCE=1 to run the reference everywhere.
"""
from __future__ import annotations

import contextlib
import os

import torch

LOADED = False          # maskmentor_C imported: schemas and CPU kernels registered
CUDA = False            # ... and built with its CUDA kernels
WHY = "not tried"       # why not, when not LOADED
_disabled = False       # `reference_only()` in force


def _load() -> None:
    global LOADED, CUDA, WHY
    if os.environ.get("MASKMENTOR_REFERENCE", "") not in ("", "0"):
        WHY = "MASKMENTOR_REFERENCE is set"
        return
    try:
        import maskmentor_C  # registers the schemas and the kernels
    except ImportError as e:
        WHY = f"extension not built ({e.msg})"
        return
    # Registering twice is an error, and this module may be imported again (reload, a
    # second name); the extension module lives once per process, so it holds the flag.
    if not getattr(maskmentor_C, "python_parts_registered", False):
        _register_fake_and_autograd()
        maskmentor_C.python_parts_registered = True
    LOADED, CUDA, WHY = True, bool(maskmentor_C.cuda), ""


def _register_fake_and_autograd() -> None:
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

    # mask_gather copies x[b, ids_keep[b, v]] to visible[b, v]. Its gradient puts
    # grad_visible back at those rows of a zero tensor; positions are distinct, so that
    # is a row copy, done by the C++/CUDA mask_gather_backward (a Python scatter_ would
    # index every element and dominate the op's cost on CPU). No gradient flows to noise
    # or num_visible: the selection is piecewise constant in the noise.
    def setup_context(ctx, inputs, output):
        x, _, _ = inputs
        _, ids_keep, _ = output
        ctx.save_for_backward(ids_keep)
        ctx.num_tokens = x.shape[1]

    def backward(ctx, grad_visible, _grad_ids, _grad_mask):
        (ids_keep,) = ctx.saved_tensors
        grad_x = torch.ops.maskmentor.mask_gather_backward(grad_visible, ids_keep, ctx.num_tokens)
        return grad_x, None, None

    torch.library.register_autograd("maskmentor::mask_gather", backward, setup_context=setup_context)

    # The backward is linear in grad_visible, and its own gradient is the gather again:
    # this is what makes double backward through the op work.
    def setup_context_bw(ctx, inputs, output):
        _, ids_keep, _ = inputs
        ctx.save_for_backward(ids_keep)

    def backward_bw(ctx, grad_grad_x):
        (ids_keep,) = ctx.saved_tensors
        index = ids_keep.unsqueeze(-1).expand(-1, -1, grad_grad_x.shape[-1])
        return torch.gather(grad_grad_x, 1, index), None, None

    torch.library.register_autograd("maskmentor::mask_gather_backward", backward_bw,
                                    setup_context=setup_context_bw)


_load()


def available(device: torch.device) -> bool:
    """Whether the op has a kernel for this device (and is not switched off)."""
    return LOADED and not _disabled and (device.type == "cpu" or (device.type == "cuda" and CUDA))


@contextlib.contextmanager
def reference_only():
    """Run the pure-PyTorch reference inside the block (bench.py's side-by-side timings)."""
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before


def backend() -> str:
    """One line saying which implementation of the gather runs, for the CLIs' start-up."""
    if LOADED:
        devices = "CPU and CUDA kernels" if CUDA else "CPU kernel; reference on CUDA"
        return f"masking: fused mask_gather op (csrc/, maskmentor_C: {devices})"
    return f"masking: pure-PyTorch reference ({WHY})"
