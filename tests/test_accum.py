"""--accum_steps (util/runtime.Runtime.learn): N micro-batches of B/N rows make the
same optimiser step as one batch of B rows, for fine-tuning and every pre-training mode.

SGD, not AdamW, so that what is compared is the gradient itself: AdamW's normalisation
would turn the rounding noise of gradients that are exactly 0 in theory (the key part of
an attention bias) into lr-sized steps that differ whenever the summation order does."""
import pytest
import torch

import finetune
import masking
import model as M
import sttp
from util.cli import UserError
from conftest import run_objective, smooth_batch, tiny
from util.runtime import Runtime

CPU = torch.device("cpu")
SIZE = 32                       # 4 x 4 patches of the tiny preset: fast, and masking still bites


def pretrain_steps(accum, mode, steps=2, **objective):
    torch.manual_seed(0)
    net = M.MaskMentor(tiny(image_size=SIZE))
    teacher = M.MaskMentor(tiny(image_size=SIZE)).requires_grad_(False) if mode == "kd" else None
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    rt = Runtime(CPU, accum_steps=accum)
    model = rt.wrap(net)
    cfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=8), **objective)
    g = torch.Generator().manual_seed(0)
    logs = [run_objective(mode, model, opt, smooth_batch(B=8, size=SIZE, seed=s), cfg, g, teacher, rt)
            for s in range(steps)]
    return net, logs


def assert_same(a: torch.nn.Module, b: torch.nn.Module, logs_a, logs_b):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=2e-6, rtol=1e-5, msg=k)
    for la, lb in zip(logs_a, logs_b):
        assert la.keys() == lb.keys()
        for k in la:
            assert la[k] == pytest.approx(lb[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("mode", ["mim", "m2im", "sttp", "token", "kd"])
def test_micro_batches_make_the_same_pretraining_step(mode):
    one, logs_one = pretrain_steps(1, mode)
    four, logs_four = pretrain_steps(4, mode)
    assert_same(one, four, logs_one, logs_four)
    # ... and they did change the weights (a test that cannot fail proves nothing)
    torch.manual_seed(0)
    assert not torch.equal(M.MaskMentor(tiny(image_size=SIZE)).encoder[0].mlp.fc1.weight,
                           one.encoder[0].mlp.fc1.weight)


@pytest.mark.parametrize("target,positions,norm", [
    ("teacher_complete", "hidden", "standardize"),    # a count and statistics of the whole batch
    ("teacher_masked_fresh", "missing", "center"),
])
def test_micro_batches_with_the_token_options(target, positions, norm):
    opts = dict(token_target=target, token_positions=positions, token_norm=norm)
    one, logs_one = pretrain_steps(1, "sttp", **opts)
    two, logs_two = pretrain_steps(2, "sttp", **opts)
    assert_same(one, two, logs_one, logs_two)


def finetune_steps(accum, steps=2):
    torch.manual_seed(0)
    net = M.Segmenter(tiny(drop_path=0.3, image_size=SIZE))          # stochastic depth: drawn for the whole batch
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    rt = Runtime(CPU, accum_steps=accum)
    model = rt.wrap(net)
    cfg = finetune.FinetuneConfig(p_missing=0.7)
    g = torch.Generator().manual_seed(0)
    logs = []
    for s in range(steps):
        batch = smooth_batch(B=8, size=SIZE, seed=s)
        batch["semseg"][: 2 + s, :20] = M.IGNORE_INDEX   # micro-batches with unequal labelled pixels
        logs.append(finetune.train_step(model, opt, batch, cfg, g, rt))
    return net, logs


def test_micro_batches_make_the_same_finetuning_step():
    one, logs_one = finetune_steps(1)
    for accum in (2, 8):
        other, logs_other = finetune_steps(accum)
        assert_same(one, other, logs_one, logs_other)


def test_batch_must_divide_into_the_micro_batches(tmp_path):
    import train
    with pytest.raises(UserError, match="--batch_size 8 is not divisible into --accum_steps 3 micro-batches"):
        train.main(["--batch_size", "8", "--accum_steps", "3", "--out_dir", str(tmp_path)])
    with pytest.raises(UserError, match="--accum_steps must be"):
        finetune.main(["--accum_steps", "0", "--pretrained", "none", "--out_dir", str(tmp_path)])
