"""util/checkpoints.py — files of weights: the project's checkpoints written and read, third-party
ViT weights read for --init, a model shared as .safetensors + .json.

    save_checkpoint(ckpt, "out/pretrain/ckpt.pt")        # atomic; a full disk is one line
    ckpt = load_checkpoint(path, "finetune")             # ckpt.pt, or x.safetensors + x.json
    report = init_encoder(net, "mae_pretrain_vit_base.pth")   # --init
    export_safetensors(ckpt, "model.safetensors")        # + model.json

The loop (util/engine.py) calls save_checkpoint; train.py, finetune.py, evaluate.py and
the studies read through load_checkpoint, --init through init_encoder. The method
(masking.py, model.py, sttp.py) never reads a file: util/vit_weights.py maps the keys of a
state dict this module has read.

Loading a file never runs code. A .pth file is a pickle, and a pickle may call any function
(os.system, open) while it loads. torch.load(weights_only=True) rebuilds only tensors and
plain data (dict, list, tuple, str, numbers, None) and refuses anything else before
creating it. The project's own checkpoints hold nothing else (save_checkpoint checks);
third-party checkpoints hold a few more types, harmless ones, allowed by name in ALLOW_LIST;
anything else is refused in one line that names it. A .safetensors file holds tensors only:
nothing in it can run.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pickle
import re

import dataclasses
import math

import numpy as np
import torch

import data
import model as M
from util.cli import UserError, write_atomic
from util.vit_weights import InitReport, load_encoder_weights

# What each script writes: kind -> (how messages name it, the script that writes it).
KINDS = {"pretrain": ("pre-training", "train.py"), "finetune": ("fine-tuned", "finetune.py")}
# The keys the readers of every checkpoint use, with their types ...
NEEDED = {"model": dict, "config": dict, "model_config": dict, "kind": str}
# ... and those --resume (util/engine.Loop.resume) and studies/reproduce.py's step count use.
RESUME_NEEDED = {"optimizer": dict, "rng_state": dict, "epoch": int, "batch": int, "history": list}
# What a .safetensors export keeps beside its tensors (in its .json): what the tensors are
# (kind, model_config), how the model was trained (config; finetune.py reads its preset),
# and what its inputs and outputs mean (data: classes, crop, rgb normalisation, depth unit;
# dataset in fine-tuned checkpoints from before "data"). The optimiser, RNG and history
# (for --resume) stay in ckpt.pt.
SHARED = ("kind", "version", "model_config", "config", "dataset", "data")


# -----------------------------------------------------------------------------
# What a third-party checkpoint may hold besides tensors and plain data, and why each is
# harmless: unpickling one creates a value and sets its fields, it calls nothing else, and
# whatever it holds goes through the same restricted unpickler.

_scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
_NUMBERS = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
            np.float16, np.float32, np.float64)
ALLOW_LIST = [
    (argparse.Namespace, "MAE's and MultiMAE's save_model store their command line as `args`: a bag of "
                         "attributes, set from the (restricted) values it was saved with"),
    (_scalar, "numpy's scalar reconstructor: one number from its dtype and raw bytes (a metric or "
              "hyperparameter computed with numpy)"),
    ((_scalar, "numpy.core.multiarray.scalar"), "the same, as files written with numpy 1.x name it"),
    ((_scalar, "numpy._core.multiarray.scalar"), "the same, as files written with numpy 2.x name it"),
    (np.dtype, "a numpy scalar's dtype, built from a type code such as 'f8'"),
    *[(type(np.dtype(t)), f"the class of the {np.dtype(t).name} dtype, whose state (byte order) a numpy "
                          f"scalar's dtype is given when it loads") for t in _NUMBERS],
]


def _safe_globals():
    """ALLOW_LIST for the torch.load calls inside the block. torch 2.4 has no context manager
    and no renamed entries: there they are added process-wide, without the renamed ones."""
    allowed = [g for g, _ in ALLOW_LIST]
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(allowed)
    torch.serialization.add_safe_globals([g for g in allowed if not isinstance(g, tuple)])
    return contextlib.nullcontext()


def _torch_load(path: str, name: str):
    """torch.load(weights_only=True) with ALLOW_LIST; `name` starts every message ("--init x.pth")."""
    try:
        with _safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        # torch names what it refused as "GLOBAL module.name" (or, for a type it would
        # have to fill in, "got <class 'module.name'>"); the wording varies between versions.
        refused = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", msg) if isinstance(e, pickle.UnpicklingError) \
            else None
        if refused:
            raise UserError(f"{name}: refused: the file's pickle would create {refused.group(1) or refused.group(2)}, "
                            f"which is not plain data; only tensors and plain data are loaded") from None
        reason = [line.strip() for line in msg.split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
        raise UserError(f"{name}: not a readable checkpoint ({type(e).__name__}: {reason[0] if reason else ''})") from None


def _load_tensors(path: str, name: str) -> dict:
    """A .safetensors file's tensors (on the CPU)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"{name}: reading .safetensors needs the safetensors package: pip install safetensors") from None
    try:
        return load_file(path)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{name}: not a readable .safetensors file ({type(e).__name__}: {e})".splitlines()[0]) from None


def is_safetensors(path: str) -> bool:
    """Whether a file name says .safetensors (in any case: M.SAFETENSORS too)."""
    return path.lower().endswith(".safetensors")


def json_path(path: str) -> str:
    """The .json beside a .safetensors file: model.safetensors -> model.json."""
    return os.path.splitext(path)[0] + ".json"


def _load_shared(path: str) -> dict:
    """An exported model as a checkpoint: its .json's keys and its tensors as "model"."""
    meta_path = json_path(path)
    if not os.path.isfile(meta_path):
        raise UserError(f"{path}: no {meta_path} beside it, which says what the tensors are (kind, model_config); "
                        f"evaluate.py --export_safetensors writes both")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: not a JSON object of {', '.join(SHARED)}")
    if isinstance(meta.get("model_config"), dict):   # JSON has no tuples; ModelConfig's sequences are tuples
        meta["model_config"] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items()}
    return {**meta, "model": _load_tensors(path, path)}


# -----------------------------------------------------------------------------
# The project's checkpoints


def load_checkpoint(path: str, kind: str | None = None, resume: bool = False) -> dict:
    """A checkpoint of the given kind ("pretrain", "finetune"; None: either) with the keys and
    types its readers use (`resume`: also what --resume needs), from a .pt file or from a
    .safetensors file and its .json. Anything else (no file, a file that would run code, an
    unreadable or foreign file, the other kind, a missing key) is one line naming the file."""
    noun, script = KINDS[kind] if kind else ("MaskMentor", "train.py or finetune.py")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no {noun} checkpoint there")
    ckpt = _load_shared(path) if is_safetensors(path) else _torch_load(path, path)
    what = f"not a MaskMentor {'' if kind is None else noun + ' '}checkpoint"
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: {what} (a {type(ckpt).__name__}, not a dict of model, config, ...)")
    if kind is not None and ckpt.get("kind") in KINDS and ckpt["kind"] != kind:
        raise UserError(f"{path}: a {KINDS[ckpt['kind']][0]} checkpoint, not a {noun} one ({script} writes those)")
    needed = {**NEEDED, **(RESUME_NEEDED if resume else {})}
    missing = [k for k in needed if k not in ckpt]
    if kind == "finetune" and "data" not in ckpt and "dataset" not in ckpt:
        missing.append("data")
    if missing:
        hint = "; --init reads MAE, MultiMAE and timm weights" if "kind" in missing else ""
        raise UserError(f"{path}: {what}: it lacks {', '.join(missing)}{hint}")
    for k, typ in needed.items():
        if not isinstance(ckpt[k], typ) or isinstance(ckpt[k], bool) and typ is int:
            where = json_path(path) if is_safetensors(path) and k != "model" else path    # the field's file
            raise UserError(f"{where}: {what}: its {k} is a {type(ckpt[k]).__name__}, not a {typ.__name__}")
    if ckpt["kind"] not in KINDS:
        raise UserError(f"{path}: {what}: its kind is {ckpt['kind']!r}, not one of {', '.join(KINDS)}")
    bad = next((k for k, v in ckpt["model"].items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise UserError(f"{path}: {what}: its model[{bad!r}] is a {type(ckpt['model'][bad]).__name__}, not a tensor")
    meta = json_path(path) if is_safetensors(path) else path        # where the fields were read from
    model_cfg = check_model_config(ckpt["model_config"], meta)
    if "data" in ckpt:
        check_conventions(ckpt["data"], model_cfg, meta)
    if "dataset" in ckpt and ckpt["dataset"] not in data.DATASETS:
        raise UserError(f"{meta}: dataset must be one of {', '.join(data.DATASETS)}, got {ckpt['dataset']!r}")
    check_tensors(ckpt, path, values=False)                      # every tensor: no crafted views
    check_tensors(ckpt["model"], path)                           # the weights: floating point, finite
    return ckpt


# -----------------------------------------------------------------------------
# What a loaded file holds, checked before anything uses it


def check_tensors(tree, name: str, values: bool = True) -> None:
    """The tensors in `tree` (dicts and lists looked into), before anything uses them.
    Always: a tensor must not claim more values than the storage it views holds (a stride-0
    view of one number can claim 10^10: .contiguous() or any arithmetic would allocate them
    all). With `values`, they are weights for a network's float parameters: floating point
    (an integer tensor would be cast into them silently, a complex one lose its imaginary
    part) and finite (NaN weights give a constant class map). One line naming the file
    and the tensor."""
    for key, t in _tensors(tree):
        have, claim = t.untyped_storage().nbytes(), t.numel() * t.element_size()
        if claim > have:
            raise UserError(f"{name}: {key} claims {tuple(t.shape)} = {t.numel()} values ({claim} bytes) on a "
                            f"storage of {have} bytes: a crafted view, refused")
        if values and not t.is_floating_point():
            raise UserError(f"{name}: {key} is {t.dtype}, not floating point; weights are floats (an integer or "
                            f"complex tensor would be converted without a word)")
        if values and not bool(torch.isfinite(t).all()):
            raise UserError(f"{name}: {key} holds NaN or infinite values")


def _tensors(tree, prefix: str = ""):
    if torch.is_tensor(tree):
        yield prefix or "tensor", tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}[{i}]")


def check_model_config(d, name: str) -> M.ModelConfig:
    """ckpt["model_config"] (a .json's "model_config") as a ModelConfig, every field of the
    type and range the network needs: sizes positive integers, widths divisible by their
    heads, ratios positive, drop path in [0, 1), modalities rows of the table. One line
    naming the file and the field."""
    if not isinstance(d, dict):
        raise UserError(f"{name}: model_config must be a JSON object / dict, got {type(d).__name__}")
    try:
        cfg = M.ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UserError(f"{name}: its model_config does not fit this version ({e})") from None
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        bad = None
        if f.type == "int" and (type(v) is not int or v <= 0):
            bad = "a positive integer"
        elif f.type == "float" and (type(v) not in (int, float) or not math.isfinite(v) or v < 0):
            bad = "a finite number >= 0"
        elif f.type == "bool" and type(v) is not bool:
            bad = "true or false"
        if bad:
            raise UserError(f"{name}: model_config.{f.name} must be {bad}, got {v!r}")
    if not 0 <= cfg.drop_path < 1 or cfg.mlp_ratio <= 0:
        raise UserError(f"{name}: model_config: drop_path must be in [0, 1) and mlp_ratio > 0, "
                        f"got {cfg.drop_path!r}, {cfg.mlp_ratio!r}")
    for width, heads in (("width", "num_heads"), ("dec_width", "dec_heads")):
        if getattr(cfg, width) % getattr(cfg, heads) or getattr(cfg, width) % 4:
            raise UserError(f"{name}: model_config.{width} {getattr(cfg, width)} must be a multiple of 4 and of "
                            f"{heads} {getattr(cfg, heads)}")
    if cfg.patch_size % 4 or cfg.image_size % cfg.patch_size:
        raise UserError(f"{name}: model_config.patch_size {cfg.patch_size} must be a multiple of 4 that divides "
                        f"image_size {cfg.image_size}")
    return cfg


def check_conventions(d, cfg: M.ModelConfig, name: str) -> None:
    """ckpt["data"] (data.conventions: what the inputs and outputs mean), every value of the
    type and range inference needs: a known dataset, one class name per output of the head,
    a positive crop, three finite rgb means and three positive finite stds, depth in metres.
    One line naming the file and the field."""
    if not isinstance(d, dict):
        raise UserError(f"{name}: data must be a JSON object / dict, got {type(d).__name__}")
    missing = [k for k in ("dataset", "classes", "image_size", "rgb_mean", "rgb_std", "depth_unit") if k not in d]
    if missing:
        raise UserError(f"{name}: data lacks {', '.join(missing)}")
    number = lambda x: type(x) in (int, float) and math.isfinite(x)
    checks = [("dataset", d["dataset"] in data.DATASETS, f"one of {', '.join(data.DATASETS)}"),
              ("classes", isinstance(d["classes"], list) and all(isinstance(c, str) for c in d["classes"])
               and len(d["classes"]) == cfg.num_classes,
               f"a list of {cfg.num_classes} class names (one per output of the head)"),
              ("image_size", type(d["image_size"]) is int and d["image_size"] > 0, "a positive integer"),
              ("rgb_mean", isinstance(d["rgb_mean"], list) and len(d["rgb_mean"]) == 3
               and all(number(x) for x in d["rgb_mean"]), "a list of 3 finite numbers"),
              ("rgb_std", isinstance(d["rgb_std"], list) and len(d["rgb_std"]) == 3
               and all(number(x) and x > 0 for x in d["rgb_std"]), "a list of 3 positive finite numbers"),
              ("depth_unit", d["depth_unit"] == "metres", "'metres' (the unit this version reads depth in)")]
    if "cues" in d:
        checks.append(("cues", number(d["cues"]) and 0 <= d["cues"] <= 1, "a number in [0, 1]"))
    for field, ok, what in checks:
        if not ok:
            raise UserError(f"{name}: data.{field} must be {what}, got {d[field]!r}")


def load_weights(net: torch.nn.Module, ckpt: dict, path: str) -> None:
    """net.load_state_dict(ckpt["model"]) (strict). Weights that don't fit the network its
    settings build (another preset, other modalities, a replaced file) are one line naming
    the file and the first mismatching keys, not torch's multi-line error."""
    own, state = net.state_dict(), ckpt["model"]
    # A buffer registered as None is not in state_dict(), but its module creates it when a
    # file has it: an input adapter's position table loaded with --init (model._InputAdapter).
    created = {f"{name}.{b}".lstrip(".") for name, module in net.named_modules()
               for b, v in module._buffers.items() if v is None}
    mismatch = {"missing": [k for k in own if k not in state],
                "unexpected": [k for k in state if k not in own and k not in created],
                "of another shape": [k for k in own if k in state and own[k].shape != state[k].shape]}
    found = [f"{len(keys)} {what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
             for what, keys in mismatch.items() if keys]
    if found:
        raise UserError(f"{path}: its weights do not fit the network its settings build ({'; '.join(found)})")
    net.load_state_dict(state)


def load_optimizer_state(optimizer, state: dict) -> None:
    """The checkpoint's hyperparameters and moments, this invocation's implementation:
    torch's load_state_dict also restores each group's "fused"/"foreach" flags, but --compile
    (which picks the fused kernel: util/runtime.Runtime.optimizer_options) is run-control,
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


def _check_plain(obj, where: str = "checkpoint") -> None:
    """Raise TypeError unless obj is what torch.load(weights_only=True) rebuilds without an
    allow-list: tensors, and dicts, lists and tuples of str, int, float, bool and None.
    Exact types: numpy's float64 is a float, but it pickles as numpy's."""
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif type(obj) not in (str, int, float, bool, type(None), torch.Tensor, torch.nn.Parameter):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}, not plain data: make it a "
                        f"str, number, list or dict before saving (checkpoints load with weights_only=True)")


def save_checkpoint(obj: dict, path: str) -> None:
    """Write a checkpoint atomically (util/cli.write_atomic); it must hold plain data only, so that
    load_checkpoint reads it back without an allow-list."""
    _check_plain(obj)
    # A file object, not a name: a full disk is then an OSError(ENOSPC) from f.write, which
    # torch.save's "[enforce fail at inline_container.cc] unexpected pos" keeps as its
    # context (write_atomic finds it there); given a name, torch.save loses it.
    write_atomic(path, lambda f: torch.save(obj, f))


def export_safetensors(ckpt: dict, path: str) -> list:
    """The checkpoint's weights as `path` (.safetensors: tensors only) and what they need to be
    used as json_path(path) (SHARED); together they load as a checkpoint (load_checkpoint).
    Returns the two paths."""
    from safetensors.torch import save
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt["model"].items()}
    meta = {k: ckpt[k] for k in SHARED if k in ckpt}
    write_atomic(path, lambda f: f.write(save(tensors)))
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items()) + "\n}\n"  # a key a line
    write_atomic(json_path(path), lambda f: f.write(text.encode()))
    return [path, json_path(path)]


# -----------------------------------------------------------------------------
# Third-party weights (--init)


def init_encoder(net: M.MultiViT, path: str) -> InitReport:
    """--init: read a ViT-B checkpoint (MultiMAE, MAE or timm; .pth or .safetensors), load it
    into net's encoder in place (util/vit_weights.py maps the keys), and print what was
    loaded, what stays random, what was ignored."""
    name = f"--init {path}"
    if not os.path.isfile(path):
        raise UserError(f"{name}: no such file")
    state = _load_tensors(path, name) if is_safetensors(path) else _torch_load(path, name)
    check_tensors(state, name, values=False)          # no crafted view is materialised by the mapping
    try:
        report = load_encoder_weights(net, state, check=lambda mapped: check_tensors(mapped, name))
    except ValueError as e:
        raise UserError(f"{name}: {e}") from None
    print(f"encoder initialised from {path}:")
    for line in report.summary():
        print(f"  {line}")
    return report
