"""util/engine.Loop on a toy problem (a linear layer, AdamW, 16 points in batches of 4): the
learning rate on its two clocks, and exact resume when a batch makes 4 optimiser steps
in some epochs and 1 in others."""
import dataclasses

import pytest
import torch

from util import engine
from util.cli import UserError
from util.lr_sched import lr_at
from util.runtime import Runtime

CPU = torch.device("cpu")


@dataclasses.dataclass
class ToyConfig:                     # the fields util/engine.Loop reads
    out_dir: str
    epochs: int = 3
    batch_size: int = 4
    lr: float = 0.1
    min_lr: float = 0.01
    lr_warmup_epochs: float = 0.5
    seed: int = 0
    stop_after: int = 0
    ckpt_every: int = 0
    workers: int = 0
    accum_steps: int = 1
    overwrite: bool = False


class Points(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "semseg": torch.zeros(1, 1, dtype=torch.long)}

    def set_epoch(self, epoch):
        pass


def four_then_one(epoch: int) -> int:
    """4 optimiser steps a batch (STTP) in even epochs, 1 (MIM) in odd ones."""
    return 4 if epoch % 2 == 0 else 1


def toy_run(out_dir, steps_per_batch=four_then_one, resume_from=None, **cfg):
    """Run the Loop (from a checkpoint if given) with a fresh network, optimiser and
    random state. Returns (the network, the lr of every optimiser step it made, the loop)."""
    cfg = ToyConfig(out_dir=str(out_dir), **cfg)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    runtime = Runtime(CPU, accum_steps=cfg.accum_steps)
    torch.manual_seed(123)            # what a resume must not depend on
    loop = engine.Loop(cfg, net, optimizer, Points(), torch.Generator().manual_seed(0), CPU, extra={},
                       steps_per_batch=steps_per_batch)
    if resume_from is not None:
        loop.resume(torch.load(resume_from, weights_only=False))
    lrs = []

    def forward(model, rows):
        noisy = rows["x"] + 0.1 * torch.randn(rows["x"].shape)     # the global RNG, resumed too
        loss = (model(noisy) - rows["y"]).square().mean() / runtime.shards     # a micro-batch's part
        return loss, float(loss.detach())

    def step(batch, epoch):
        loss = 0.0
        for _ in range((steps_per_batch or four_then_one)(epoch)):
            outs = runtime.learn(net, optimizer, forward, len(batch["x"]), {"x": batch["x"], "y": batch["y"]})
            lrs.append(optimizer.param_groups[0]["lr"])
            loss += sum(outs)
        return {"loss": loss}
    loop.run(step)
    return net, lrs, loop


def test_the_step_clock_sets_the_lr_before_every_optimizer_step(tmp_path):
    _, lrs, loop = toy_run(tmp_path)
    # 4 batches an epoch: 16 + 4 + 16 steps; the warm-up is half of epoch 1, i.e. 2 batches of 4 steps.
    assert (loop.total, loop.warmup, loop.steps) == (36, 8, 36)
    assert lrs == [lr_at(k, 36, 8, 0.1, 0.01) for k in range(36)]
    assert not loop.optimizer._optimizer_step_pre_hooks          # the hook ends with the run


def test_the_batch_clock_is_the_default(tmp_path):
    _, lrs, loop = toy_run(tmp_path, steps_per_batch=None)
    assert (loop.total, loop.warmup) == (12, 2)
    per_batch = [lr_at(b, 12, 2, 0.1, 0.01) for b in range(12)]
    assert lrs == [lr for b, lr in enumerate(per_batch) for _ in range(four_then_one(b // 4))]


def test_accumulated_micro_batches_make_one_step(tmp_path):
    _, lrs, loop = toy_run(tmp_path, accum_steps=2)
    assert loop.steps == 36 and lrs == [lr_at(k, 36, 8, 0.1, 0.01) for k in range(36)]


def test_a_run_stopped_mid_epoch_on_the_step_clock_resumes_exactly(tmp_path):
    whole, lrs, _ = toy_run(tmp_path / "whole")
    ckpt = tmp_path / "parts" / "ckpt.pt"
    # Stopped inside epoch 2 (1 step a batch), then inside epoch 3 (4 steps a batch).
    _, first, _ = toy_run(tmp_path / "parts", stop_after=5)
    saved = torch.load(ckpt, weights_only=False)
    assert (saved["epoch"], saved["batch"], saved["scheduler"]["optimizer_steps"]) == (1, 1, 17)
    _, second, _ = toy_run(tmp_path / "parts", resume_from=ckpt, stop_after=4)
    assert (torch.load(ckpt, weights_only=False)["epoch"], torch.load(ckpt, weights_only=False)["batch"]) == (2, 1)
    parts, third, loop = toy_run(tmp_path / "parts", resume_from=ckpt)
    assert loop.steps == 36 and first + second + third == lrs
    for a, b in zip(whole.state_dict().values(), parts.state_dict().values()):
        assert torch.equal(a, b)


def test_more_epochs_recompute_the_cosine_from_the_current_step(tmp_path):
    _, done, _ = toy_run(tmp_path, epochs=2)
    assert done == [lr_at(k, 20, 8, 0.1, 0.01) for k in range(20)]
    _, more, loop = toy_run(tmp_path, epochs=3, resume_from=tmp_path / "ckpt.pt")
    assert loop.total == 36 and more == [lr_at(k, 36, 8, 0.1, 0.01) for k in range(20, 36)]


def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    toy_run(tmp_path, epochs=1)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    saved["model"]["extra.weight"] = saved["model"].pop("bias")
    torch.save(saved, tmp_path / "ckpt.pt")
    with pytest.raises(UserError) as e:
        toy_run(tmp_path, resume_from=tmp_path / "ckpt.pt")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "ckpt.pt") in msg, msg
    assert "1 missing: bias" in msg and "1 unexpected: extra.weight" in msg, msg
