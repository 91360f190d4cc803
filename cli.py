"""cli.py — command lines: every flag is a field of a config dataclass, every user error one line.

    @dataclass
    class TrainConfig:
        lr: float = arg(1e-3, "peak learning rate")       # becomes --lr, with its help
    cfg, given = parse_config(TrainConfig, argv, presets)  # --config picks a preset of defaults
    run_cli(main)                                           # UserError -> "error: ..." , exit 2

The scripts (train.py, finetune.py, evaluate.py, reproduce.py, prepare_nyu.py) build their
command lines with this; docs/cli.md lists every flag (a test keeps it in step with the
dataclasses). Nothing here knows about models or data.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import field, fields
from typing import Optional

import torch


class UserError(Exception):
    """A problem the user can fix (missing file, bad layout, bad flag...). str(e) is one
    line naming the file or flag and the problem; the CLIs print it without a traceback."""


def arg(default, help: str, choices=None):
    """A config field with its one-line help (and allowed values) for the command line."""
    return field(default=default, metadata={"help": help, "choices": choices})


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and no abbreviated flags: `--epoch 1` is an error,
    not a silent `--epochs 1`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):                       # one line, no usage dump
        raise UserError(f"{self.prog}: {message} (see --help)")


def parse_config(cls, argv=None, presets: Optional[dict] = None):
    """Build a `cls` instance from `--name value` flags. With `presets`, the `config`
    field picks a dict of defaults that explicit flags override. Returns (cfg, names of
    the flags given explicitly)."""
    parser = Parser(prog=os.path.basename(sys.argv[0]), description=(cls.__doc__ or "").strip())
    for f in fields(cls):
        meta = dict(f.metadata)
        if f.type in ("bool", bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                default=None, help=meta.get("help"))
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(f"--{f.name}", type=typ, default=None, choices=meta.get("choices"),
                                help=f"{meta.get('help')} (default: {f.default})")
    ns = parser.parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if v is not None}
    values = {}
    if presets is not None:
        name = given.get("config", cls.config)
        values.update(presets[name])
    values.update(given)
    return cls(**values), set(given)


def one_line(e: UserError) -> str:
    """A UserError's message. One raised in a DataLoader worker process comes back wrapped
    in the worker's traceback ("Caught UserError in DataLoader worker process 0 ...
    Original Traceback ..."); its last line holds the original message."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = re.sub(r"^[\w.]*UserError: ", "", last)
    return msg


def run_cli(main):
    """Run a script's main(); a UserError is printed as one line, exit status 2. When main()
    has returned, the process ends torchrun's process group (runtime.close_distributed)."""
    try:
        main()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    from runtime import close_distributed      # here, not at the top: runtime imports cli
    close_distributed()


def pick_device(name: str) -> torch.device:
    """--device: auto (a GPU when one is visible), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"--device {name}: choose auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is visible")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device(name)


def check_numbers(cfg, finite=(), positive=(), non_negative=(), unit=()) -> None:
    """One-line errors for numeric flags: NaN or infinity (`finite`; implied by the other
    lists), <= 0 (`positive`), < 0 (`non_negative`), outside [0, 1] (`unit`)."""
    for name in dict.fromkeys(tuple(finite) + tuple(positive) + tuple(non_negative) + tuple(unit)):
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in unit:
        if not 0 <= getattr(cfg, name) <= 1:
            raise UserError(f"--{name} must be in [0, 1], got {getattr(cfg, name)}")


def check_output(path: str, flag: str, kind: str = "dir") -> None:
    """Before any work: `path` can be written as a folder (kind "dir") or a file ("file").
    An empty name, a file where a folder is needed (or the reverse), and an unwritable
    location are one line each."""
    if not path:
        raise UserError(f"{flag} is empty: give a {'folder' if kind == 'dir' else 'file'} name")
    if os.path.exists(path):
        if kind == "dir" and not os.path.isdir(path):
            raise UserError(f"{flag} {path}: a file is there, not a folder")
        if kind == "file" and os.path.isdir(path):
            raise UserError(f"{flag} {path}: a folder is there, not a file")
        if not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):                  # the folders that will be created
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable")

