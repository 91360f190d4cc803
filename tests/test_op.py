"""The fused mask_gather op (csrc/): it must equal masking.mask_gather_reference bit for
bit (visible rows, ids_keep, mask, and the gradient w.r.t. x), pass torch.library's
opcheck, reject bad input with a clear message, trace under torch.compile, and be what
masking.mask_gather dispatches to.

Every test that needs the compiled extension fails when it is not built (pip install
--no-build-isolation -e . builds it, on CI too); the CUDA tests skip without a GPU.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import masking
from util import ops
from conftest import ROOT, gen

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def op():
    try:
        import maskmentor_C  # noqa: F401
    except ImportError as e:  # not built, or built against another torch
        pytest.fail(f"the C++ extension is not available ({e}); pip install --no-build-isolation -e .")
    if not ops.LOADED:
        pytest.fail(f"fused op not loaded: {ops.backend()}")
    return torch.ops.maskmentor.mask_gather


@pytest.fixture(scope="module")
def cuda_op(op):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not ops.CUDA:
        pytest.skip("maskmentor_C was built without its CUDA kernels")
    return op


def random_counts(B, K, N, V, g):
    """Long[B, K], each row a random split of V into K counts in [0, N]: the first V of
    a random permutation of the K*N token slots, counted per modality."""
    rows = [torch.bincount(torch.randperm(K * N, generator=g)[:V] // N, minlength=K) for _ in range(B)]
    return torch.stack(rows) if B else torch.zeros(0, K, dtype=torch.long)


def make_noise(B, L, kind, g):
    noise = torch.rand(B, L, generator=g)
    if kind == "ties":                         # few distinct values: ties go by index
        noise = (noise * 3).floor() / 3
    elif kind == "special":                    # torch.sort's order: -0 == +0, NaN last
        specials = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan")])
        noise = specials[torch.randint(0, len(specials), (B, L), generator=g)]
    return noise


def make_case(B, K, N, D, V, dtype, noise_kind="uniform", seed=0):
    g = gen(seed)
    x = torch.randn(B, K * N, D, generator=g).to(dtype)
    return x, make_noise(B, K * N, noise_kind, g), random_counts(B, K, N, V, g)


def assert_same(got, want):
    for name, a, b in zip(("visible", "ids_keep", "mask"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


def check_against_reference(op, x, noise, num_visible, seed=0):
    """Outputs and the gradient w.r.t. x equal the reference's exactly."""
    xr = x.clone().requires_grad_()
    xo = x.clone().requires_grad_()
    want = masking.mask_gather_reference(xr, noise, num_visible)
    got = op(xo, noise, num_visible)
    assert_same(got, want)
    grad_visible = torch.randn(want[0].shape, generator=gen(seed)).to(x.dtype).to(x.device)
    (gr,) = torch.autograd.grad(want[0], xr, grad_visible)
    (go,) = torch.autograd.grad(got[0], xo, grad_visible)
    assert torch.equal(go, gr)


# --- exact agreement with the reference ---------------------------------------------


@st.composite
def cases(draw):
    B, K, N, D = draw(st.integers(0, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 24)), draw(st.integers(1, 9))
    V = draw(st.integers(0, K * N))            # 0 .. every token visible
    dtype = draw(st.sampled_from(DTYPES))
    noise_kind = draw(st.sampled_from(["uniform", "ties", "special"]))
    return make_case(B, K, N, D, V, dtype, noise_kind, draw(st.integers(0, 2**31)))


@settings(max_examples=300, deadline=None)
@given(cases())
def test_equals_reference(op, case):
    check_against_reference(op, *case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_reference_vit_b(op, dtype):
    # The shapes of pre-training: big enough for at::parallel_for to split the work.
    check_against_reference(op, *make_case(12, 3, 196, 768, 98, dtype))


@pytest.mark.parametrize("D,V", [(768, 1), (768, 588), (767, 98), (784, 300)])
def test_large_gradients_both_store_paths(op, D, V):
    # grad_x of 8 MiB or more is written with streaming stores when its rows are whole
    # cache lines (D=768, 784 in fp32), with memcpy/memset otherwise (D=767): both must
    # equal the reference, with almost nothing kept (V=1) and everything kept (V=K*N).
    check_against_reference(op, *make_case(12, 3, 196, D, V, torch.float32))


def test_budget_extremes(op):
    x, noise, _ = make_case(3, 3, 5, 4, 0, torch.float32)
    for num_visible in ([[0, 0, 0]] * 3,                       # nothing visible
                        [[5, 5, 5]] * 3,                       # everything visible
                        [[5, 0, 0], [0, 5, 0], [0, 0, 5]]):    # one whole modality each
        check_against_reference(op, x, noise, torch.tensor(num_visible))


def test_empty_batch_and_zero_width(op):
    check_against_reference(op, *make_case(0, 3, 4, 2, 0, torch.float32))
    x, noise, num_visible = make_case(2, 2, 4, 1, 3, torch.float32)
    check_against_reference(op, x[:, :, :0], noise, num_visible)   # D = 0


def test_non_contiguous_inputs(op):
    x, noise, num_visible = make_case(4, 3, 8, 6, 7, torch.float32)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)            # same values, other strides
    noise_t = noise.t().contiguous().t()
    check_against_reference(op, x_t[:, :, ::2], noise_t, num_visible)


def test_double_backward(op):
    x, noise, num_visible = make_case(2, 3, 4, 3, 5, torch.float64)
    x.requires_grad_()
    f = lambda x: op(x, noise, num_visible)[0]                     # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


# --- torch.library.opcheck -------------------------------------------------------------


OPCHECK_SHAPES = [(2, 3, 8, 5, 6), (1, 1, 4, 3, 4), (3, 2, 16, 8, 0)]   # (B, K, N, D, V)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", OPCHECK_SHAPES)
def test_opcheck(op, shape, dtype):
    x, noise, num_visible = make_case(*shape, dtype)
    torch.library.opcheck(op, (x.requires_grad_(), noise, num_visible))
    ids_keep = op(x, noise, num_visible)[1]
    grad_visible = torch.randn(shape[0], shape[4], shape[3]).to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.maskmentor.mask_gather_backward,
                          (grad_visible, ids_keep, x.shape[1]))


# --- bad input ---------------------------------------------------------------------------


BAD = {
    "unequal row sums": ({"num_visible": [[2, 1, 1], [1, 1, 1]]}, "same sum"),
    "count > N": ({"num_visible": [[5, 0, 0], [1, 2, 2]]}, r"in \[0, N=4\]"),
    "negative count": ({"num_visible": [[-1, 3, 2], [1, 2, 1]]}, r"in \[0, N=4\]"),
    "noise float64": ({"noise_dtype": torch.float64}, "noise must be float32"),
    "num_visible int32": ({"nv_dtype": torch.int32}, "num_visible must be int64"),
    "noise shape": ({"noise_len": 10}, "noise must be float32 of shape"),
    "num_visible batch": ({"num_visible": [[2, 1, 1]]}, "num_visible must be int64"),
    "x not float": ({"x_dtype": torch.int64}, "x must be a float"),
    "x 2-d": ({"x_2d": True}, "x must be a float"),
    "tokens not divisible by K": ({"num_visible": [[2, 2], [1, 3]], "noise_len": 12}, "cannot be split"),
}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_input_raises_clear_error(op, bad):
    change, message = BAD[bad]
    x, noise = torch.randn(2, 12, 3), torch.rand(2, 12)
    if "x_dtype" in change:
        x = x.to(change["x_dtype"])
    if change.get("x_2d"):
        x = x[:, :, 0]
    noise = noise[:, :change.get("noise_len", 12)].to(change.get("noise_dtype", torch.float32))
    if bad == "tokens not divisible by K":
        x, noise = torch.randn(2, 13, 3), torch.rand(2, 13)
    num_visible = torch.tensor(change.get("num_visible", [[2, 1, 1], [1, 1, 2]]),
                               dtype=change.get("nv_dtype", torch.int64))
    with pytest.raises(ValueError, match=message):
        op(x, noise, num_visible)
    with pytest.raises(ValueError, match=message):     # the same error as the reference
        masking.mask_gather_reference(x, noise, num_visible)


def test_backward_rejects_bad_ids(op):
    grad_visible = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.maskmentor.mask_gather_backward(grad_visible, torch.tensor([[0, 9]]), 4)
    with pytest.raises(ValueError, match="ids_keep must be int64"):
        torch.ops.maskmentor.mask_gather_backward(grad_visible, torch.tensor([[0, 1]], dtype=torch.int32), 4)


def test_cuda_inputs_mixed_with_cpu_rejected(cuda_op):
    x, noise, num_visible = make_case(2, 3, 4, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="same device"):
        cuda_op(x.cuda(), noise, num_visible)


# --- torch.compile -------------------------------------------------------------------------


def _compile_and_compare(fn, x, noise, num_visible, atol):
    compiled = torch.compile(fn, fullgraph=True)
    outs = []
    for f in (compiled, fn):
        xg = x.clone().requires_grad_()
        loss, ids_keep, mask = f(xg, noise, num_visible)
        (grad,) = torch.autograd.grad(loss, xg)
        outs.append((loss, ids_keep, mask, grad))
    (lc, ic, mc, gc), (le, ie, me, ge) = outs
    assert torch.equal(ic, ie) and torch.equal(mc, me)
    torch.testing.assert_close(lc, le, atol=atol, rtol=1e-5)
    torch.testing.assert_close(gc, ge, atol=atol, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph(op):
    torch._dynamo.reset()
    x, noise, num_visible = make_case(4, 3, 16, 8, 10, torch.float32)
    linear = torch.nn.Linear(8, 6)

    def fn(x, noise, num_visible):
        visible, ids_keep, mask = op(x, noise, num_visible)
        # V is a data-dependent size here; downstream ops trace with it symbolic.
        y = F.layer_norm(linear(visible), (6,))
        return y.square().sum(), ids_keep, mask

    _compile_and_compare(fn, x, noise, num_visible, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_attention_with_known_budget(op):
    # Some ops cannot trace a data-dependent length in torch 2.14: attention (dynamo
    # guards on V == 0) and, on CPU, a matmul with a constant weight (inductor's bmm
    # lowering guards on V == 1). A caller that knows the budget V states it with
    # torch._check, and then they compile.
    torch._dynamo.reset()
    x, noise, num_visible = make_case(2, 3, 16, 8, 10, torch.float32)
    w = torch.randn(8, 8, generator=gen(1))                       # not a parameter

    def fn(x, noise, num_visible):
        visible, ids_keep, mask = op(x, noise, num_visible)
        torch._check(visible.shape[1] == 10)
        q = (visible @ w).unsqueeze(1)
        return F.scaled_dot_product_attention(q, q, q).sum(), ids_keep, mask

    _compile_and_compare(fn, x, noise, num_visible, atol=1e-4)


# --- masking.mask_gather dispatch ------------------------------------------------------------


def test_mask_gather_dispatches_to_op(op, monkeypatch):
    assert "fused" in ops.backend()
    x, noise, num_visible = make_case(2, 3, 8, 4, 6, torch.float32)
    want = masking.mask_gather_reference(x, noise, num_visible)

    def no_reference(*args):
        raise AssertionError("masking.mask_gather used the reference although the op is loaded")

    monkeypatch.setattr(masking, "mask_gather_reference", no_reference)
    assert_same(masking.mask_gather(x, noise, num_visible), want)


def test_reference_forced_by_environment():
    code = ("import torch, masking\n"
            "from util import ops\n"
            "print(ops.backend())\n"
            "assert not masking.FUSED and not ops.available(torch.device('cpu'))\n"
            "x, noise = torch.randn(2, 12, 3), torch.rand(2, 12)\n"
            "nv = torch.tensor([[2, 1, 1], [1, 1, 2]])\n"
            "got, want = masking.mask_gather(x, noise, nv), masking.mask_gather_reference(x, noise, nv)\n"
            "assert all(torch.equal(a, b) for a, b in zip(got, want))\n")
    env = dict(os.environ, MASKMENTOR_REFERENCE="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pure-PyTorch reference (MASKMENTOR_REFERENCE is set)" in out.stdout


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@settings(max_examples=100, deadline=None)
@given(cases())
def test_cuda_equals_reference(cuda_op, case):
    x, noise, num_visible = (t.cuda() for t in case)
    check_against_reference(cuda_op, x, noise, num_visible)
    # ... and the CPU kernel: both devices give the same answer.
    assert_same([t.cpu() for t in cuda_op(x, noise, num_visible)], cuda_op(*case))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_equals_reference_vit_b(cuda_op, dtype):
    check_against_reference(cuda_op, *(t.cuda() for t in make_case(12, 3, 196, 768, 98, dtype)))


@pytest.mark.gpu
def test_cuda_odd_row_sizes_and_large_N(cuda_op):
    # Rows of 3 bf16 (6 bytes: 2-byte copies), a misaligned view (x[:, :, 1:]), and
    # N beyond the 48 KiB default of shared memory.
    x, noise, num_visible = make_case(3, 2, 8, 3, 5, torch.bfloat16)
    check_against_reference(cuda_op, x.cuda(), noise.cuda(), num_visible.cuda())
    x, noise, num_visible = make_case(3, 2, 8, 9, 5, torch.float32)
    check_against_reference(cuda_op, x.cuda()[:, :, 1:], noise.cuda(), num_visible.cuda())
    check_against_reference(cuda_op, *(t.cuda() for t in make_case(2, 2, 13000, 4, 700, torch.float32)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", OPCHECK_SHAPES)
def test_cuda_opcheck(cuda_op, shape, dtype):
    x, noise, num_visible = (t.cuda() for t in make_case(*shape, dtype))
    torch.library.opcheck(cuda_op, (x.requires_grad_(), noise, num_visible))
