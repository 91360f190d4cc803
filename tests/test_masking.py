"""Algorithm 1 and patch masking: the properties docs/method.md §3 lists, checked exactly or
statistically with tolerances derived from the sample size."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import masking
from conftest import gen

probs = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))


def tol(p, n, sigmas=5.0):
    """Half-width of a 5-sigma interval for an empirical frequency of n draws."""
    return sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


# --- Algorithm 1 ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(B=st.integers(1, 64), K=st.integers(1, 8), p=probs, seed=st.integers(0, 2**31))
def test_never_all_dropped_and_count_in_range(B, K, p, seed):
    keep = masking.sample_modality_keep(B, K, p, gen(seed))
    assert keep.shape == (B, K) and keep.dtype == torch.bool
    m = keep.sum(1)
    assert (m >= 1).all() and (m <= K).all()


@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 64), K=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_p0_keeps_all_p1_keeps_exactly_one(B, K, seed):
    assert masking.sample_modality_keep(B, K, 0.0, gen(seed)).all()
    assert (masking.sample_modality_keep(B, K, 1.0, gen(seed)).sum(1) == 1).all()


@pytest.mark.parametrize("K", [2, 3, 4, 5])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_marginal_drop_is_balanced_and_exact(K, p):
    n = 100_000
    keep = masking.sample_modality_keep(n, K, p, gen(K * 10 + int(p * 10)))
    exact = masking.modality_drop_marginal(K, p)
    for k in range(K):     # every modality, not just on average: the random sort balances them
        assert abs((~keep[:, k]).float().mean().item() - exact) < tol(exact, n)
    all_kept = (1 - p) ** K
    assert abs(keep.all(1).float().mean().item() - all_kept) < tol(all_kept, n)


def test_spec_numbers():
    assert masking.modality_drop_marginal(3, 0.5) == pytest.approx(11 / 24)
    assert masking.kept_count_distribution(3, 0.5) == pytest.approx([0, 0.5, 0.375, 0.125])
    assert masking.modality_drop_marginal(1, 0.7) == 0.0      # a lone modality is always kept


@pytest.mark.parametrize("K,p", [(2, 0.3), (3, 0.5), (4, 0.6), (6, 0.5)])
def test_kept_count_distribution_matches_samples(K, p):
    n = 100_000
    exact = masking.kept_count_distribution(K, p)
    assert sum(exact) == pytest.approx(1.0) and exact[0] == 0 and exact[K] == pytest.approx((1 - p) ** K)
    counts = masking.sample_modality_keep(n, K, p, gen(7)).sum(1).bincount(minlength=K + 1).double() / n
    for m in range(K + 1):
        assert abs(counts[m].item() - exact[m]) < tol(exact[m], n)


@pytest.mark.parametrize("K,p", [(2, 0.5), (3, 0.5), (3, 0.2)])
def test_at_least_one_dropped_variant(K, p):
    n = 60_000
    keep = masking.sample_modality_keep(n, K, p, gen(3), at_least_one_dropped=True)
    assert not keep.all(1).any() and keep.any(1).all()
    exact = masking.modality_drop_marginal(K, p, at_least_one_dropped=True)
    for k in range(K):
        assert abs((~keep[:, k]).float().mean().item() - exact) < tol(exact, n)
    with pytest.raises(ValueError):
        masking.sample_modality_keep(4, 1, 0.5, at_least_one_dropped=True)
    with pytest.raises(ValueError):
        masking.sample_modality_keep(4, 3, 0.0, at_least_one_dropped=True)


def test_same_seed_same_draw_different_seed_different():
    a = masking.sample_modality_keep(256, 3, 0.5, gen(1))
    b = masking.sample_modality_keep(256, 3, 0.5, gen(1))
    c = masking.sample_modality_keep(256, 3, 0.5, gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    cfg = masking.MaskingConfig(budget=20)
    p1 = masking.plan_masking(8, 3, 64, cfg, True, gen(5))
    p2 = masking.plan_masking(8, 3, 64, cfg, True, gen(5))
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y
               for x, y in zip(vars(p1).values(), vars(p2).values()))
    assert p1.budget == 20 and p1.padded is False          # what the plan tells torch.compile


def test_bad_arguments():
    with pytest.raises(ValueError):
        masking.sample_modality_keep(4, 3, 1.5)
    with pytest.raises(ValueError):
        masking.sample_modality_keep(4, 0, 0.5)


# --- patch budgets ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(B=st.integers(1, 32), K=st.integers(1, 5), budget=st.integers(1, 200), p=probs,
       alpha=st.sampled_from([1.0, 0.3, 2.5]), seed=st.integers(0, 2**31))
def test_dirichlet_counts_exact_budget(B, K, budget, p, alpha, seed):
    g = gen(seed)
    keep = masking.sample_modality_keep(B, K, p, g)
    n = masking.dirichlet_visible_counts(keep, budget, alpha, g)
    assert n.dtype == torch.int64 and n.shape == (B, K)
    assert (n.sum(1) == budget).all()             # the fixed budget, exactly
    assert (n[~keep] == 0).all()                  # a dropped modality gets no visible token
    assert (n >= 0).all() and (n <= budget).all()


def test_dirichlet_split_is_uniform_on_average():
    # alpha = 1 over M kept modalities: each gets budget / M tokens in expectation.
    # With two kept modalities the share is Uniform(0, 1): std of a count = 98 / sqrt(12).
    n_draws = 100_000
    keep = torch.tensor([[True, True, False]]).repeat(n_draws, 1)
    n = masking.dirichlet_visible_counts(keep, 98, 1.0, gen(0)).double()
    half_width = 5 * (98 / math.sqrt(12)) / math.sqrt(n_draws)
    assert abs(n[:, 0].mean().item() - 49) < half_width
    assert abs(n[:, 1].mean().item() - 49) < half_width


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_gamma_sampler_moments(alpha):
    x = masking._sample_gamma(alpha, (200_000,), gen(1), "cpu").double()
    # Gamma(alpha, 1): mean alpha, variance alpha.
    assert abs(x.mean().item() - alpha) < 5 * math.sqrt(alpha / x.numel())
    assert x.var().item() == pytest.approx(alpha, rel=0.03)


def test_mae_counts():
    keep = torch.tensor([[True, False, True]])
    assert masking.mae_visible_counts(keep, 196, 0.75).tolist() == [[49, 49, 49]]


# --- the gather -------------------------------------------------------------------


def brute_force(x, noise, num_visible):
    """Per sample and modality: sort (noise, index) pairs, keep the first n."""
    B, L, D = x.shape
    K = num_visible.shape[1]
    N = L // K
    ids = []
    for b in range(B):
        row = []
        for k in range(K):
            pairs = sorted((noise[b, k * N + i].item(), k * N + i) for i in range(N))
            row += [i for _, i in pairs[: num_visible[b, k]]]
        ids.append(row)
    return torch.tensor(ids, dtype=torch.long).view(B, -1)


@st.composite
def gather_case(draw):
    B, K, N, D = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 6))
    V = draw(st.integers(0, N))
    rows = []
    for _ in range(B):   # random split of V over K modalities, each <= N
        parts = [0] * K
        for _ in range(V):
            parts[draw(st.sampled_from([k for k in range(K) if parts[k] < N]))] += 1
        rows.append(parts)
    seed = draw(st.integers(0, 2**31))
    ties = draw(st.booleans())
    g = gen(seed)
    noise = torch.rand(B, K * N, generator=g)
    if ties:                                # few distinct values: ties must go by index
        noise = (noise * 3).floor() / 3
    return torch.randn(B, K * N, D, generator=g), noise, torch.tensor(rows, dtype=torch.long)


@settings(max_examples=200, deadline=None)
@given(gather_case())
def test_reference_gather_properties(case):
    x, noise, nv = case
    B, L, D = x.shape
    K = nv.shape[1]
    N, V = L // K, int(nv[0].sum())
    visible, ids_keep, mask = masking.mask_gather_reference(x, noise, nv)
    assert visible.shape == (B, V, D) and ids_keep.shape == (B, V) and mask.shape == (B, L)
    assert torch.equal(ids_keep, brute_force(x, noise, nv))        # the definition, literally
    for b in range(B):
        assert len(set(ids_keep[b].tolist())) == V                 # unique
        assert ((ids_keep[b] >= 0) & (ids_keep[b] < L)).all()      # in range
        assert torch.equal((ids_keep[b] // N).bincount(minlength=K), nv[b])   # per-modality counts
    assert torch.equal(visible, x[torch.arange(B)[:, None], ids_keep])
    assert (mask.sum(1) == L - V).all()
    assert not mask.gather(1, ids_keep).any()


def test_restore_after_keep_is_identity():
    g = gen(0)
    cfg = masking.MaskingConfig(budget=10)
    plan = masking.plan_masking(6, 3, 16, cfg, True, g)
    x = torch.randn(6, 48, 5, generator=g)
    m = masking.apply_masking(x, plan)
    hidden_ids = torch.stack([torch.nonzero(row).flatten() for row in m.mask])       # ascending
    hidden = x.gather(1, hidden_ids.unsqueeze(-1).expand(-1, -1, 5))
    full = torch.cat([m.visible, hidden], 1).gather(1, m.ids_restore.unsqueeze(-1).expand(-1, -1, 5))
    assert torch.equal(full, x)
    ids_shuffle = torch.cat([m.ids_keep, hidden_ids], 1)
    assert torch.equal(ids_shuffle.gather(1, m.ids_restore), torch.arange(48).expand(6, 48))


def test_dropped_modality_has_no_visible_token():
    g = gen(4)
    cfg = masking.MaskingConfig(budget=12, p_drop=0.7)
    plan = masking.plan_masking(64, 3, 16, cfg, True, g)
    m = masking.apply_masking(torch.randn(64, 48, 2), plan)
    assert m.pad is None
    visible_mod = m.ids_keep // 16
    for b in range(64):
        assert set(visible_mod[b].tolist()) <= set(torch.nonzero(plan.keep[b]).flatten().tolist())
        for k in range(3):
            if not plan.keep[b, k]:
                assert m.mask[b, k * 16:(k + 1) * 16].all()


def test_mae_scheme_pads_dropped_modalities():
    g = gen(2)
    cfg = masking.MaskingConfig(patch_masking="mae", mask_ratio=0.75, p_drop=0.5)
    plan = masking.plan_masking(32, 3, 16, cfg, True, g)
    m = masking.apply_masking(torch.randn(32, 48, 2), plan)
    assert m.visible.shape[1] == 12                 # 4 per modality, dropped ones included
    assert m.pad is not None
    assert torch.equal(m.pad, ~plan.keep.gather(1, m.ids_keep // 16))
    for b in range(32):
        for k in range(3):
            if not plan.keep[b, k]:
                assert m.mask[b, k * 16:(k + 1) * 16].all()
            else:
                assert m.mask[b, k * 16:(k + 1) * 16].sum() == 12


@pytest.mark.parametrize("bad", ["sums", "count", "dtype", "shape", "split"])
def test_gather_bad_input(bad):
    x, noise = torch.randn(2, 12, 3), torch.rand(2, 12)
    nv = torch.tensor([[2, 1, 1], [1, 1, 2]])
    if bad == "sums":
        nv = torch.tensor([[2, 1, 1], [1, 1, 1]])
    elif bad == "count":
        nv = torch.tensor([[5, 0, 0], [1, 2, 2]])
    elif bad == "dtype":
        noise = noise.double()
    elif bad == "shape":
        noise = noise[:, :10]
    elif bad == "split":
        x, noise = torch.randn(2, 13, 3), torch.rand(2, 13)
    with pytest.raises(ValueError, match="mask_gather"):
        masking.mask_gather_reference(x, noise, nv)
