"""tools/prepare_nyu.py — convert the official labelled NYU Depth V2 file into data/nyu.

  python tools/prepare_nyu.py --mat nyu_depth_v2_labeled.mat [--out data/nyu]

writes data/nyu/{train,test}/{rgb,depth,labels}/NNNN.png (the layout table in data.py): NNNN is the
official 1-based index of the image among the 1449 (so test/rgb/0001.png is image #1,
as in splits.mat); rgb 8-bit PNG; depth uint16 PNG in millimetres, rounded (0 =
missing; the filled `depths` by default, `--depth raw` for the Kinect's `rawDepths`
with its holes); labels uint8 0..39 (NYU-40 minus one), 255 = void. Every file is
written under a temporary name and renamed (cli.write_atomic), so an interrupted run, or
one stopped by a full disk (one line naming the file), can simply be run again: finished
images are skipped.

The official .mat is MATLAB v7.3 = HDF5, read with h5py. MATLAB stores arrays
column-major, so h5py sees the axes reversed: images N x 3 x 640 x 480 (uint8),
depths / rawDepths N x 640 x 480 (float32 metres), labels N x 640 x 480 (uint16 raw
ids 0..894, 0 = unlabelled); transposing the last axes gives 480 x 640.

The 894 → 40 mapping and the 795 / 654 split are small, so they are embedded below and
the user needs only the big .mat; --mapping classMapping40.mat and --splits splits.mat
read the official files instead (tests/test_data.py checks that both agree).
Sources: classMapping40.mat `mapClass` (Gupta et al., CVPR 2013) and splits.mat
(Silberman et al., ECCV 2012), as redistributed by github.com/ankurhanda/nyuv2-meta-data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from util.cli import UserError, arg, check_not_input, check_output, parse_config, run_cli, write_png
from data import default_root
from modalities import IGNORE_INDEX


# Character k is the NYU-40 class (1..40) of raw label k+1, one base-62 digit each
# ("0-9A-Za-z": "c" = 38 otherstructure, "d" = 39 otherfurniture, "e" = 40 otherprop).
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_NYU40_OF_RAW = (
    "ee3M5eCcee2deeQeOe7e1eeYcTe8eeeeceeEeceeeFdeUeededcecebecc9eeceBceeeeeeeeeeeeecD"
    "ee6eNedAGeeeeceeeeeeeeecedeeeedceeeeeeIeeJSXeeeeeeeeecRaeeeeLeKZeeeeeeeeceee4Wee"
    "dedeeeeeHeePedeeeeeeeedeeeeeeeeeeeeeeeeeeeedeeeeeeeeedcceededecdceeeeeeeeeedecee"
    "cceeeeeeeeeeeeeceeeeedeeeeeeeeeeeeeeedeeeeeeeeeeeedeeeceedeeceeeeeeeeeeedeeeeeee"
    "eeeeeeeeeeVeeeeeeeceecddeeeeeeeeecedeedeeeceeeeeeeecdeeeeeeceeeeeeeeeeecdeeeeeee"
    "deeeeeeceeecedeeeddeeeeeeeeeedeeeeeeeeeeeeddeeddeeeeceecddededceeeeeeeeeeedecede"
    "eeeeddeeeeeeddeecddeeeeeeeeeddeeeedeeeeedeedeeeeeeeeeeeeeeedceeeeeeedcdecdededee"
    "eeeeeeceeeeeceedeeedeceeeeeeeeceeeeeeeeeeeeeeeedceeceeceeeeeeeeedeeeeeeeeeeeeeee"
    "eceeceeeeeeeeeeeccceeeceeecceeeeeeeeeeeeeeeeeceeeeeeeeeeeeececdeeeeeeeeeeeeeeeee"
    "eeeeeeeeeeeeedeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeededeeeecceeeceeeeeeeeeeeeeedeed"
    "eeddeeeeeeeedddeeeedeeeeeeeedeeeeedeeeeeeeeeeeeeeceeeeeeedeecedeeeeceeeeeceeeeee"
    "edeeeeeeeeedee"
)
# Hex digits of a 1449-bit number: bit i is 1 when labelled image i+1 is a training image.
_NYU_TRAIN_BITS = (
    "fe1f0fc03e01807ffe67f0e3f030fff9f018800f03fe001c3ff8c1f07000f07f031981c0007f3803"
    "8fe101007003fffce67f9c7f8ff1f0f83ffe018c3ff8ff871f8ff1ffffffff8fc0f1c000ff8fc1f0"
    "7ff80000003fff3fc307ce01f8cc1e06073c79e7c0ffe0e783fc3f83f800038ff8e3c00207ffffff"
    "e00c1fff00f81fffc3ffe3c07ffff0033fff800fe31fc07fe03e3f7ffdffffffc7f03c000007023f"
    "f8fffec20f8ffffff80787ff827f980007ec1efc"
)
NYU_LABELLED = 1449

# Where the official file is, for the messages that need it.
WHERE = ('(2.8 GB: the "Labeled dataset" of https://cs.nyu.edu/~fergus/datasets/nyu_depth_v2.html; '
         'docs/guide.md, "Real data")')


def _loadmat(path: str, key: str) -> np.ndarray:
    import scipy.io
    try:
        mat = scipy.io.loadmat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as e:             # scipy raises several types for a non-.mat file
        raise UserError(f"{path}: cannot read the MATLAB file ({e})".splitlines()[0]) from None
    if key not in mat:
        raise UserError(f"{path}: no variable {key!r} (found {sorted(k for k in mat if not k.startswith('__'))})")
    return mat[key]


def nyu40_mapping(path: Optional[str] = None) -> np.ndarray:
    """uint8 [895]: raw NYU label id (0..894) → NYU-40 class (1..40), 0 (unlabelled) → 0.
    From classMapping40.mat (`mapClass`) when a path is given, else the embedded copy."""
    if path is None:
        nyu40 = np.array([_BASE62.index(c) for c in "".join(_NYU40_OF_RAW)], dtype=np.uint8)
    else:
        nyu40 = np.asarray(_loadmat(path, "mapClass")).ravel().astype(np.int64)
        if nyu40.size != 894 or nyu40.min() < 1 or nyu40.max() > 40:
            raise UserError(f"{path}: mapClass should hold 894 classes in 1..40, got {nyu40.size} "
                            f"in {nyu40.min()}..{nyu40.max()}")
    return np.concatenate([[0], nyu40]).astype(np.uint8)


def nyu_splits(path: Optional[str] = None) -> dict:
    """{"train": 795 indices, "test": 654 indices}, 1-based into the 1449 labelled images.
    From splits.mat (`trainNdxs`, `testNdxs`) when a path is given, else the embedded copy."""
    if path is None:
        bits = int("".join(_NYU_TRAIN_BITS), 16)
        train = [i + 1 for i in range(NYU_LABELLED) if bits >> i & 1]
        test = [i + 1 for i in range(NYU_LABELLED) if not bits >> i & 1]
        return {"train": np.array(train), "test": np.array(test)}
    out = {s: np.asarray(_loadmat(path, f"{s}Ndxs")).ravel().astype(np.int64) for s in ("train", "test")}
    if set(out["train"]) & set(out["test"]):
        raise UserError(f"{path}: trainNdxs and testNdxs share images")
    return out


def _save_png(array: np.ndarray, path: str) -> None:
    """Write a PNG (and its folder) whole or not at all."""
    image = Image.fromarray(array)
    write_png(path, image)


def _h5_dataset(f, path: str, key: str, ndim: int):
    if key not in f:
        raise UserError(f"{path}: no dataset {key!r}; is this nyu_depth_v2_labeled.mat? "
                        f"(found {sorted(f.keys())})")
    d = f[key]
    if d.ndim != ndim:
        raise UserError(f"{path}: dataset {key!r} has shape {d.shape}, expected {ndim} axes")
    return d


def prepare_nyu(mat: str, out: str = "data/nyu", splits: Optional[str] = None, mapping: Optional[str] = None,
                depth: str = "filled", progress: bool = True) -> dict:
    """Convert the official labelled NYU Depth V2 file (see the section comment). Returns
    {"written": n, "skipped": n}."""
    import h5py
    from tqdm import tqdm
    if depth not in ("filled", "raw"):
        raise UserError(f"--depth must be 'filled' or 'raw', got {depth!r}")
    lut = nyu40_mapping(mapping)
    split_idx = nyu_splits(splits)
    try:
        f = h5py.File(mat, "r")
    except FileNotFoundError:
        raise UserError(f"{mat}: file not found: download nyu_depth_v2_labeled.mat {WHERE}") from None
    except OSError as e:
        raise UserError(f"{mat}: not a MATLAB v7.3 / HDF5 file ({e})".splitlines()[0]) from None
    counts = {"written": 0, "skipped": 0}
    with f:
        images = _h5_dataset(f, mat, "images", 4)
        depths = _h5_dataset(f, mat, "depths" if depth == "filled" else "rawDepths", 3)
        labels = _h5_dataset(f, mat, "labels", 3)
        n = images.shape[0]
        if images.shape[1] != 3 or depths.shape != (n,) + images.shape[2:] or labels.shape != depths.shape:
            raise UserError(f"{mat}: inconsistent shapes images {images.shape}, depths {depths.shape}, "
                            f"labels {labels.shape} (expected N x 3 x W x H and N x W x H)")
        for split, idx in split_idx.items():
            if idx.size and (idx.min() < 1 or idx.max() > n):
                raise UserError(f"{splits or 'the embedded split'}: {split} index {int(idx.max())} is outside "
                                f"the {n} images of {mat}")
            folders = {k: os.path.join(out, split, k) for k in ("rgb", "depth", "labels")}
            for i in tqdm(idx, desc=f"prepare_nyu {split}", unit="img", disable=not progress):
                paths = {k: os.path.join(d, f"{int(i):04d}.png") for k, d in folders.items()}
                if all(os.path.exists(p) for p in paths.values()):
                    counts["skipped"] += 1
                    continue
                k = int(i) - 1
                rgb = np.ascontiguousarray(images[k].transpose(2, 1, 0))          # 3xWxH → HxWx3
                metres = np.asarray(depths[k], dtype=np.float64).T
                raw = np.asarray(labels[k]).T.astype(np.int64)
                if not np.isfinite(metres).all() or (metres < 0).any():
                    raise UserError(f"{mat}: image {int(i)} has NaN or negative depth")
                if raw.min() < 0 or raw.max() >= lut.size:
                    raise UserError(f"{mat}: image {int(i)} has raw label {raw.max()} outside 0..{lut.size - 1}")
                nyu40 = lut[raw]
                _save_png(rgb, paths["rgb"])
                _save_png(np.clip(np.round(metres * 1000.0), 0, 65535).astype(np.uint16), paths["depth"])
                _save_png(np.where(nyu40 == 0, IGNORE_INDEX, nyu40 - 1).astype(np.uint8), paths["labels"])
                counts["written"] += 1
    return counts


@dataclass
class PrepareConfig:
    """Convert nyu_depth_v2_labeled.mat into data/nyu (see the top of tools/prepare_nyu.py)."""
    mat: str = arg("", "the official nyu_depth_v2_labeled.mat (MATLAB v7.3); required")
    splits: str = arg("", "splits.mat ('': the official split, embedded here)")
    mapping: str = arg("", "classMapping40.mat ('': the official mapping, embedded here)")
    out: str = arg(default_root("nyu"), "output folder")
    depth: str = arg("filled", "the filled `depths` or the Kinect's `rawDepths` with holes", ("filled", "raw"))


def main(argv=None) -> dict:
    cfg, _ = parse_config(PrepareConfig, argv)
    if not cfg.mat:
        raise UserError(f"--mat is required: the official nyu_depth_v2_labeled.mat {WHERE}")
    check_not_input([("--out", cfg.out)], [(f"--{k}", getattr(cfg, k)) for k in ("mat", "splits", "mapping")])
    check_output(cfg.out, "--out")            # before reading 2.8 GB
    counts = prepare_nyu(cfg.mat, cfg.out, cfg.splits or None, cfg.mapping or None, cfg.depth)
    print(f"prepare_nyu: {counts['written']} images written, {counts['skipped']} already there, in {cfg.out}")
    return counts


if __name__ == "__main__":
    run_cli(main)
