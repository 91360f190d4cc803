"""util/runs.py — what train.py and finetune.py share around their loop: the flags they
check alike, the training set, and the run folder — never losing a run in it, and
--resume's rule for which flags may change.

A run folder (--out_dir) holds ckpt.pt, log.jsonl, loss_curve.png (and train.py's
recon_epoch*.png). Before any work: a folder that holds a run is refused unless this
invocation --resume's it or --overwrite's it; --overwrite keeps the old run aside in
.previous_run/ until the new run's first checkpoint, and puts it back if the new run ends
before that (util/engine.py calls restore_previous_run). From its checks to its end a run
holds the folder with a lock file (claim_out_dir), so two runs never share one.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import socket
from typing import Optional

import torch

import data
import model as M
from util.checkpoints import load_checkpoint
from util.cli import UserError, check_numbers, check_output, parse_config, write_atomic
from util.runtime import rank_and_world

# Flags that belong to one invocation, not to the run: --resume may change them. (out_dir
# too: a run folder that was moved or copied resumes where it is now.)
RUN_CONTROL = {"stop_after", "ckpt_every", "workers", "device", "resume", "compile", "overwrite", "out_dir",
               "grad_ckpt", "accum_steps"}
# What a run writes into its folder (and recon_epoch*.png); --overwrite sets these aside
# in PREVIOUS_RUN inside it until the new run's first checkpoint (check_out_dir).
RUN_FILES = ("ckpt.pt", "log.jsonl", "loss_curve.png")
PREVIOUS_RUN = ".previous_run"
# A run holds its folder with this file (created exclusively: "<pid> <host>") from its last
# check to its end, so that a second run into the same folder is refused (claim_out_dir).
LOCK = ".lock"


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
    claim_out_dir(cfg.out_dir)           # from here on no other run can pass these checks
    try:
        if cfg.overwrite:
            return
        unresumable = without_checkpoint(cfg.out_dir)
        if unresumable:
            raise UserError(unresumable)
        held = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, f))]
        if held and not cfg.resume:
            raise UserError(f"--out_dir {cfg.out_dir} holds a run ({', '.join(held)}); pass --resume to continue "
                            f"it, --overwrite to replace it, or another --out_dir")
    except BaseException:
        release_out_dir(cfg.out_dir, refused=True)
        raise


_claimed = {}          # lock path -> whether claim_out_dir created the folder


def claim_out_dir(out_dir: str) -> None:
    """Hold the run folder for this process: create <out_dir>/.lock exclusively (O_EXCL: of
    two runs started together exactly one gets it), holding this process's id and host.
    A lock held by a running process, or by one that has died (a kill -9 leaves it), is one
    line naming it and what to do. Under torchrun rank 0 holds it for all the processes.
    release_out_dir ends the hold (util/engine.Loop.run at the end of the run; at the exit of
    the process, whatever happened before the loop)."""
    if rank_and_world()[0] != 0:
        return
    existed = os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(out_dir, LOCK))
    me = f"{os.getpid()} {socket.gethostname()}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if _read_lock(path) != me:                 # this process's own lock (a run that ended by an error)
            raise UserError(lock_refusal(out_dir)) from None
    else:
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
    if path not in _claimed:
        _claimed[path] = not existed
        if len(_claimed) == 1:
            atexit.register(_release_all)


def release_out_dir(out_dir: str, refused: bool = False) -> None:
    """End this process's hold of the folder: its lock, and, when the run was `refused`
    before any work, the folder if the claim made it."""
    path = os.path.abspath(os.path.join(out_dir, LOCK))
    if path not in _claimed:
        return
    if _read_lock(path) == f"{os.getpid()} {socket.gethostname()}":
        os.remove(path)
    if _claimed.pop(path) and refused and os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)


def _release_all() -> None:
    for path in list(_claimed):
        release_out_dir(os.path.dirname(path))


def _read_lock(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def stale_lock(out_dir: str) -> bool:
    """Whether <out_dir>/.lock was left by a process of this host that no longer runs."""
    pid, host = _lock_owner(os.path.join(out_dir, LOCK))
    return pid is not None and host == socket.gethostname() and not _alive(pid)


def lock_refusal(out_dir: str) -> str:
    """Why <out_dir> cannot be claimed: who holds its lock, and what to do."""
    path = os.path.join(out_dir, LOCK)
    pid, host = _lock_owner(path)
    if pid is None:
        return (f"--out_dir {out_dir}: another run is claiming it right now ({path}); give another --out_dir, or "
                f"wait and look again")
    if host != socket.gethostname():
        return (f"--out_dir {out_dir}: a run of process {pid} on host {host} holds it ({path}); if that run has "
                f"ended, remove {path} and run again")
    if _alive(pid):
        return (f"--out_dir {out_dir}: another run (process {pid}) is using it ({path}); wait for it to end, or "
                f"give another --out_dir")
    return (f"--out_dir {out_dir}: {path} was left by process {pid}, which is no longer running (killed?); if "
            f"no run uses this folder, remove {path} and run again (--resume continues from its last checkpoint)")


def _lock_owner(path: str) -> tuple:
    text = _read_lock(path) or ""
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit():
        return None, None
    return int(parts[0]), parts[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # somebody else's process
        return True
    return True


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
