"""engine.py — what train.py and finetune.py share around their step: the training loop,
what its checkpoints hold (checkpoints.py writes and reads the files), the learning-rate
schedule and the optimiser's parameter groups.

    loop = Loop(cfg, net, optimizer, dataset, generator, device, extra={...})
    loop.resume(ckpt)                      # optional: continue a saved run exactly
    loop.run(step)                         # step(batch, epoch) -> {"loss": ..., ...}

The loop runs epochs of deterministic batches (a permutation per (seed, epoch)) with the
lr schedule, a progress bar, per-epoch logs (log.jsonl) and a loss curve, and writes
`<out_dir>/ckpt.pt` atomically with the config, optimiser, RNG states and the position
inside the epoch, so an interrupted run (Ctrl-C, --stop_after, a crash after a
checkpoint) resumes bit for bit. Under torchrun (runtime.py) every process runs it on
its slice of each global batch and rank 0 alone writes.
Like MAE's engine_pretrain.py and util/, this is machinery: the method is in masking.py,
model.py and sttp.py, each script's own work in its file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function
from tqdm import tqdm

import charts
import data
import model as M
from checkpoints import load_checkpoint, load_weights, save_checkpoint
from cli import UserError, check_numbers, check_output, parse_config, write_atomic
from runtime import rank_and_world

VERSION = 1
# Flags that belong to one invocation, not to the run: --resume may change them. (out_dir
# too: a run folder that was moved or copied resumes where it is now.)
RUN_CONTROL = {"stop_after", "ckpt_every", "workers", "device", "resume", "compile", "overwrite", "out_dir",
               "grad_ckpt", "accum_steps"}
# What a run writes into its folder (and recon_epoch*.png); --overwrite sets these aside
# in PREVIOUS_RUN inside it until the new run's first checkpoint (check_out_dir).
RUN_FILES = ("ckpt.pt", "log.jsonl", "loss_curve.png")
PREVIOUS_RUN = ".previous_run"


# -----------------------------------------------------------------------------
# RNG states (in every checkpoint, for an exact resume)


def rng_state(generator: torch.Generator) -> dict:
    cuda = torch.cuda.is_available()
    return {"torch": torch.get_rng_state(), "mask": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if cuda else [],
            "cuda_device": torch.cuda.current_device() if cuda else None}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["mask"])
    if state.get("cuda") and torch.cuda.is_available():
        if rank_and_world()[1] > 1:
            # Every process's GPU had the saving process's GPU stream (all draw alike, for
            # the global batch): each restores that one into its own GPU.
            torch.cuda.set_rng_state(state["cuda"][state.get("cuda_device") or 0])
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# Schedule, optimiser groups


def lr_at(it: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warm-up from 0, then cosine decay to `minimum` (MultiMAE / MAE)."""
    if it < warmup:
        return base * it / warmup
    progress = (it - warmup) / max(1, total - warmup)
    return minimum + (base - minimum) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list:
    """AdamW groups: no weight decay on biases, norms and embeddings/tokens; with
    layer_decay < 1 the lr shrinks by that factor per encoder block going down to the
    input (BEiT/MultiMAE fine-tuning: adapters and global token are layer 0, the head
    is layer depth+1)."""
    depth = len(model.encoder)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("input_adapters.", "global_tokens")):
            layer = 0
        elif name.startswith("encoder."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        no_wd = p.dim() == 1 or name.endswith(("global_tokens", "mask_token")) or "task_embeddings" in name \
            or "class_emb" in name
        scale = layer_decay ** (depth + 1 - layer)
        key = (scale, no_wd)
        groups.setdefault(key, {"params": [], "lr_scale": scale, "weight_decay": 0.0 if no_wd else weight_decay})
        groups[key]["params"].append(p)
    return list(groups.values())


def load_optimizer_state(optimizer, state: dict) -> None:
    """The checkpoint's hyperparameters and moments, this invocation's implementation:
    torch's load_state_dict also restores each group's "fused"/"foreach" flags, but --compile
    (which picks the fused kernel: runtime.TrainingRuntime.optimizer_options) is run-control,
    so a resume may switch it. The fused kernel wants its step counts as float32 on the
    parameters' device; the others keep them on the CPU."""
    chosen = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, chosen):
        group.update(flags)
        for p in group["params"]:
            s = optimizer.state.get(p, {})
            if torch.is_tensor(s.get("step")):
                s["step"] = s["step"].to(device=p.device if flags["fused"] else "cpu", dtype=torch.float32)


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list:
    """This epoch's batches of indices: a permutation that depends only on (seed, epoch),
    so a resumed run sees exactly the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)[: n // batch_size * batch_size]
    return perm.view(-1, batch_size).tolist()


class Subset(torch.utils.data.Dataset):
    """The first n samples of a dataset (--subset), keeping set_epoch."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.dataset[i]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def training_set(cfg, augmentation: str = "finetune", split: str = "train"):
    """The training split (or another: train.py --split pool) of cfg.dataset with augmentation
    ("pretrain" or "finetune": see data.build_dataset), cut to --subset if given."""
    ds = data.build_dataset(cfg.dataset, cfg.data_root or None, split, train=True,
                            image_size=cfg.image_size, seed=cfg.seed, augmentation=augmentation, cues=cfg.cues)
    return Subset(ds, cfg.subset) if cfg.subset else ds


def check_common_flags(cfg, positive=(), non_negative=()) -> int:
    """The checks train.py and finetune.py share (their schedule, run-control, dataset and
    image flags), plus the extra names given; returns the preset's patch size."""
    check_numbers(cfg, positive=("epochs", "batch_size", "image_size", "lr") + tuple(positive),
                  non_negative=("subset", "stop_after", "ckpt_every", "workers", "clip_grad", "min_lr",
                                "lr_warmup_epochs", "weight_decay") + tuple(non_negative))
    check_numbers(cfg, positive=("accum_steps",))
    if cfg.batch_size % cfg.accum_steps:
        raise UserError(f"--batch_size {cfg.batch_size} is not divisible into --accum_steps {cfg.accum_steps} "
                        f"micro-batches")
    if cfg.min_lr > cfg.lr:
        raise UserError(f"--min_lr {cfg.min_lr} is above --lr {cfg.lr}")
    data.check_dataset_flags(cfg.dataset, cfg.data_root, cfg.cues)
    patch = M.PRESETS[cfg.config].patch_size
    if cfg.image_size % patch:
        raise UserError(f"--image_size {cfg.image_size} is not a multiple of the patch size {patch}")
    return patch


# -----------------------------------------------------------------------------
# The training loop


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def fetch(loader, device):
    """The loader's batches, on the device; the fetching and the copy under the profiler
    label "data" (bench.py's time split; a label costs nothing when no profiler runs)."""
    batches = iter(loader)
    while True:
        with record_function("data"):
            batch = next(batches, None)
            if batch is None:
                return
            batch = to_device(batch, device)
        yield batch


class Loop:
    """Epochs of deterministic batches with the lr schedule, a progress bar, per-epoch
    logs and a loss curve, atomic checkpoints, exact resume and a graceful stop.

    `cfg` needs the fields epochs, batch_size, lr, min_lr, lr_warmup_epochs, seed,
    out_dir, stop_after, ckpt_every, workers, accum_steps and overwrite (TrainConfig and
    FinetuneConfig have them). `net` is the bare network, the one checkpoints save (the
    step function may run it wrapped in DDP). `extra` goes into every checkpoint beside
    the standard keys; so does the state of `scaler` (float16's GradScaler), for an exact
    resume.

    run(step) reads top to bottom: the folder is prepared (_begin), then for each epoch
    its batches (_batches: the permutation, this process's slice, the progress bar), for
    each batch _train_batch (lr, step, the processes agree, NaN guard, running sums), then
    the stop rule (_halt: Ctrl-C or --stop_after; a checkpoint, then return) and
    _end_epoch (record, log line, checkpoint, loss curve, after_epoch).

    The lr follows lr_at (linear warm-up from 0, then cosine to min_lr) on one of two clocks:
      - batches (steps_per_batch None, the default): set before each batch from the
        batches done, over epochs x batches, the warm-up lasting the first
        lr_warmup_epochs epochs' batches. Every optimiser step a batch makes (STTP makes
        teacher_iters + 1) has that batch's lr.
      - optimiser steps (steps_per_batch(epoch): the optimiser steps each batch of that
        epoch makes): set before every optimiser step (a step pre-hook on the optimiser
        while run() runs) from the steps taken so far, over the run's total (the sum over
        epochs of batches x steps_per_batch); the warm-up is the steps of the first
        lr_warmup_epochs epochs. Objectives with 4 and 1 steps a batch then get the same lr
        at equal optimiser steps (issue 22). --accum_steps' micro-batches make one step.
        The count is that of optimizer.step() calls (a step float16's scaler skips without
        calling it does not count), and checkpoints keep it, so a resume continues it.
    On either clock a run resumed with more --epochs recomputes the total from them and
    goes on from where it is: lr = lr_at(position now, new total), as MAE does.

    Under torchrun every process runs the loop on its contiguous slice of each global
    batch of `epoch_batches` (a per-(seed, epoch) permutation: what DistributedSampler
    with per-epoch shuffling would do, but independent of the process count). Rank 0
    alone shows the progress bar and writes logs, checkpoints and pictures.
    """

    def __init__(self, cfg, net, optimizer, dataset, generator, device, extra: dict, scaler=None,
                 steps_per_batch: Optional[Callable[[int], int]] = None):
        self.cfg, self.net, self.optimizer, self.dataset = cfg, net, optimizer, dataset
        self.generator, self.device, self.extra, self.scaler = generator, device, extra, scaler
        self.steps_per_batch = steps_per_batch
        self.rank, self.world = rank_and_world()
        if cfg.batch_size % (self.world * cfg.accum_steps):
            raise UserError(f"--batch_size {cfg.batch_size} is not divisible by the {self.world} processes "
                            f"x --accum_steps {cfg.accum_steps}")
        self.path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.batches_per_epoch = len(dataset) // cfg.batch_size
        if self.batches_per_epoch == 0:
            raise UserError(f"{len(dataset)} training images is fewer than --batch_size {cfg.batch_size}")
        # The schedule's length and warm-up on its clock (batches or optimiser steps); the
        # warm-up ends at a whole batch either way.
        self.total = self._position(cfg.epochs, 0)
        self.warmup = self._position(*divmod(int(cfg.lr_warmup_epochs * self.batches_per_epoch),
                                             self.batches_per_epoch))
        self.epoch, self.batch, self.history = 0, 0, []
        self.steps = 0                # optimiser steps taken (the step clock's position)
        self.done_here = 0            # batches this invocation ran (what --stop_after counts)
        self.resumed = None           # the checkpoint a resumed run started from
        self.previous_run = False     # --overwrite: the old run waits aside until our first checkpoint

    def resume(self, ckpt: dict) -> None:
        """Continue a saved run exactly: its weights (one line if they don't fit the network),
        optimiser, loss scale, random state, position and the optimiser steps taken."""
        self.resumed = ckpt
        load_weights(self.net, ckpt, self.path)
        load_optimizer_state(self.optimizer, ckpt["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng_state"], self.generator)
        self.epoch, self.batch, self.history = ckpt["epoch"], ckpt["batch"], ckpt["history"]
        # Saved by runs on the step clock; a batch-clock checkpoint made every planned step.
        self.steps = ckpt["scheduler"].get("optimizer_steps", self._position(self.epoch, self.batch))

    def checkpoint(self) -> None:
        """Rank 0 writes; under DDP the processes first check that they hold the same weights
        and afterwards wait for the write, so that none moves on without it on disk. The
        first checkpoint of an --overwrite run lets the old run's files go."""
        if self.world > 1:
            self._check_processes_agree()
        if self.rank == 0:
            clock = {} if self.steps_per_batch is None else {"optimizer_steps": self.steps}
            scaler = {} if self.scaler is None else {"scaler": self.scaler.state_dict()}
            save_checkpoint({"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                             "scheduler": {"it": self._now(), "total": self.total, "warmup": self.warmup, **clock},
                             "epoch": self.epoch, "batch": self.batch,
                             "step": self.epoch * self.batches_per_epoch + self.batch,
                             "config": dataclasses.asdict(self.cfg), "rng_state": rng_state(self.generator),
                             "history": self.history, "version": VERSION, **scaler, **self.extra}, self.path)
            if self.previous_run:
                discard_previous_run(self.cfg.out_dir)
                self.previous_run = False
        if self.world > 1:
            dist.barrier()

    def run(self, step, phase=lambda epoch: "", after_epoch=lambda epochs_done: None) -> None:
        """step(batch on device, epoch) does one batch's optimiser step(s) and returns a dict
        of numbers, "loss" among them; phase(epoch) names the epoch's stage for the logs;
        after_epoch(epochs done) runs on rank 0 after each epoch's checkpoint (pictures)."""
        cfg = self.cfg
        with self._previous_run_kept(), self._lr_per_optimizer_step(), GracefulStop() as stop:
            self._begin()
            while self.epoch < cfg.epochs:
                name, sums = phase(self.epoch), self._running_sums()
                bar, t0 = self._batches(name), time.time()
                for batch in bar:
                    loss, requested = self._train_batch(step, batch, sums, stop)
                    bar.set_postfix(loss=f"{loss:.3f}")
                    halt = self._halt(requested)
                    if self.batch < self.batches_per_epoch and (
                            halt or (cfg.ckpt_every and self.batch % cfg.ckpt_every == 0)):
                        self._record(name, sums, partial=True)
                        self.checkpoint()
                        if halt:
                            bar.close()
                            self._stopped(f"at epoch {self.epoch + 1}, batch {self.batch}")
                            return
                bar.close()             # the epoch's last batch: a stop waits for its checkpoint
                self._end_epoch(name, sums, t0, after_epoch)
                if self.epoch < cfg.epochs and self._halt(self._agree({}, stop.requested)[1]):
                    self._stopped(f"at the end of epoch {self.epoch}")
                    return
        agree = f" (the {self.world} processes' weights were equal at every checkpoint)" if self.world > 1 else ""
        print(f"done: {self.path}{agree}")

    # -- the steps of run(), in order

    def _begin(self) -> None:
        """Rank 0 prepares the folder (prepare_out_dir: --overwrite sets the old run aside);
        under torchrun, say how the batch is shared."""
        if self.rank == 0:
            self.previous_run = self.cfg.overwrite
            prepare_out_dir(self.cfg, self.resumed)
        if self.world > 1:
            cfg = self.cfg
            print(f"{self.world} processes: batches of {cfg.batch_size} images in all, "
                  f"{cfg.batch_size // self.world} per process; lr {cfg.lr:g} as given, not rescaled: "
                  f"the global batch does not change with the number of processes")

    def _running_sums(self) -> dict:
        """The epoch's sums of the logged numbers so far: a resumed partial epoch's, else none."""
        last = self.history[-1] if self.history else None
        if last and last["epoch"] == self.epoch + 1 and self.batch > 0:
            return dict(last["_sums"])
        return {}

    def _batches(self, name: str):
        """This epoch's remaining batches, on the device, behind a progress bar: the global
        batches of epoch_batches, under torchrun each cut to this process's slice."""
        cfg = self.cfg
        self.dataset.set_epoch(self.epoch)
        batches = epoch_batches(len(self.dataset), cfg.batch_size, cfg.seed, self.epoch)
        if self.world > 1:
            per = cfg.batch_size // self.world
            batches = [b[self.rank * per:(self.rank + 1) * per] for b in batches]
        # Iterating a DataLoader draws its workers' base seed from the global RNG. A resumed
        # partial epoch must not draw it again: the uninterrupted run drew it at the epoch's
        # start, before the checkpoint saved that RNG, and a second draw would shift every
        # later one (stochastic depth). Augmentation does not depend on it (data.aug_rng).
        spare = torch.Generator() if self.batch else None
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches[self.batch:],
                                             num_workers=cfg.workers, collate_fn=data.collate, generator=spare)
        return tqdm(fetch(loader, self.device), desc=f"epoch {self.epoch + 1}/{cfg.epochs} {name}".rstrip(),
                    initial=self.batch, total=self.batches_per_epoch, leave=False, dynamic_ncols=True,
                    disable=None if self.rank == 0 else True)

    def _train_batch(self, step, batch: dict, sums: dict, stop) -> tuple[float, bool]:
        """One batch: its lr (on the batch clock; the step clock sets it per step), the step,
        the logged numbers averaged over the processes with whether any was asked to stop
        (read after the step), the NaN guard, the running sums. Returns (loss, stop asked)."""
        if self.steps_per_batch is None:
            set_lr(self.optimizer, self._lr(self._now()))
        logs, requested = self._agree(step(batch, self.epoch), stop.requested)
        if not math.isfinite(logs["loss"]):
            raise UserError(f"the loss became {logs['loss']} at epoch {self.epoch + 1}, "
                            f"batch {self.batch}; try a lower --lr")
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["_n"] = sums.get("_n", 0) + 1
        self.batch += 1
        self.done_here += 1
        return logs["loss"], requested

    def _halt(self, requested: bool) -> bool:
        """The stop rule: Ctrl-C in some process (agreed by all), or --stop_after batches run."""
        return requested or bool(self.cfg.stop_after and self.done_here >= self.cfg.stop_after)

    def _stopped(self, where: str) -> None:
        print(f"stopped {where}; --resume continues from {self.path}")

    def _end_epoch(self, name: str, sums: dict, t0: float, after_epoch) -> None:
        """The epoch's means recorded and printed, its log line, the checkpoint, then (rank 0)
        the loss curve and after_epoch."""
        cfg, main = self.cfg, self.rank == 0
        h = self._record(name, sums, partial=False)
        print(f"epoch {self.epoch + 1}/{cfg.epochs} {name} ".replace("  ", " ") +
              " ".join(f"{k}={v:.4f}" for k, v in h.items() if k not in ("epoch", "mode")) +
              f" ({time.time() - t0:.0f}s)")
        if main:
            write_log(cfg.out_dir, [x for x in self.history if "_sums" not in x])
        self.epoch, self.batch = self.epoch + 1, 0
        self.checkpoint()
        if main:
            charts.loss_curve(self.history, os.path.join(cfg.out_dir, "loss_curve.png"))
            after_epoch(self.epoch)

    # -- the schedule

    def _position(self, epoch: int, batch: int) -> int:
        """Where batch `batch` of `epoch` begins on the schedule's clock: the batches before
        it, or with steps_per_batch the optimiser steps they make."""
        per = self.steps_per_batch or (lambda e: 1)
        before = sum(per(e) for e in range(epoch)) * self.batches_per_epoch
        return before + batch * per(epoch) if batch else before

    def _now(self) -> int:
        """The schedule's position now: batches done, or optimiser steps taken."""
        return self._position(self.epoch, self.batch) if self.steps_per_batch is None else self.steps

    def _lr(self, position: int) -> float:
        return lr_at(position, self.total, self.warmup, self.cfg.lr, self.cfg.min_lr)

    @contextlib.contextmanager
    def _lr_per_optimizer_step(self):
        """On the step clock: the lr set before every optimizer.step(), which is then counted."""
        if self.steps_per_batch is None:
            yield
            return

        def before_step(optimizer, args, kwargs):
            set_lr(optimizer, self._lr(self.steps))
            self.steps += 1
        hook = self.optimizer.register_step_pre_hook(before_step)
        try:
            yield
        finally:
            hook.remove()

    @contextlib.contextmanager
    def _previous_run_kept(self):
        """--overwrite: if this run ends by an exception (a UserError, Ctrl-C twice, any)
        before its first checkpoint, the old run's files come back (restore_previous_run)."""
        try:
            yield
        except BaseException:
            if self.previous_run:
                restore_previous_run(self.cfg.out_dir)
                self.previous_run = False
            raise

    # -- processes and records

    def _agree(self, logs: dict, requested: bool) -> tuple[dict, bool]:
        """Under DDP, one all-reduce: the logged numbers averaged over the processes (each
        logs its share of the global-batch losses, runtime.global_mean, so the average is the
        global batch's), and whether any process was asked to stop (Ctrl-C reaches them in
        different batches; all must stop after the same one). One process: as given."""
        if self.world == 1:
            return logs, requested
        t = torch.tensor([*logs.values(), float(requested)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(logs, (t[:-1] / self.world).tolist())), bool(t[-1] > 0)

    def _check_processes_agree(self) -> None:
        """DDP keeps the processes' weights equal (same start, same averaged gradients);
        checked at every checkpoint from each parameter's sum, gathered from all."""
        sums = torch.stack([p.detach().double().sum() for p in self.net.parameters()])
        gathered = [torch.empty_like(sums) for _ in range(self.world)]
        dist.all_gather(gathered, sums)
        if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
            raise RuntimeError("the processes' weights differ: DDP lost their synchronisation")

    def _record(self, name: str, sums: dict, partial: bool) -> dict:
        """Per-epoch means of the logged numbers; a partial epoch keeps its running sums."""
        n = max(1, sums.get("_n", 1))
        entry = {"epoch": self.epoch + 1, "mode": name, **{k: v / n for k, v in sums.items() if k != "_n"}}
        if partial:
            entry["_sums"] = dict(sums)
        self.history = [h for h in self.history if h["epoch"] != self.epoch + 1] + [entry]
        return entry


class GracefulStop:
    """The first Ctrl-C asks the loop to stop after the current batch (with a checkpoint,
    so --resume is exact); a second one interrupts at once."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this batch (Ctrl-C again to abort)", file=sys.stderr)


def check_resume(saved: dict, cfg, given: set, run_control: set, ckpt: dict) -> None:
    """--resume continues the saved run; refuse flags that would silently change it.
    --epochs may extend it (Loop: the cosine is recomputed over the new total), not cut
    it below the epochs it has done or begun."""
    if "epochs" in given:
        begun = ckpt["epoch"] + (ckpt["batch"] > 0)
        if cfg.epochs < begun:
            so_far = f"begun epoch {begun}" if ckpt["batch"] else f"done {begun} epoch(s)"
            raise UserError(f"--epochs {cfg.epochs}: the run being resumed has {so_far} already; "
                            f"give --epochs {begun} or more to continue it")
    for name in sorted(given - run_control - {"resume", "epochs"}):
        if saved.get(name) != getattr(cfg, name):
            raise UserError(f"--{name} {getattr(cfg, name)} differs from the run being resumed "
                                 f"({name}={saved.get(name)}); use a new --out_dir to change it")


def check_out_dir(cfg) -> None:
    """Never lose a run: before any work, --out_dir must be a writable folder, and one that
    holds a run (a checkpoint or a log) is refused unless this invocation --resume's it
    or --overwrite's it. Called after the flags and the inputs have been checked, so that
    a bad flag is named as such even when --out_dir holds a run.

    A folder with a log but no ckpt.pt (a run stopped before or while writing its first
    checkpoint) has nothing to resume: the refusal offers --overwrite. --overwrite sets
    the old run's files aside in <out_dir>/.previous_run/ and deletes them only once the
    new run has written its first checkpoint; if the new run ends by an exception before
    that, they are put back (Loop.run). A hard kill in between leaves .previous_run/
    without a new ckpt.pt: the old run is still in it, and every invocation but
    --overwrite is refused in one line saying so (move its files back to keep that run);
    --overwrite goes on, keeping it aside until its own first checkpoint. Beside a new
    ckpt.pt the folder is a leftover of a replaced run, removed by prepare_out_dir."""
    check_output(cfg.out_dir, "--out_dir")
    if cfg.overwrite:
        return
    unresumable = without_checkpoint(cfg.out_dir)
    if unresumable:
        raise UserError(unresumable)
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, f))]
    if held and not cfg.resume:
        raise UserError(f"--out_dir {cfg.out_dir} holds a run ({', '.join(held)}); pass --resume to continue it, "
                        f"--overwrite to replace it, or another --out_dir")


def without_checkpoint(out_dir: str) -> Optional[str]:
    """Why a run in out_dir cannot be resumed although the folder holds one (an old run set
    aside by an interrupted --overwrite, or a run stopped before its first checkpoint);
    None when it holds a ckpt.pt or no run."""
    if os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        return None
    aside = os.path.join(out_dir, PREVIOUS_RUN)
    if os.path.isdir(aside):
        return (f"--out_dir {out_dir}: an --overwrite was stopped before its first checkpoint and the run it "
                f"replaces waits in {aside}; move those files back to keep that run, or pass --overwrite")
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    if held:
        return (f"--out_dir {out_dir} holds a run stopped before its first checkpoint ({', '.join(held)}, "
                f"no ckpt.pt): nothing to resume; pass --overwrite to start it anew, or another --out_dir")
    return None


def written_by_a_run(name: str) -> bool:
    """Whether a file in a run folder is the run's (what --overwrite replaces)."""
    return name in RUN_FILES or name.startswith("recon_epoch")


def prepare_out_dir(cfg, ckpt) -> None:
    """Once the checks have passed, just before the work: remove what a crash left behind
    (ckpt.pt.tmp* files; a .previous_run/ beside a ckpt.pt, see check_out_dir), set the
    old run aside with --overwrite (its files move into .previous_run/; if one is there
    already, without a ckpt.pt, it holds the older run and the files beside it are those
    of the interrupted --overwrite: they go), and on --resume rewrite log.jsonl from the
    checkpoint's history, so that epochs finished after the last checkpoint (they are run
    again) don't appear twice. Rank 0 only."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    aside = os.path.join(cfg.out_dir, PREVIOUS_RUN)
    if os.path.isdir(aside) and os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt")):
        shutil.rmtree(aside)
    set_aside = cfg.overwrite and not os.path.isdir(aside)
    for f in os.listdir(cfg.out_dir):
        path = os.path.join(cfg.out_dir, f)
        if set_aside and written_by_a_run(f):
            os.makedirs(aside, exist_ok=True)
            os.replace(path, os.path.join(aside, f))
        elif f.startswith("ckpt.pt.tmp") or (cfg.overwrite and written_by_a_run(f)):
            os.remove(path)
    if ckpt is not None:           # finished epochs only (a partial one has running sums)
        write_log(cfg.out_dir, [h for h in ckpt["history"] if "_sums" not in h])


def write_log(out_dir: str, epochs: list) -> None:
    """log.jsonl, one line per finished epoch, rewritten whole each time (cli.write_atomic): a
    full disk is one line and never leaves half a line behind."""
    text = "".join(json.dumps(h) + "\n" for h in epochs)
    write_atomic(os.path.join(out_dir, "log.jsonl"), lambda f: f.write(text.encode()))


def restore_previous_run(out_dir: str) -> None:
    """An --overwrite run failed before its first checkpoint: its files go, and the old
    run's come back from .previous_run/ (check_out_dir)."""
    aside = os.path.join(out_dir, PREVIOUS_RUN)
    if not os.path.isdir(aside):
        return
    for f in os.listdir(out_dir):
        if written_by_a_run(f) or f.startswith("ckpt.pt.tmp"):
            os.remove(os.path.join(out_dir, f))
    for f in os.listdir(aside):
        os.replace(os.path.join(aside, f), os.path.join(out_dir, f))
    os.rmdir(aside)


def discard_previous_run(out_dir: str) -> None:
    """The --overwrite run has its first checkpoint: the old run's files can go."""
    shutil.rmtree(os.path.join(out_dir, PREVIOUS_RUN), ignore_errors=True)


def start_run(cls, argv, presets, run_control: set, kind: str):
    """Parse flags; with --resume, load the checkpoint and take its config, except the
    run-control flags (how long to run now, workers, device, where the folder is now),
    which belong to this invocation, and a larger --epochs (check_resume). Returns (cfg,
    checkpoint or None). The caller then checks its flags and inputs, and --out_dir
    (check_out_dir) last, before any work."""
    cfg, given = parse_config(cls, argv, presets)
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --out_dir, --overwrite replaces it: pass one of them")
    if not cfg.resume:
        return cfg, None
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(without_checkpoint(cfg.out_dir)
                        or f"--resume: {path}: no checkpoint there, nothing to resume; start the run without --resume")
    ckpt = load_checkpoint(path, kind, resume=True)
    saved = dict(ckpt["config"])
    if "amp" in saved:                  # a checkpoint from before --dtype: --amp was bfloat16
        saved["dtype"] = "bfloat16" if saved.pop("amp") else "float32"
    saved = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(cls)}}
    check_resume(saved, cfg, given, run_control, ckpt)
    kept = run_control | ({"epochs"} & given)
    return dataclasses.replace(cls(**saved), **{k: getattr(cfg, k) for k in kept}), ckpt
