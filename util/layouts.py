"""util/layouts.py — NYU Depth V2 and SUN RGB-D as users have them on disk: the file layouts
people's tools write, and the readers that turn their files into metres and class ids.

data.py's RealRGBD asks detect_layout for a split's files and reads each sample with
read_rgb / read_depth / read_label; evaluate.py reads single images with read_rgb and
read_depth_file. Every bad file is one line naming it (UserError): a missing file, an
unreadable image, depth in an encoding that cannot be metres, labels outside the classes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from modalities import IGNORE_INDEX
from util.cli import UserError

SPLITS = ("train", "test")          # what NYUv2 and SUN RGB-D come as

# data.build_dataset("nyu" | "sun", root) calls detect_layout, which looks at the folders
# under root and picks the layout that matches. These two tables are the one place that states each layout's
# files and encodings; inside the project depth is always metres with 0 = missing, and
# labels are 0..C-1 with 255 = void (docs/method.md §6).
#
#   layout      data  written by                                  files per split
#   maskmentor  nyu   python tools/prepare_nyu.py                 {train,test}/{rgb,depth,labels}/NNNN.png
#   multimae    nyu   MultiMAE tools/prepare_nyuv2.py             {train,test}/{rgb,depth,semseg}/data/NNNN.png
#   esanet      nyu   ESANet src/datasets/nyuv2/prepare_dataset   {train,test}/{rgb,depth,labels_40}/NNNN.png
#   cmx         both  the CMX, SA-Gate and DFormer releases       RGB/ Depth/ Label/ (or labels/), {train,test}.txt
#
#   layout      depth file                              → metres                    labels stored
#   maskmentor  uint16 PNG                              v / 1000 (millimetres)      0..39, 255 = void
#   multimae    uint16 PNG                              v / 6553.6 (2^16 per 10 m)  0..40, 0 = void: v - 1
#   esanet      uint16 PNG                              v / 1000 (millimetres)      0..40, 0 = void: v - 1
#   cmx, nyu    .npy float (SA-Gate) or uint16 PNG      as is, or v / 1000          0..40, 0 = void: v - 1
#   cmx, sun    uint16 PNG in SUN RGB-D's bit rotation  sun_depth_to_metres         0..37, 0 = void: v - 1
#
# NNNN is the image's official 1-based index for maskmentor and esanet, 0-based for
# multimae; the cmx split lists hold one sample per line, either a bare name ("12", CMX)
# or paths whose first field names the rgb file ("RGB/12.jpg<TAB>Label/12.png", SA-Gate,
# DFormer). 0 in any depth file means "no measurement" and stays 0.
#
# Refused, with a message saying why: 8-bit depth PNGs — DFormer's release made them with
# plt.imsave(..., cmap="Greys_r") from the metric .npy maps, which rescales every image
# to its own min..max, so metres cannot be recovered; SUN PNGs that do not carry SUN's
# bit rotation; and NYU depth beyond 15 m, which means another encoding than the
# layout's (e.g. Depth2HHA's metres x 10000 PNGs read as millimetres; the Kinect sees
# about 10 m).

NYU_MAX_DEPTH = 15.0          # metres; see above


@dataclass(frozen=True)
class Layout:
    """One way of storing a dataset on disk (a row of the table above)."""
    key: str                  # short name used in messages
    source: str               # who writes it
    depth: str                # "mm", "multimae", "npy_or_mm", "sun"
    void_zero: bool           # labels stored 0..C with 0 = void (shift by one) vs 0..C-1 / 255


MASKMENTOR = Layout("maskmentor", "python tools/prepare_nyu.py", "mm", False)
MULTIMAE = Layout("multimae", "MultiMAE tools/prepare_nyuv2.py", "multimae", True)
ESANET = Layout("esanet", "ESANet src/datasets/nyuv2/prepare_dataset.py", "mm", True)
CMX_NYU = Layout("cmx", "CMX / SA-Gate / DFormer (RGB/ Depth/ Label/ + train.txt)", "npy_or_mm", True)
CMX_SUN = Layout("cmx", "CMX / DFormer (RGB/ Depth/ Label/ + train.txt)", "sun", True)

# Sub-folders per split for the split-folder layouts: (layout, rgb, depth, label).
_SPLIT_FOLDER_LAYOUTS = (
    (MASKMENTOR, "rgb", "depth", "labels"),
    (MULTIMAE, "rgb/data", "depth/data", "semseg/data"),
    (ESANET, "rgb", "depth", "labels_40"),
)
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def sun_depth_to_metres(v: np.ndarray) -> np.ndarray:
    """SUN RGB-D's depth PNG encoding → metres (float32).

    The toolbox stores each 16-bit value with its bits rotated left by 3
    (SUN3D / SUNRGBD toolbox `depthRead`): millimetres = (v >> 3) | (v << 13), kept
    to 16 bits, then / 1000. 0 stays 0 (missing).
    """
    v = np.asarray(v).astype(np.uint32)
    mm = ((v >> 3) | (v << 13)) & 0xFFFF
    return (mm / 1000.0).astype(np.float32)


def metres_to_sun_depth(depth: np.ndarray) -> np.ndarray:
    """The inverse of sun_depth_to_metres (rounded to millimetres), for tests and tools."""
    mm = np.round(np.asarray(depth, dtype=np.float64) * 1000.0).astype(np.uint32)
    if mm.max(initial=0) > 0xFFFF:
        raise ValueError("depth beyond 65.535 m cannot be stored in 16 bits")
    return (((mm << 3) | (mm >> 13)) & 0xFFFF).astype(np.uint16)


def _open_image(path: str) -> Image.Image:
    """PIL image, fully decoded; an unreadable or truncated file is a UserError."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot read the image ({e})".splitlines()[0]) from None
    return img


def read_rgb(path: str) -> np.ndarray:
    """uint8 [H, W, 3]."""
    img = _open_image(path)
    if img.mode not in ("RGB", "L", "P", "RGBA", "CMYK", "YCbCr"):
        raise UserError(f"{path}: an rgb image must be 8-bit colour, got PIL mode {img.mode}")
    return np.asarray(img.convert("RGB"))


def _read_uint16(path: str) -> np.ndarray:
    """A 16-bit single-channel PNG as int64; 8-bit depth is refused (see the table)."""
    img = _open_image(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        v = np.asarray(img).astype(np.int64)
        if v.size and (v.min() < 0 or v.max() > 0xFFFF):
            raise UserError(f"{path}: depth values outside 0..65535 for a 16-bit PNG")
        return v
    if img.mode in ("L", "P", "RGB", "RGBA", "LA"):
        raise UserError(f"{path}: 8-bit depth image (PIL mode {img.mode}); it holds depth rescaled per image "
                        f"(e.g. DFormer's release), from which metres cannot be recovered: use 16-bit PNGs "
                        f"or .npy metres (see util/layouts.py)")
    raise UserError(f"{path}: unexpected depth image mode {img.mode}, expected a 16-bit PNG")


# Depth in the wrong unit decodes to numbers, not to an error: each image's median depth is
# checked against what an indoor RGB-D sensor sees (a Kinect: ~0.5-10 m; a room's median
# depth lies in 1-6 m, the lower bound here allows close-ups), and a split's median over a
# few images against the narrower room range. Outside them the file's unit is wrong; the
# ratio to a typical 2.5 m suggests which unit it is.
IMAGE_MEDIAN_RANGE = (0.25, 15.0)     # metres, one image
SPLIT_MEDIAN_RANGE = (1.0, 6.0)       # metres, the median of a split's image medians
UNIT_HINTS = ((1000.0, "millimetres where metres were expected"),
              (1e-3, "metres (whole numbers) where millimetres were expected"),
              (10.0, "metres x 10000 (e.g. Depth2HHA's PNGs) read as millimetres"),
              (1 / 6.5536, "millimetres read with MultiMAE's encoding (2^16 per 10 m)"),
              (6.5536, "MultiMAE's encoding (2^16 per 10 m) read as millimetres"))


def unit_hint(median: float) -> str:
    """Which wrong unit a median depth (metres, as decoded) most likely comes from."""
    ratio = median / 2.5
    factor, what = min(UNIT_HINTS, key=lambda h: abs(math.log(ratio / h[0])))
    return what if abs(math.log(ratio / factor)) < math.log(2.5) else "an unknown unit"


def check_depth_range(path: str, depth: np.ndarray) -> None:
    """One-line errors for a depth map (metres, 0 = missing) that has no measurement at all
    or whose median is not an indoor distance."""
    valid = depth[depth > 0]
    if valid.size == 0:
        raise UserError(f"{path}: every depth pixel is 0 (no measurement): the image has no depth; "
                        f"fix or remove it, or segment it from rgb alone")
    median = float(np.median(valid))
    lo, hi = IMAGE_MEDIAN_RANGE
    if not lo <= median <= hi:
        raise UserError(f"{path}: depth {float(valid.min()):.3g}..{float(valid.max()):.3g} m, median {median:.3g} m, "
                        f"is not an indoor range ({lo}-{hi} m median): likely {unit_hint(median)}")


def check_split_depth(root: str, split: str, layout: Layout, items: list, dataset: str, n: int = 8) -> None:
    """The median depth of a split (over n images spread across it, read when the dataset
    is built, before any work) must be a room's: catches a unit off by a small factor that
    each image alone would pass (MultiMAE's encoding read from millimetre PNGs: 6.55x)."""
    picks = items[:: max(1, len(items) // n)][:n]
    medians = []
    for item in picks:
        depth = read_depth(item.depth, layout, dataset)
        medians.append(float(np.median(depth[depth > 0])))
    median = float(np.median(medians))
    lo, hi = SPLIT_MEDIAN_RANGE
    if not lo <= median <= hi:
        raise UserError(f"{root}: the {split} split's median depth is {median:.3g} m over {len(picks)} images "
                        f"(rooms: {lo}-{hi} m) as the {layout.key} layout's encoding ({layout.depth}): "
                        f"likely {unit_hint(median)}")


def read_depth(path: str, layout: Layout, dataset: str) -> np.ndarray:
    """float32 [H, W] metres, 0 = missing, decoded as the layout table says."""
    if path.endswith(".npy"):
        try:
            depth = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise UserError(f"{path}: file not found") from None
        except (OSError, ValueError, EOFError) as e:
            raise UserError(f"{path}: cannot read the .npy depth ({e})".splitlines()[0]) from None
        if depth.ndim == 3 and depth.shape[-1] == 1:
            depth = depth[..., 0]
        if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
            raise UserError(f"{path}: expected a 2-D array of metres, got {depth.dtype} {depth.shape}")
        depth = depth.astype(np.float32)
    else:
        v = _read_uint16(path)
        if layout.depth in ("mm", "npy_or_mm"):          # millimetres ("npy_or_mm": its PNG case)
            depth = (v / 1000.0).astype(np.float32)
        elif layout.depth == "multimae":
            depth = (v / 6553.6).astype(np.float32)
        elif layout.depth == "sun":
            # In SUN's encoding every depth under 8.192 m has its low 3 bits zero; plain
            # millimetres use them ~7/8 of the time. Refuse rather than decode garbage.
            nonzero = v[v > 0]
            if nonzero.size and np.count_nonzero(nonzero & 7) > 0.5 * nonzero.size:
                raise UserError(f"{path}: not SUN RGB-D's bit-rotated depth encoding (the low 3 bits are in "
                                f"use: plain millimetres?); expected the toolbox's depth / depth_bfx PNGs")
            depth = sun_depth_to_metres(v)
        else:                                   # a Layout written with a code this function lacks
            raise ValueError(f"{path}: unknown depth encoding {layout.depth!r} of the {layout.key} layout")
    if not np.isfinite(depth).all():
        raise UserError(f"{path}: depth contains NaN or infinite values")
    if (depth < 0).any():
        raise UserError(f"{path}: depth contains negative values (min {depth.min():.3g})")
    check_depth_range(path, depth)
    if dataset == "nyu" and depth.size and depth.max() > NYU_MAX_DEPTH:
        raise UserError(f"{path}: depth up to {depth.max():.1f} m read as the {layout.key} layout's encoding "
                        f"({layout.depth}); NYU's Kinect sees at most ~10 m, so the file uses another encoding")
    return depth


def read_depth_file(path: str, metres_per_unit: float = 0.001) -> np.ndarray:
    """One depth image outside any dataset (evaluate.py's single-image mode): a .npy of
    metres, or a 16-bit PNG whose values times `metres_per_unit` are metres (0.001 for
    millimetres, the Kinect/NYU convention). float32 [H, W], 0 = missing."""
    if path.endswith(".npy"):
        return read_depth(path, MASKMENTOR, "synthetic")      # metres, checked for NaN / < 0 / range
    depth = (_read_uint16(path) * metres_per_unit).astype(np.float32)
    check_depth_range(path, depth)
    return depth


def read_label(path: str, layout: Layout, classes: int) -> np.ndarray:
    """int64 [H, W]: 0..classes-1, IGNORE_INDEX = void."""
    img = _open_image(path)
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise UserError(f"{path}: a label image must hold class ids (8/16-bit, one channel), "
                        f"got PIL mode {img.mode} (a colour rendering?)")
    v = np.asarray(img).astype(np.int64)
    if layout.void_zero:
        bad = v > classes
        label = np.where(v == 0, IGNORE_INDEX, v - 1)
        expected = f"0..{classes} (0 = void)"
    else:
        bad = (v >= classes) & (v != IGNORE_INDEX)
        label = v
        expected = f"0..{classes - 1} or {IGNORE_INDEX} (void)"
    if bad.any():
        found = np.unique(v[bad])
        raise UserError(f"{path}: label values {found[:5].tolist()}{'...' if len(found) > 5 else ''} "
                        f"outside the class set {expected}")
    return label


def check_same_size(rgb_path: str, rgb: np.ndarray, others: dict) -> None:
    """rgb [H, W, 3] and every {path: [H, W] map} must have the same H and W."""
    for path, other in others.items():
        if other.shape[:2] != rgb.shape[:2]:
            raise UserError(f"{path}: size {other.shape[1]}x{other.shape[0]} differs from the rgb image "
                            f"{rgb_path} ({rgb.shape[1]}x{rgb.shape[0]})")


@dataclass(frozen=True)
class Item:
    rgb: str
    depth: str
    label: str
    id: str


def _list_images(folder: str) -> dict:
    """{name without extension: file path} of the image files in a folder."""
    out = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if ext.lower() in _IMAGE_EXTS + (".npy",) and not f.startswith("."):
            out.setdefault(stem, os.path.join(folder, f))
    return out


def _split_folder_items(root: str, split: str, layout: Layout, sub: tuple) -> list:
    """Items of a layout with one folder per split and modality, matched by file name."""
    folders = [os.path.join(root, split, s) for s in sub]
    for folder in folders:
        if not os.path.isdir(folder):
            raise UserError(f"{folder}: folder missing ({layout.key} layout, written by {layout.source})")
    rgb, depth, label = (_list_images(f) for f in folders)
    if not rgb:
        raise UserError(f"{folders[0]}: no images")
    for folder, files in ((folders[1], depth), (folders[2], label)):
        missing = sorted(set(rgb) - set(files))
        if missing:
            raise UserError(f"{folder}: no file for {len(missing)} of the {len(rgb)} rgb images "
                            f"(first: {missing[0]})")
    return [Item(rgb[n], depth[n], label[n], os.path.relpath(rgb[n], root)) for n in rgb]


def _first_folder(root: str, names: tuple) -> Optional[str]:
    for n in names:
        if os.path.isdir(os.path.join(root, n)):
            return os.path.join(root, n)
    return None


def _list_file_items(root: str, split: str, layout: Layout) -> list:
    """Items of the CMX family: RGB/ Depth/ Label/ plus a split list naming the samples."""
    rgb_dir, depth_dir = os.path.join(root, "RGB"), os.path.join(root, "Depth")
    label_dir = _first_folder(root, ("Label", "labels", "label"))
    list_path = os.path.join(root, f"{split}.txt")
    if not os.path.isfile(list_path):
        raise UserError(f"{list_path}: split list missing ({layout.source})")
    rgb, depth, label = (_list_images(d) for d in (rgb_dir, depth_dir, label_dir))
    items = []
    with open(list_path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            name = os.path.splitext(os.path.basename(fields[0]))[0]
            for what, files, folder in (("rgb", rgb, rgb_dir), ("depth", depth, depth_dir),
                                        ("label", label, label_dir)):
                if name not in files:
                    raise UserError(f"{list_path}:{lineno}: names {name!r}, but {folder} has no {what} "
                                    f"file for it")
            items.append(Item(rgb[name], depth[name], label[name], os.path.relpath(rgb[name], root)))
    if not items:
        raise UserError(f"{list_path}: empty split list")
    return items


def detect_layout(name: str, root: str, split: str):
    """(layout, items) for the dataset under root, or a UserError that lists what was
    found and what each layout expects."""
    if not os.path.isdir(root):
        how = ("download nyu_depth_v2_labeled.mat (docs/guide.md, \"Real data\") and run `python "
               "tools/prepare_nyu.py --mat nyu_depth_v2_labeled.mat`" if name == "nyu"
               else "put SUN RGB-D there in the RGB/ Depth/ Label/ + train.txt/test.txt layout (see README)")
        raise UserError(f"{root} not found: {how}, or pass --data_root")
    if name == "nyu":
        # The label folder tells the split-folder layouts apart (rgb/ and depth/ are shared).
        for layout, *sub in _SPLIT_FOLDER_LAYOUTS:
            if os.path.isdir(os.path.join(root, split, sub[2])):
                return layout, _split_folder_items(root, split, layout, tuple(sub))
        for layout, *sub in _SPLIT_FOLDER_LAYOUTS:          # the layout is there, the split is not
            others = [s for s in SPLITS if s != split and os.path.isdir(os.path.join(root, s, sub[2]))]
            if others:
                raise UserError(f"{root}: the {layout.key} layout has no {split} split ({os.path.join(split, sub[2])}"
                                f"/ is missing; found {', '.join(o + '/' for o in others)} only)")
    if os.path.isdir(os.path.join(root, "RGB")) and os.path.isdir(os.path.join(root, "Depth")) and \
            _first_folder(root, ("Label", "labels", "label")):
        layout = CMX_NYU if name == "nyu" else CMX_SUN
        return layout, _list_file_items(root, split, layout)
    found = sorted(os.listdir(root))
    expected = ("{train,test}/{rgb,depth,labels}/ (tools/prepare_nyu.py), {train,test}/{rgb,depth,semseg}/data/ "
                "(MultiMAE), {train,test}/{rgb,depth,labels_40}/ (ESANet), or RGB/ Depth/ Label/ + "
                "train.txt test.txt (CMX)") if name == "nyu" else "RGB/ Depth/ Label/ + train.txt test.txt (CMX)"
    raise UserError(f"{root}: no known {name} layout; found {found[:12] or 'an empty folder'}, "
                    f"expected {expected}")
