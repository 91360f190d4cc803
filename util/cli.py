"""util/cli.py — command lines: every flag is a field of a config dataclass, every user error one line.

    @dataclass
    class TrainConfig:
        lr: float = arg(1e-3, "peak learning rate")       # becomes --lr, with its help
    cfg, given = parse_config(TrainConfig, argv, presets)  # --config picks a preset of defaults
    run_cli(main)                                           # UserError -> "error: ..." , exit 2
    check_not_input([("--out", out)], [("--rgb", rgb)])    # an output never replaces an input
    write_atomic(path, lambda f: f.write(data))            # whole or not at all; a full disk: one line

The scripts (train.py, finetune.py, evaluate.py, studies/reproduce.py, tools/prepare_nyu.py)
build their command lines with this; docs/cli.md lists every flag (a test keeps it in step
with the dataclasses). write_atomic writes the checkpoints and every output of evaluate.py
and tools/prepare_nyu.py. Nothing here knows about models or data; everything else imports it.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import re
import sys
from dataclasses import field, fields
from typing import Optional

import torch
import torch.distributed as dist


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
        # argparse expands %-formats in help strings ("%(default)s"): a literal % must be
        # doubled, or --help itself fails ("~30 % more time").
        text = str(meta.get("help")).replace("%", "%%")
        if f.type in ("bool", bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(f"--{f.name}", type=typ, default=None, choices=meta.get("choices"),
                                help=f"{text} (default: {str(f.default).replace('%', '%%')})")
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
    has returned, the process ends torchrun's process group (close_distributed)."""
    try:
        main()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    close_distributed()


def close_distributed() -> None:
    """The end of a torchrun process (util/runtime.init_distributed joined the group), once its
    main() has returned and its DDP network is gone: every process waits until all have
    finished their last collective, then the process group is destroyed here, on the main
    thread, while the interpreter is whole. It must be gone before the interpreter finalises
    (issue 20): Gloo runs each collective on a worker thread, which lets go of the
    collective's tensors only after waking the caller, and freeing a tensor made in Python
    takes the GIL; a worker that gets there once finalisation has begun is ended by Python
    with pthread_exit, whose unwinding through a C++ destructor aborts the process
    ("terminate called without an active exception", exit -6). Destroying the group joins
    its workers, the GIL released. Whatever still holds the group keeps it, and its threads,
    alive past destroy_process_group: the DDP network (hence after main()), and
    torch.distributed.nn.functional's default arguments (init_distributed imports it before
    the group exists). A main() that raised leaves the group alone: a peer may be inside a
    collective, and torchrun stops the others when this process exits with an error.
    Nothing without torchrun."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def _identity(path: str):
    """(device, inode) of what `path` names, following links; None if nothing is there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_not_input(outputs, inputs) -> None:
    """Before any work: no output is an input. `outputs` and `inputs` are (flag, path) pairs,
    files or folders. They are compared as the file system sees them (device and inode), so
    another spelling of an input, a link to it or a link it is, is still that input. An
    output folder that is an input folder is refused too: what is written there would land
    among the inputs, or on them."""
    seen = {}
    for flag, path in inputs:
        key = _identity(path) if path else None
        if key is not None:
            seen.setdefault(key, (flag, path))
    for flag, path in outputs:
        key = _identity(path) if path else None
        if key in seen:
            in_flag, in_path = seen[key]
            what = "folder" if os.path.isdir(path) else "file"
            raise UserError(f"{flag} {path}: that is the {in_flag} {what} {in_path}, an input; outputs never "
                            f"replace inputs: give another {'folder' if what == 'folder' else 'name'}")


def write_atomic(path: str, write) -> None:
    """write(file) into a temporary file beside `path`, then rename it to `path`: a crash or a
    full disk never leaves half a file, and what was at `path` before stays as it was. The
    temporary file is removed on any failure; a write error (a full disk: OSError ENOSPC,
    also when a library re-raises it as a RuntimeError) is one line naming `path`.

    `write` gets the open temporary file; a writer that only takes a name (the ONNX
    exporters) writes to `file.name`. A device or a pipe at `path` (/dev/stdout,
    /dev/null) is written in place: it holds no file to keep whole, and renaming onto it
    would replace the device itself."""
    special = os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)
    tmp = None if special else f"{path}.tmp{os.getpid()}"
    try:
        if tmp is not None:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp or path, "wb") as f:
            write(f)
            f.flush()
            if tmp is not None:
                os.fsync(f.fileno())      # on disk before the rename makes it the file
        if tmp is not None:
            os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        kept = " (nothing there was changed)" if tmp is not None else ""
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(e, (OSError, RuntimeError)) and cause is not None:
            why = "no space left on device" if cause.errno == errno.ENOSPC else \
                f"cannot be written ({cause.strerror or cause})"
            raise UserError(f"{path}: {why}{kept}") from None
        if isinstance(e, RuntimeError):
            raise UserError(f"{path}: cannot be written ({str(e).splitlines()[0]}){kept}") from None
        raise


def write_png(path: str, image) -> None:
    """A PIL image written as a PNG whole or not at all (write_atomic): every picture and
    chart the project writes goes through here."""
    write_atomic(path, lambda f: image.save(f, format="PNG"))
