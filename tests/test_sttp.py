"""sttp.py: the schedule of teacher and student steps, the losses, and that the teacher's
targets carry no gradient."""
import dataclasses

import pytest
import torch

import masking
import modalities
import model as M
import sttp
from conftest import one_forward, run_objective, smooth_batch


def setup(seed=0):
    torch.manual_seed(seed)
    net = M.MaskMentor(dataclasses.replace(M.PRESETS["tiny"], num_classes=7))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    cfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=32))
    return net, opt, cfg, torch.Generator().manual_seed(seed)


class Spy:
    """Records optimiser steps and, for each, whether its masking dropped modalities."""

    def __init__(self, monkeypatch, opt):
        self.plans, self.steps = [], []
        real_plan, real_step = masking.plan_masking, opt.step

        def plan(*a, **k):
            drop = a[4] if len(a) > 4 else k["drop_modalities"]
            self.plans.append(drop)
            return real_plan(*a, **k)

        def step(*a, **k):
            self.steps.append(self.plans[-1])
            return real_step(*a, **k)

        monkeypatch.setattr(masking, "plan_masking", plan)
        monkeypatch.setattr(opt, "step", step)


@pytest.mark.parametrize("name,expected", [
    ("sttp", [False, False, False, True]),      # 3 teacher (complete) + 1 student (Algorithm 1)
    ("token", [False, False, False, True]),
    ("mim", [False]),
    ("m2im", [True]),
])
def test_optimiser_steps_per_batch(monkeypatch, name, expected):
    net, opt, cfg, g = setup()
    spy = Spy(monkeypatch, opt)
    run_objective(name, net, opt, smooth_batch(), cfg, g)
    assert spy.steps == expected
    run_objective(name, net, opt, smooth_batch(), cfg, g)
    assert spy.steps == expected * 2
    assert opt.state[net.global_tokens]["step"].item() == 2 * len(expected)
    o = sttp.OBJECTIVES[name]                   # what the registry declares is what it does
    assert [i in o.missing_modality_steps(cfg) for i in range(o.steps_per_batch(cfg))] == expected




def test_token_loss_values():
    a = {m: torch.randn(2, 5, 8, requires_grad=True) for m in modalities.DEFAULT}
    same = {m: t.detach().clone() for m, t in a.items()}
    value = lambda t: sttp.token_loss(a, t, modalities.DEFAULT).value()
    assert value(same).item() == pytest.approx(0.0, abs=1e-6)
    scaled = {m: 3 * t for m, t in same.items()}                          # cosine ignores scale
    assert value(scaled).item() == pytest.approx(0.0, abs=1e-6)
    opposite = {m: -t for m, t in same.items()}
    assert value(opposite).item() == pytest.approx(2.0, abs=1e-6)
    other = {m: torch.randn(2, 5, 8) for m in modalities.DEFAULT}
    loss = value(other)
    assert 0 < loss.item() < 2
    loss.backward()
    assert all(t.grad is not None for t in a.values())


def test_token_mode_student_has_token_loss_only():
    net, opt, cfg, g = setup()
    logs = run_objective("token", net, opt, smooth_batch(), cfg, g)
    assert logs["loss"] == pytest.approx(logs["token"])
    logs = run_objective("sttp", net, opt, smooth_batch(), cfg, g)
    pixel = sum(v for k, v in logs.items() if k.startswith(sttp.M2IM))
    assert logs["loss"] == pytest.approx(pixel + logs["token"], rel=1e-5)


def test_kd_teacher_stays_frozen():
    net, opt, cfg, g = setup()
    teacher = M.MaskMentor(net.cfg).requires_grad_(False).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = net.global_tokens.detach().clone()
    logs = run_objective("kd", net, opt, smooth_batch(), cfg, g, teacher=teacher)
    assert logs["token"] > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(student_before, net.global_tokens)
    with pytest.raises(ValueError, match="teacher"):
        run_objective("kd", net, opt, smooth_batch(), cfg, g)


def test_pixel_loss_counts_masked_patches_only():
    net, _, _, g = setup()
    b = smooth_batch(2)
    inputs = modalities.prepare_inputs(b)
    plan = masking.plan_masking(2, 3, 64, masking.MaskingConfig(budget=32), True, g)
    with torch.no_grad():
        preds, _, masked = net(inputs, plan)
    weights = sttp.loss_weights(net, inputs, masked.mask, plan.keep, "all")
    losses = lambda p: {k: m.value() for k, m in sttp.pixel_losses(p, inputs, weights, net.cfg.patch_size).items()}
    base = losses(preds)
    # Change the predictions at visible patches only: the loss must not move.
    vis = (~masked.mask).view(2, 3, 8, 8)
    px = vis[:, :, :, None, :, None].expand(2, 3, 8, 8, 8, 8).reshape(2, 3, 64, 64)
    px4 = vis[:, :, :, None, :, None].expand(2, 3, 8, 2, 8, 2).reshape(2, 3, 16, 16)
    changed = {"rgb": torch.where(px[:, None, 0], 5.0, preds["rgb"]),
               "norm_rgb": torch.where(px[:, None, 0], 5.0, preds["norm_rgb"]),
               "depth": torch.where(px[:, None, 1], 5.0, preds["depth"]),
               "semseg": torch.where(px4[:, None, 2], 5.0, preds["semseg"])}
    same = losses(changed)
    for k in base:
        assert same[k].item() == pytest.approx(base[k].item(), rel=1e-6), k
    # ... and at the masked ones it must.
    moved = losses({k: v + 1.0 if k != "semseg" else v for k, v in preds.items()} |
                   {"semseg": torch.where(px4[:, None, 2], preds["semseg"], -preds["semseg"])})
    for k in base:
        assert moved[k].item() != pytest.approx(base[k].item(), rel=1e-3), k


def test_masked_mean_skips_samples_without_masked_pixels():
    loss = torch.tensor([[[1.0, 1.0]], [[7.0, 7.0]]])
    w = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    mean = lambda w: sttp._masked_mean(loss, sttp.Weights(w, (w.flatten(1).sum(1) > 0).sum())).value()
    assert mean(w).item() == 1.0                                              # not (1 + 0) / 2
    assert mean(torch.zeros_like(w)).item() == 0.0


def test_patch_normalize():
    x = torch.randn(2, 3, 16, 16) * 4 + 2
    y = sttp.patch_normalize(x, 8)
    patches = y.view(2, 3, 2, 8, 2, 8).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, -1)
    torch.testing.assert_close(patches.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(patches.var(-1), torch.ones(2, 4), atol=1e-4, rtol=0)


def test_sttp_loss_goes_down():
    net, opt, cfg, g = setup()
    for group in opt.param_groups:
        group["lr"] = 2e-3
    b = smooth_batch()
    first = run_objective("sttp", net, opt, b, cfg, g)
    for _ in range(30):
        last = run_objective("sttp", net, opt, b, cfg, g)
    assert last["teacher_loss"] < 0.6 * first["teacher_loss"]
    student_first = sum(v for k, v in first.items() if k.startswith(sttp.M2IM))
    student_last = sum(v for k, v in last.items() if k.startswith(sttp.M2IM))
    assert student_last < 0.75 * student_first


# --- the token target, positions and normalisation (docs/method.md D4-D6) ---------------------


def fixed_student(net, keep, seed=1):
    """A student pass with Algorithm 1's outcome fixed to `keep` (list of K bools per sample)."""
    inputs = modalities.prepare_inputs(smooth_batch(), net.inputs)
    B, K = 4, len(net.inputs)
    keep = torch.tensor([keep] * B)
    plan = masking.plan_masking(B, K, net.num_tokens(64, 64), masking.MaskingConfig(budget=32), True,
                                torch.Generator().manual_seed(seed), keep=keep)
    _, tokens, masked = net(inputs, plan)
    for t in tokens.values():
        t.retain_grad()
    return inputs, tokens, masked, keep


def teacher_tokens(net, inputs):
    with torch.no_grad():
        plan = masking.plan_masking(4, 3, 64, masking.MaskingConfig(budget=32), False, torch.Generator().manual_seed(2))
        return net(inputs, plan)[1]


def test_missing_positions_put_no_weight_on_kept_modalities():
    net, *_ = setup()
    inputs, tokens, masked, keep = fixed_student(net, [True, False, True])      # depth missing
    weight = sttp.token_weight("missing", keep, masked.mask)
    sttp.token_loss(tokens, teacher_tokens(net, inputs), net.inputs, sttp.Weights(weight, weight.sum())).value().backward()
    assert tokens["rgb"].grad.abs().max() == 0 and tokens["semseg"].grad.abs().max() == 0
    assert (tokens["depth"].grad.abs().sum(-1) > 0).all()                       # every depth position


def test_hidden_positions_put_no_weight_on_visible_tokens():
    net, *_ = setup()
    inputs, tokens, masked, keep = fixed_student(net, [True, True, False])      # semseg missing
    weight = sttp.token_weight("hidden", keep, masked.mask)
    sttp.token_loss(tokens, teacher_tokens(net, inputs), net.inputs, sttp.Weights(weight, weight.sum())).value().backward()
    grad = torch.cat([tokens[m].grad.abs().sum(-1) for m in net.inputs], dim=1)    # [B, K*N]
    assert (grad[~masked.mask] == 0).all() and (grad[masked.mask] > 0).all()
    assert masked.mask[:, 128:].all()                                               # semseg: all hidden


def test_pooled_token_loss_is_the_mean_over_the_selected_positions():
    g = torch.Generator().manual_seed(0)
    s = {m: torch.randn(2, 3, 4, generator=g) for m in ("rgb", "depth")}
    t = {m: torch.randn(2, 3, 4, generator=g) for m in ("rgb", "depth")}
    weight = torch.tensor([[1., 0., 0., 1., 1., 0.], [0., 0., 0., 0., 0., 1.]])
    cos = torch.cat([torch.nn.functional.cosine_similarity(s[m], t[m], dim=-1) for m in ("rgb", "depth")], dim=1)
    want = (1 - cos)[weight.bool()].mean()
    pooled = lambda w: sttp.token_loss(s, t, ("rgb", "depth"), sttp.Weights(w, w.sum())).value()
    torch.testing.assert_close(pooled(weight), want)
    assert pooled(torch.zeros(2, 6)).item() == 0.0


@pytest.mark.parametrize("norm", ["center", "standardize"])
def test_normalised_targets_have_zero_mean_and_unit_std_per_channel(norm):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 16, 8, generator=g) * torch.linspace(0.1, 3, 8) + 5.0    # a shared offset
    student = torch.randn(4, 16, 8, generator=g, requires_grad=True)
    s, t = sttp.normalize_tokens(student, teacher, norm)
    torch.testing.assert_close(t.mean((0, 1)), torch.zeros(8), atol=1e-5, rtol=0)
    if norm == "standardize":
        torch.testing.assert_close(t.std((0, 1)), torch.ones(8), atol=1e-4, rtol=0)
    # The student gets the same affine map, computed from the teacher alone.
    scale = teacher.std((0, 1)) if norm == "standardize" else torch.ones(8)
    torch.testing.assert_close(s, (student - teacher.mean((0, 1))) / scale, atol=1e-4, rtol=1e-4)
    s.sum().backward()
    assert student.grad is not None and not t.requires_grad


def test_teacher_complete_targets_equal_a_separate_complete_forward():
    net, _, cfg, g = setup()
    cfg = dataclasses.replace(cfg, token_target="teacher_complete")
    inputs = modalities.prepare_inputs(smooth_batch(), net.inputs)
    it = sttp.fresh_target(cfg)
    with torch.no_grad():
        targets = one_forward(net, inputs, sttp.input_plan(it, 4, 3, 64, cfg, g, "cpu")).tokens
    # every patch visible, in a random order this time: attention does not care about order
    B, K, N = 4, 3, 64
    plan = masking.MaskPlan(torch.ones(B, K, dtype=torch.bool), torch.full((B, K), N),
                            torch.rand(B, K * N, generator=torch.Generator().manual_seed(9)))
    with torch.no_grad():
        _, tokens, masked = net(inputs, plan)
    assert not masked.mask.any()
    for m in net.inputs:
        torch.testing.assert_close(targets[m], tokens[m], atol=2e-5, rtol=1e-4)
        assert not targets[m].requires_grad


@pytest.mark.parametrize("mode,target", [(m, t) for m in ("sttp", "token", "kd") for t in sttp.TOKEN_TARGETS])
def test_no_gradient_reaches_any_target(monkeypatch, mode, target):
    net, opt, cfg, g = setup()
    cfg = dataclasses.replace(cfg, token_target=target, token_positions="hidden", token_norm="standardize")
    teacher = M.MaskMentor(net.cfg).eval().requires_grad_(False) if mode == "kd" else None
    seen = {}
    real = sttp.token_loss

    def spy(student, targets, *a, **k):
        seen.update(targets=targets, student=student)
        return real(student, targets, *a, **k)

    monkeypatch.setattr(sttp, "token_loss", spy)
    logs = run_objective(mode, net, opt, smooth_batch(), cfg, g, teacher)
    assert all(not t.requires_grad and t.grad_fn is None for t in seen["targets"].values())
    assert all(s.requires_grad for s in seen["student"].values())
    assert logs["token"] > 0


@pytest.mark.parametrize("norm", ["standardize", "none"])
def test_sttp_written_out_step_for_step(norm):
    """STTP at the default settings (last_teacher_step, all, standardize: ObjectiveConfig) and
    at the first reading (token_norm none) gives the same weights as the algorithm written
    out: targets = the last teacher forward's tokens, each modality's tokens standardised
    per channel by the teacher's batch statistics (or raw), 1 - cos averaged per modality
    over every position, then over modalities."""
    net_a, opt_a, cfg, _ = setup()
    net_b, opt_b, _, _ = setup()
    assert (cfg.token_target, cfg.token_positions, cfg.token_norm) == ("last_teacher_step", "all", "standardize")
    cfg = dataclasses.replace(cfg, token_norm=norm)
    batch = smooth_batch()

    def standardised(s, t):
        if norm == "none":
            return s, t
        n = t.shape[0] * t.shape[1]
        mean = t.sum((0, 1)) / n
        std = torch.sqrt(((t - mean) ** 2).sum((0, 1)) / (n - 1) + 1e-6)
        return (s - mean) / std, (t - mean) / std

    def step(loss):
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()

    def forward(inputs, drop_modalities, g):
        plan = masking.plan_masking(4, 3, 64, cfg.masking, drop_modalities, g)
        p = one_forward(net_b, inputs, plan)
        return p, sum(m.value() for m in p.losses.values())

    for i in range(2):
        logs = run_objective("sttp", net_a, opt_a, batch, cfg, torch.Generator().manual_seed(i))
        g = torch.Generator().manual_seed(i)
        inputs = modalities.prepare_inputs(batch, net_b.inputs)
        for _ in range(cfg.teacher_iters):
            last, pixel = forward(inputs, False, g)
            step(pixel)
        student, pixel = forward(inputs, True, g)
        pairs = [standardised(student.tokens[m].float(), last.tokens[m].detach().float()) for m in net_b.inputs]
        tok = torch.stack([1 - torch.nn.functional.cosine_similarity(s, t, dim=-1).mean() for s, t in pairs]).mean()
        step(cfg.token_weight * tok + pixel)
        assert logs["token"] == float(tok.detach())
    for (k, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(a, b), k


def test_unknown_token_levels_are_refused():
    with pytest.raises(ValueError, match="token_norm must be one of"):
        sttp.ObjectiveConfig(token_norm="whiten")
