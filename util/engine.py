"""util/engine.py — the training loop train.py and finetune.py share (MAE's
engine_pretrain.py): epochs of batches, one step per batch, the lr set before every
optimiser step, logs, checkpoints, exact resume.

    loop = Loop(cfg, net, optimizer, dataset, generator, device, extra={...})
    loop.resume(ckpt)                      # optional: continue a saved run exactly
    loop.run(step)                         # step(batch, epoch) -> {"loss": ..., ...}

Each epoch's batches are a permutation that depends only on (seed, epoch), so a resumed run
sees the batches an uninterrupted one would; under torchrun each process takes its
contiguous slice of every global batch (util/runtime.py) and rank 0 alone writes. The
checkpoint (`<out_dir>/ckpt.pt`, written whole) holds the weights, optimiser, random
states and the position inside the epoch: an interrupted run (Ctrl-C, --stop_after, a crash
after a checkpoint) resumes bit for bit.

The lr is a function of the step (util/lr_sched.lr_at), set before every optimizer.step()
from the schedule's position: the batches begun (the default; every step of a batch, e.g.
STTP's four, has that batch's lr) or, with steps_per_batch (train.py --lr_schedule steps),
the optimiser steps taken, so that objectives making 4 and 1 steps a batch get the same lr
at equal steps (results/regime/). Checkpoints keep the count; a run resumed with more
--epochs recomputes the total and goes on from where it is, as MAE does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function
from tqdm import tqdm

import data
from util import charts
from util.checkpoints import load_optimizer_state, load_weights, save_checkpoint
from util.cli import UserError
from util.lr_sched import lr_at, set_lr
from util.runs import discard_previous_run, prepare_out_dir, release_out_dir, restore_previous_run, write_log
from util.runtime import rank_and_world

VERSION = 1


class Loop:
    """Epochs of deterministic batches with the lr schedule, a progress bar, per-epoch logs
    and a loss curve, atomic checkpoints, exact resume and a graceful stop.

    `cfg` needs the fields epochs, batch_size, lr, min_lr, lr_warmup_epochs, seed,
    out_dir, stop_after, ckpt_every, workers, accum_steps and overwrite (TrainConfig and
    FinetuneConfig have them). `net` is the bare network, the one checkpoints save (the
    step function may run it wrapped in DDP). `extra` goes into every checkpoint beside
    the standard keys; so does the state of `scaler` (float16's GradScaler).
    steps_per_batch(epoch): the optimiser steps each batch of that epoch makes, for the lr
    indexed by optimiser steps; None: by batches.
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
        # The schedule's length and warm-up on its clock; the warm-up ends at a whole batch.
        self.total = self._start_of(cfg.epochs, 0)
        self.warmup = self._start_of(*divmod(int(cfg.lr_warmup_epochs * self.batches_per_epoch),
                                             self.batches_per_epoch))
        self.epoch, self.batch, self.history = 0, 0, []
        self.steps = 0                # optimiser steps taken
        self.done_here = 0            # batches this invocation ran (what --stop_after counts)
        self.resumed = None           # the checkpoint a resumed run started from
        self.previous_run = False     # --overwrite: the old run waits aside until our first checkpoint

    def run(self, step, phase=lambda epoch: "", after_epoch=lambda epochs_done: None) -> None:
        """step(batch on device, epoch) does one batch's optimiser step(s) and returns a dict
        of numbers, "loss" among them; phase(epoch) names the epoch's stage for the logs;
        after_epoch(epochs done) runs on rank 0 after each epoch's checkpoint (pictures)."""
        try:
            with self._previous_run_kept(), self._lr_every_step(), GracefulStop() as stop:
                self._begin()
                while self.epoch < self.cfg.epochs:
                    if not self.train_one_epoch(step, phase(self.epoch), after_epoch, stop):
                        return
        finally:
            release_out_dir(self.cfg.out_dir)         # the run folder's lock (util/runs.claim_out_dir)
        agree = f" (the {self.world} processes' weights were equal at every checkpoint)" if self.world > 1 else ""
        print(f"done: {self.path}{agree}")

    def train_one_epoch(self, step, name: str, after_epoch, stop) -> bool:
        """The rest of this epoch, then its log line, checkpoint and pictures. False when the
        run stops here (Ctrl-C in some process, or --stop_after batches run): a checkpoint
        first, so --resume goes on exactly."""
        cfg, sums, t0 = self.cfg, self._running_sums(), time.time()
        bar = self._batches(name)
        for batch in bar:
            logs, requested = self._agree(step(batch, self.epoch), stop.requested)
            if not math.isfinite(logs["loss"]):
                raise UserError(f"the loss became {logs['loss']} at epoch {self.epoch + 1}, "
                                f"batch {self.batch}; try a lower --lr")
            counts = sums.setdefault("_count", {})       # an objective may log a term in some batches only
            for k, v in logs.items():
                sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
            sums["_n"] = sums.get("_n", 0) + 1
            self.batch, self.done_here = self.batch + 1, self.done_here + 1
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
            halt = self._halt(requested)
            if self.batch < self.batches_per_epoch and (halt or (cfg.ckpt_every and self.batch % cfg.ckpt_every == 0)):
                self._record(name, sums, partial=True)
                self.checkpoint()
                if halt:
                    bar.close()
                    return self._stopped(f"at epoch {self.epoch + 1}, batch {self.batch}")
        bar.close()                     # the epoch's last batch: a stop waits for its checkpoint
        self._end_epoch(name, sums, t0, after_epoch)
        if self.epoch < cfg.epochs and self._halt(self._agree({}, stop.requested)[1]):
            return self._stopped(f"at the end of epoch {self.epoch}")
        return True

    # -- around the batches

    def _begin(self) -> None:
        """Rank 0 prepares the folder (--overwrite sets the old run aside); under torchrun,
        say how the batch is shared."""
        if self.rank == 0:
            self.previous_run = self.cfg.overwrite
            prepare_out_dir(self.cfg, self.resumed)
        if self.world > 1:
            cfg = self.cfg
            print(f"{self.world} processes: batches of {cfg.batch_size} images in all, "
                  f"{cfg.batch_size // self.world} per process; lr {cfg.lr:g} as given, not rescaled: "
                  f"the global batch does not change with the number of processes")

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

    def _halt(self, requested: bool) -> bool:
        """The stop rule: Ctrl-C in some process (agreed by all), or --stop_after batches run."""
        return requested or bool(self.cfg.stop_after and self.done_here >= self.cfg.stop_after)

    def _stopped(self, where: str) -> bool:
        print(f"stopped {where}; --resume continues from {self.path}")
        return False

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

    def _start_of(self, epoch: int, batch: int) -> int:
        """Where batch `batch` of `epoch` begins on the schedule's clock: the batches before
        it, or with steps_per_batch the optimiser steps they make."""
        per = self.steps_per_batch or (lambda e: 1)
        before = sum(per(e) for e in range(epoch)) * self.batches_per_epoch
        return before + batch * per(epoch) if batch else before

    def position(self) -> int:
        """The schedule's position now: the batches begun, or the optimiser steps taken."""
        return self._start_of(self.epoch, self.batch) if self.steps_per_batch is None else self.steps

    @contextlib.contextmanager
    def _lr_every_step(self):
        """While run() runs: the lr set before every optimizer.step() (a pre-hook), which is
        then counted. (A step float16's scaler skips never calls it: it does not count.)"""
        def before_step(optimizer, args, kwargs):
            set_lr(optimizer, lr_at(self.position(), self.total, self.warmup, self.cfg.lr, self.cfg.min_lr))
            self.steps += 1
        hook = self.optimizer.register_step_pre_hook(before_step)
        try:
            yield
        finally:
            hook.remove()

    # -- checkpoints

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
        self.steps = ckpt["scheduler"].get("optimizer_steps", self._start_of(self.epoch, self.batch))

    def checkpoint(self) -> None:
        """Rank 0 writes; under DDP the processes first check that they hold the same weights
        and afterwards wait for the write, so that none moves on without it on disk. The
        first checkpoint of an --overwrite run lets the old run's files go."""
        if self.world > 1:
            self._check_processes_agree()
        if self.rank == 0:
            scaler = {} if self.scaler is None else {"scaler": self.scaler.state_dict()}
            save_checkpoint({"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                             "scheduler": {"it": self.position(), "total": self.total, "warmup": self.warmup,
                                           "optimizer_steps": self.steps},
                             "epoch": self.epoch, "batch": self.batch,
                             "step": self.epoch * self.batches_per_epoch + self.batch,
                             "config": dataclasses.asdict(self.cfg), "rng_state": rng_state(self.generator),
                             "history": self.history, "version": VERSION, **scaler, **self.extra}, self.path)
            if self.previous_run:
                discard_previous_run(self.cfg.out_dir)
                self.previous_run = False
        if self.world > 1:
            dist.barrier()

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
        """Under DDP, one all-reduce: the logged numbers summed over the processes (each logs
        its part of the global batch's losses, util/runtime.py), and whether any process was
        asked to stop (Ctrl-C reaches them in different batches; all must stop after the
        same one). One process: as given."""
        if self.world == 1:
            return logs, requested
        t = torch.tensor([*logs.values(), float(requested)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(logs, t[:-1].tolist())), bool(t[-1] > 0)

    def _check_processes_agree(self) -> None:
        """DDP keeps the processes' weights equal (same start, same averaged gradients);
        checked at every checkpoint from each parameter's sum, gathered from all."""
        sums = torch.stack([p.detach().double().sum() for p in self.net.parameters()])
        gathered = [torch.empty_like(sums) for _ in range(self.world)]
        dist.all_gather(gathered, sums)
        if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
            raise RuntimeError("the processes' weights differ: DDP lost their synchronisation")

    def _running_sums(self) -> dict:
        """The epoch's sums of the logged numbers so far: a resumed partial epoch's, else none."""
        last = self.history[-1] if self.history else None
        if last and last["epoch"] == self.epoch + 1 and self.batch > 0:
            return {**last["_sums"], "_count": dict(last["_sums"].get("_count", {}))}
        return {}

    def _record(self, name: str, sums: dict, partial: bool) -> dict:
        """Per-epoch means of the logged numbers, each over the batches that logged it; a partial
        epoch keeps its running sums."""
        n, counts = max(1, sums.get("_n", 1)), sums.get("_count", {})
        entry = {"epoch": self.epoch + 1, "mode": name,
                 **{k: v / counts.get(k, n) for k, v in sums.items() if not k.startswith("_")}}
        if partial:
            entry["_sums"] = {**sums, "_count": dict(counts)}
        self.history = [h for h in self.history if h["epoch"] != self.epoch + 1] + [entry]
        return entry


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list:
    """This epoch's batches of indices: a permutation that depends only on (seed, epoch),
    so a resumed run sees exactly the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)[: n // batch_size * batch_size]
    return perm.view(-1, batch_size).tolist()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def fetch(loader, device):
    """The loader's batches, on the device; the fetching and the copy under the profiler
    label "data" (studies/bench.py's time split; a label costs nothing when no profiler runs)."""
    batches = iter(loader)
    while True:
        with record_function("data"):
            batch = next(batches, None)
            if batch is None:
                return
            batch = to_device(batch, device)
        yield batch


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
