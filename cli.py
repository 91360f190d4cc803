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
import os
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
    """argparse with one-line errors."""

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


def run_cli(main):
    """Run a script's main(); a UserError is printed as one line, exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def pick_device(name: str) -> torch.device:
    """--device: auto (a GPU when one is visible), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible")
    return torch.device(name)

