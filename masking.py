"""masking.py — which tokens the encoder sees: the two-stage masking of M²IM.

MaskMentor's pre-training input is masked twice (paper §3.3, Algorithm 1; the listing,
with the line numbers cited below, is in docs/method.md §3.1 and at stage 1 below):

  stage 1, modality level (Algorithm 1, lines 1-16): whole modalities are dropped at
           random, never all of them — `sample_modality_keep`;
  stage 2, patch level (line 17-19): the surviving modalities share a fixed budget of
           visible tokens, split by a Dirichlet draw as in MultiMAE (the default), or
           each keeps the same ratio as in MAE (an option) — `dirichlet_visible_counts`,
           `mae_visible_counts`;
  stage 3, the gather: each modality keeps its tokens of lowest random noise, which are
           gathered into one short sequence for the encoder — `mask_gather`.

Stages 1 and 2 are B×K work (batch × modalities) and stay in readable Python.
Stage 3 touches every token; it has a pure-PyTorch reference here
(`mask_gather_reference`, the MAE argsort + gather recipe) and a fused C++/CUDA op from
`csrc/` that computes exactly the same thing in one pass. `mask_gather` uses the op
when the extension is built (setup.py builds it; util/ops.py registers what torch.compile
needs and says which implementation runs), the reference otherwise.

Nothing here knows about images or networks: the inputs are a batch size, the number of
modalities K, the tokens per modality N, and a `torch.Generator`, so every draw is
reproducible. docs/method.md §3 is the prose beside this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

try:      # the fused op of csrc/, built by setup.py; importing it registers torch.ops.maskmentor
    import maskmentor_C
except ImportError:
    maskmentor_C = None
# Whether mask_gather may use the fused op (where it has a kernel for the device); util/ops.py
# switches it off for MASKMENTOR_REFERENCE=1 and for studies/bench.py's side-by-side timings.
FUSED = maskmentor_C is not None

# -----------------------------------------------------------------------------
# Stage 1 — Algorithm 1: which modalities survive
#
# The paper's listing (O: the kept modalities; p_m: the drop probability):
#    1: Initialize O = ∅, q = 0.                       (q: a typo for g, decision D2)
#    2: Randomly sort input data Q ← RandomSort(Q).
#    3: for k = 1, 2, ..., K − 1 do
#    4:     Uniformly sample v from [0, 1].
#    5:     if v ≥ p_m then
#    6:         O ← O ∪ {X_k}, g ← 1.
#    7:     end if
#    8: end for
#    9: if g == 0 then
#   10:     O ← O ∪ {X_K}
#   11: else
#   12:     Uniformly sample v from [0, 1].
#   13:     if v ≥ p_m then
#   14:         O ← O ∪ {X_K}
#   15:     end if
#   16: end if
#   17: for each X in O do
#   18:     X ← PatchMasking(X)                         (stage 2 and 3 below)
#   19: end for


def sample_modality_keep(batch_size: int, num_modalities: int, p_drop: float = 0.5,
                         generator: Optional[torch.Generator] = None,
                         at_least_one_dropped: bool = False,
                         device=None) -> torch.Tensor:
    """Algorithm 1, lines 1-16, for a whole batch at once. Returns Bool[B, K], True = kept.

    Per sample:
      line 2      put the K modalities in a random order;
      lines 3-8   each of the first K-1 is kept when a uniform draw v >= p_drop;
                  g records whether any of them was kept (the listing's `q` is a typo
                  for `g`, decision D2 of docs/method.md);
      lines 9-16  if none was kept, the last one is kept unconditionally, so a sample
                  never loses every modality; otherwise it too is kept iff v >= p_drop.
    The random order (line 2) is what makes every modality equally likely to be
    dropped; `modality_drop_marginal` gives that probability exactly.

    `at_least_one_dropped=True` is Figure 2's caption ("at least one modality is masked")
    rather than the algorithm: draws that keep all K are redrawn, i.e. Algorithm 1
    conditioned on dropping something. The default follows Algorithm 1 (decision D1).
    """
    K = num_modalities
    if K < 1:
        raise ValueError(f"num_modalities must be >= 1, got {K}")
    if not 0.0 <= p_drop <= 1.0:
        raise ValueError(f"p_drop must be in [0, 1], got {p_drop}")
    if at_least_one_dropped and (K == 1 or p_drop == 0.0):
        raise ValueError("at_least_one_dropped needs K >= 2 and p_drop > 0: "
                         "otherwise no draw can drop a modality")
    keep = _algorithm1(batch_size, K, p_drop, generator, device)
    if at_least_one_dropped:
        # Rejection sampling, vectorised: redraw only the rows that kept everything.
        while True:
            redo = keep.all(dim=1)
            n = int(redo.sum())
            if n == 0:
                break
            keep[redo] = _algorithm1(n, K, p_drop, generator, device)
    return keep


def _algorithm1(B: int, K: int, p: float, generator, device) -> torch.Tensor:
    order = torch.argsort(torch.rand(B, K, generator=generator, device=device), dim=1)  # line 2
    v = torch.rand(B, K, generator=generator, device=device)   # one uniform per slot (lines 4, 12)
    kept_sorted = torch.empty(B, K, dtype=torch.bool, device=device)
    kept_sorted[:, :K - 1] = v[:, :K - 1] >= p                  # lines 3-8
    g = kept_sorted[:, :K - 1].any(dim=1)                       # "some modality kept so far"
    kept_sorted[:, K - 1] = torch.where(g, v[:, K - 1] >= p, True)  # lines 9-16
    # Slot j of the sorted list holds modality order[:, j]: undo the sort.
    return torch.empty_like(kept_sorted).scatter_(1, order, kept_sorted)


def modality_drop_marginal(num_modalities: int, p_drop: float,
                           at_least_one_dropped: bool = False) -> float:
    """Exact P(a given modality is dropped) under Algorithm 1 (docs/method.md §3.1).

    After the random sort a modality sits in one of the first K-1 slots with probability
    (K-1)/K, where it is dropped with probability p; or in the last slot, where it is
    dropped only if some earlier one was kept (1 - p^(K-1)) and then its own draw drops
    it (p):  P(drop) = [(K-1) p + (1 - p^(K-1)) p] / K   (K=3, p=0.5: 11/24).
    With `at_least_one_dropped` the draw is conditioned on "not all kept", whose
    probability is 1 - (1-p)^K; dropping a modality implies that event, so the marginal
    is simply divided by it.
    """
    K, p = num_modalities, p_drop
    marginal = ((K - 1) * p + (1 - p ** (K - 1)) * p) / K
    if at_least_one_dropped:
        marginal /= 1 - (1 - p) ** K
    return marginal


def kept_count_distribution(num_modalities: int, p_drop: float) -> list[float]:
    """Exact distribution of M, the number of kept modalities: P(M = m) for m = 0..K.

    The first K-1 slots keep X ~ Binomial(K-1, 1-p) modalities. If X = 0 the last is kept
    (M = 1); otherwise the last is kept with probability 1-p (M = X or X+1).
    P(M = 0) is always 0 and P(M = K) = (1-p)^K.
    """
    K, p = num_modalities, p_drop
    probs = [0.0] * (K + 1)
    for x in range(K):
        px = math.comb(K - 1, x) * (1 - p) ** x * p ** (K - 1 - x)
        if x == 0:
            probs[1] += px
        else:
            probs[x] += px * p
            probs[x + 1] += px * (1 - p)
    return probs


# -----------------------------------------------------------------------------
# Stage 2 — how many visible tokens each surviving modality gets


def dirichlet_visible_counts(keep: torch.Tensor, budget: int, alpha: float = 1.0,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """MultiMAE's multi-modal token sampling over the kept modalities. Long[B, K].

    A fixed budget of visible tokens (98 of 3x196 at 224/16) is split between the kept
    modalities by proportions p ~ Dirichlet(alpha) (MultiMAE §3.2); a dropped modality
    gets 0. n_k = p_k * budget is rounded by largest remainder, so that every row sums to
    exactly `budget` (MultiMAE instead rounds each n_k and fixes the total afterwards by
    random re-selection; decision D3 of docs/method.md keeps the budget exact). The caller must ensure
    budget <= tokens per modality, so that one modality alone can hold the whole budget.
    """
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError("keep must be a Bool[B, K] tensor")
    if not keep.any(dim=1).all():
        raise ValueError("every sample needs at least one kept modality")
    # A Dirichlet draw over the kept subset = independent Gamma(alpha) draws, zeroed
    # for the dropped modalities, normalised to sum to one.
    g = _sample_gamma(alpha, keep.shape, generator, keep.device).clamp_min(1e-30) * keep
    share = g / g.sum(dim=1, keepdim=True)
    exact = share * budget
    counts = exact.floor().long()
    missing = budget - counts.sum(dim=1, keepdim=True)          # 0 .. K-1 tokens lost to floor
    remainder = (exact - counts).masked_fill(~keep, -1.0)       # dropped ones never get one
    # rank of each modality's remainder within its row (0 = largest); ties by index.
    rank = torch.argsort(torch.argsort(-remainder, dim=1, stable=True), dim=1)
    return counts + (rank < missing).long()


def mae_visible_counts(keep: torch.Tensor, num_tokens: int, mask_ratio: float = 0.75) -> torch.Tensor:
    """MAE's patch masking applied per modality (the option Algorithm 1 line 17 cites).

    Every modality keeps round(N * (1 - mask_ratio)) tokens — dropped ones included, so
    that every row of the batch has the same length; `apply_masking` then marks the
    dropped modalities' tokens as padding that attention ignores and the loss treats as
    masked. Long[B, K].
    """
    n = int(round(num_tokens * (1.0 - mask_ratio)))
    if not 0 <= n <= num_tokens:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    return torch.full(keep.shape, n, dtype=torch.long, device=keep.device)


def _sample_gamma(alpha: float, shape, generator, device) -> torch.Tensor:
    """Gamma(alpha, 1) samples drawn from `generator` (torch's own sampler takes none).

    alpha = 1 (MultiMAE's value) is the exponential distribution, -log(1 - U). Other
    alphas use Marsaglia & Tsang's squeeze method (2000), boosted by U^(1/alpha) below 1.
    """
    if not 0 < alpha < math.inf:        # NaN or inf would never be accepted by the loop below
        raise ValueError(f"Dirichlet alpha must be a positive finite number, got {alpha}")
    if alpha == 1.0:
        return -torch.log1p(-torch.rand(shape, generator=generator, device=device))
    a = alpha if alpha >= 1 else alpha + 1
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(shape, device=device)
    todo = torch.ones(shape, dtype=torch.bool, device=device)
    while todo.any():
        x = torch.randn(shape, generator=generator, device=device)
        u = torch.rand(shape, generator=generator, device=device)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        take = todo & ok
        out[take] = (d * v)[take]
        todo &= ~take
    if alpha < 1:
        out = out * torch.rand(shape, generator=generator, device=device) ** (1.0 / alpha)
    return out


# -----------------------------------------------------------------------------
# Stage 3 — the gather: keep each modality's lowest-noise tokens


def _check_mask_gather_args(x: torch.Tensor, noise: torch.Tensor, num_visible: torch.Tensor) -> None:
    """The contract of mask_gather, checked with one clear message per violation."""
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"mask_gather: x must be a float [B, K*N, D] tensor, got {tuple(x.shape)} {x.dtype}")
    if noise.dtype != torch.float32 or noise.shape != x.shape[:2]:
        raise ValueError(f"mask_gather: noise must be float32 of shape {tuple(x.shape[:2])}, "
                         f"got {tuple(noise.shape)} {noise.dtype}")
    if num_visible.dtype != torch.int64 or num_visible.dim() != 2 or num_visible.shape[0] != x.shape[0]:
        raise ValueError(f"mask_gather: num_visible must be int64 [B, K], got {tuple(num_visible.shape)} "
                         f"{num_visible.dtype}")
    if noise.device != x.device or num_visible.device != x.device:
        raise ValueError("mask_gather: x, noise and num_visible must be on the same device")
    K = num_visible.shape[1]
    if K == 0 or x.shape[1] % K != 0:
        raise ValueError(f"mask_gather: {x.shape[1]} tokens cannot be split into K={K} equal modalities")
    N = x.shape[1] // K
    if x.shape[0] > 0:
        if (num_visible < 0).any() or (num_visible > N).any():
            raise ValueError(f"mask_gather: num_visible must be in [0, N={N}]")
        sums = num_visible.sum(dim=1)
        if (sums != sums[0]).any():
            raise ValueError("mask_gather: every row of num_visible must have the same sum "
                             f"(the visible budget V), got {sums.tolist()}")


def mask_gather_reference(x: torch.Tensor, noise: torch.Tensor, num_visible: torch.Tensor):
    """The pure-PyTorch definition of the fused op (MAE's `random_masking`, per modality).

    x            [B, K*N, D]  patch tokens of K modalities, modality k at k*N .. (k+1)*N-1
    noise        [B, K*N]     float32 random score per token
    num_visible  [B, K]       int64 tokens to keep per modality; rows sum to the same V
    returns
    visible      [B, V, D]    the kept tokens, ordered by modality, then ascending noise
    ids_keep     [B, V]       int64 their flat positions in x
    mask         [B, K*N]     bool, True where a token was NOT kept

    Within each modality a stable argsort orders the tokens by noise (ties by index);
    the first num_visible[b, k] of that order are kept.
    """
    _check_mask_gather_args(x, noise, num_visible)
    B, L, D = x.shape
    K = num_visible.shape[1]
    N = L // K
    V = int(num_visible[0].sum()) if B > 0 else 0
    order = torch.argsort(noise.view(B, K, N), dim=2, stable=True)          # ascending: small = keep
    keep_slot = torch.arange(N, device=x.device) < num_visible.unsqueeze(2)  # first n_k of each order
    flat = order + N * torch.arange(K, device=x.device).view(1, K, 1)       # positions in x
    # Boolean indexing reads [B, K, N] row-major: by sample, then modality, then rank.
    ids_keep = flat[keep_slot].view(B, V)
    visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(B, V, D))
    mask = torch.ones(B, L, dtype=torch.bool, device=x.device).scatter_(1, ids_keep, False)
    return visible, ids_keep, mask


def fused_kernel(device: torch.device) -> bool:
    """Whether the fused op will run on this device: built, allowed (FUSED), and with a
    kernel there (CPU always; CUDA when it was built with nvcc)."""
    return FUSED and (device.type == "cpu" or (device.type == "cuda" and maskmentor_C.cuda))


def mask_gather(x: torch.Tensor, noise: torch.Tensor, num_visible: torch.Tensor,
                budget: Optional[int] = None):
    """Stage 3 — the fused op of csrc/ when it has a kernel for x's device, else the
    reference. Same results either way, bit for bit (tests/test_op.py).

    `budget`, when given, is V, the visible tokens per sample (every row of num_visible
    sums to it). The op's output length is read from the data, so torch.compile first
    sees it as an unknown size; stating that it equals the budget lets the whole network
    after the gather be compiled with fixed shapes (and checks it, compiled or not)."""
    if fused_kernel(x.device):
        visible, ids_keep, mask = torch.ops.maskmentor.mask_gather(x, noise, num_visible)
    else:
        visible, ids_keep, mask = mask_gather_reference(x, noise, num_visible)
    if budget is not None:
        torch._check(visible.shape[1] == budget, lambda: "mask_gather: V differs from the plan's budget")
    return visible, ids_keep, mask


# -----------------------------------------------------------------------------
# Putting it together: a plan per batch, then the masked token sequence


@dataclass
class MaskingConfig:
    """Every knob of M²IM's masking; defaults are the paper's (docs/method.md §3)."""
    budget: int = 98                 # visible tokens over all modalities (MultiMAE: 98 of 3x196)
    alpha: float = 1.0               # Dirichlet concentration (MultiMAE)
    p_drop: float = 0.5              # p_m, modality masking probability (paper §4.1)
    patch_masking: str = "dirichlet"  # "dirichlet" (MultiMAE, default) or "mae" (per-modality ratio)
    mask_ratio: float = 0.75         # only for patch_masking="mae" (MAE's default ratio)
    at_least_one_dropped: bool = False  # Figure 2's caption instead of Algorithm 1


@dataclass
class MaskPlan:
    """What to hide in one batch, decided before any token exists (B×K work)."""
    keep: torch.Tensor         # Bool[B, K]   modality survives stage 1
    num_visible: torch.Tensor  # Long[B, K]   visible tokens per modality (stage 2)
    noise: torch.Tensor        # Float[B, K*N] one random score per token (stage 3)
    # Two facts about the tensors above, as Python values, so that the masked forward need
    # not read them from the data (torch.compile cannot branch on, or size by, tensor values;
    # None: apply_masking reads them from the tensors):
    budget: Optional[int] = None    # V, every row's sum of num_visible
    padded: Optional[bool] = None   # some dropped modality still holds visible slots ("mae")


def plan_masking(batch_size: int, num_modalities: int, num_tokens: int, cfg: MaskingConfig,
                 drop_modalities: bool, generator: Optional[torch.Generator] = None,
                 device=None, keep: Optional[torch.Tensor] = None) -> MaskPlan:
    """Draw stages 1 and 2 and the token noise for a batch.

    drop_modalities=False is the teacher / plain MIM (complete modalities, patch masking
    only); True is the student / M²IM (Algorithm 1 first). `keep` (Bool[B, K]) fixes the
    outcome of stage 1 instead, e.g. "rgb only" for a picture (util/vis.py).
    """
    B, K, N = batch_size, num_modalities, num_tokens
    if keep is not None:
        keep = keep.to(device=device, dtype=torch.bool)
    elif drop_modalities:
        keep = sample_modality_keep(B, K, cfg.p_drop, generator, cfg.at_least_one_dropped, device)
    else:
        keep = torch.ones(B, K, dtype=torch.bool, device=device)
    if cfg.patch_masking == "dirichlet":
        if not 0 < cfg.budget <= N:
            raise ValueError(f"the visible budget must be in [1, N={N}] so that one modality "
                             f"can hold it, got {cfg.budget}")
        num_visible = dirichlet_visible_counts(keep, cfg.budget, cfg.alpha, generator)
    elif cfg.patch_masking == "mae":
        num_visible = mae_visible_counts(keep, N, cfg.mask_ratio)
    else:
        raise ValueError(f"patch_masking must be 'dirichlet' or 'mae', got {cfg.patch_masking!r}")
    noise = torch.rand(B, K * N, generator=generator, device=device)
    return MaskPlan(keep, num_visible, noise, budget=int(num_visible[0].sum()) if B else 0,
                    padded=has_padding(keep, num_visible))


def all_visible(batch_size: int, num_modalities: int, num_tokens: int, device=None) -> MaskPlan:
    """No masking at all: every modality kept, every patch visible (a teacher's view of the
    complete input, some --token_target levels). Nothing is drawn."""
    B, K, N = batch_size, num_modalities, num_tokens
    return MaskPlan(torch.ones(B, K, dtype=torch.bool, device=device),
                    torch.full((B, K), N, dtype=torch.long, device=device),
                    torch.arange(K * N, dtype=torch.float32, device=device).expand(B, K * N),
                    budget=K * N, padded=False)


def has_padding(keep: torch.Tensor, num_visible: torch.Tensor) -> bool:
    """Whether some dropped modality keeps visible tokens (only the "mae" scheme does):
    then apply_masking marks them as padding. One look at the data, made when planning."""
    return bool((num_visible * ~keep).any())


@dataclass
class Masked:
    """Everything the model needs after masking (MAE's naming)."""
    visible: torch.Tensor      # [B, V, D] tokens given to the encoder
    ids_keep: torch.Tensor     # Long[B, V] their positions in the full K*N sequence
    ids_restore: torch.Tensor  # Long[B, K*N] unshuffles cat([visible, hidden]) to the full order
    mask: torch.Tensor         # Bool[B, K*N] True = hidden from the encoder = reconstruction target
    pad: Optional[torch.Tensor]  # Bool[B, V] True = token of a dropped modality kept only to
                                 # keep rows equally long ("mae" scheme); attention ignores it


def apply_masking(tokens: torch.Tensor, plan: MaskPlan) -> Masked:
    """Stage 3 on real tokens [B, K*N, D]: gather the visible ones, build the index maps."""
    B, L, _ = tokens.shape
    K = plan.keep.shape[1]
    N = L // K
    visible, ids_keep, hidden = mask_gather(tokens, plan.noise, plan.num_visible, plan.budget)
    V = ids_keep.shape[1]
    # ids_shuffle lists the kept positions, then the hidden ones (ascending); ids_restore
    # is its inverse permutation, so gather(cat([visible, hidden]), ids_restore) puts every
    # token back in place (MAE's unshuffle).
    hidden_first = torch.argsort((~hidden).to(torch.uint8), dim=1, stable=True)
    ids_shuffle = torch.cat([ids_keep, hidden_first[:, :L - V]], dim=1)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(
        1, ids_shuffle, torch.arange(L, device=tokens.device).expand(B, L))
    pad = None
    mask = hidden
    if _padded(plan):
        # "mae" scheme: dropped modalities still occupy slots; mark them so the encoder
        # ignores them and the loss reconstructs all of their patches.
        pad = (~plan.keep).gather(1, ids_keep // N)
        mask = _with_dropped(hidden, plan.keep)
    return Masked(visible, ids_keep, ids_restore, mask, pad)


def hidden_mask(plan: MaskPlan) -> torch.Tensor:
    """Masked.mask of the forward that `plan` will make (True = hidden: a reconstruction
    target), from the plan alone, before any token exists: the reference gather on tokens
    of width 0 (no data moved), and the "mae" scheme's dropped modalities."""
    hidden = mask_gather_reference(plan.noise.new_zeros(*plan.noise.shape, 0), plan.noise, plan.num_visible)[2]
    return _with_dropped(hidden, plan.keep) if _padded(plan) else hidden


def _padded(plan: MaskPlan) -> bool:
    return has_padding(plan.keep, plan.num_visible) if plan.padded is None else plan.padded


def _with_dropped(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Every token of a dropped modality counts as hidden, visible slot or not."""
    return hidden | (~keep).repeat_interleave(hidden.shape[1] // keep.shape[1], dim=1)
