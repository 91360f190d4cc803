"""data.py — every image the project sees: datasets, file layouts, augmentation, converters.

All datasets return the same sample dict (docs/method.md §6), which is all that the rest
of the project (modalities → masking → model → sttp → the scripts) ever sees: one map
per modality, keyed by its row of modalities.MODALITIES, all at the image's H x W, and
the sample's id:

    rgb     float32 [3, H, W]  normalised with RGB_MEAN / RGB_STD (ImageNet)
    depth   float32 [1, H, W]  metres, 0 = missing
    semseg  int64   [H, W]     class ids 0..C-1, IGNORE_INDEX (255) = void
    id      str                names the sample (a file, or "synthetic/train/17"), for
                               messages and pictures

A dataset's `maps(index)` gives the maps; everything after it (collate's padding,
center_crop, every augmentation) handles each map as its row says (`pad_value`,
`resample`), so a modality added to the table needs only a map there (README, "Adding a
modality").

Sections, top to bottom:
  common        UserError, constants, class names, palettes, the sample and its
                padding, collate, the dataset flags, build_dataset
  synthetic     the dataset of procedural RGB-D rooms (rendered by rooms.py): no
                download, the default of every CLI
  real data     NYU Depth V2 and SUN RGB-D in the layouts users already have; its two
                tables are the one place that states every layout's files and encodings
  augmentation  rescale / pad / crop / flip, jointly on every map of a sample

`python prepare_nyu.py --mat nyu_depth_v2_labeled.mat` (prepare_nyu.py) converts the
official NYU file into the layout this file reads first.

Randomness: a dataset never touches the global RNG. Scenes of the synthetic dataset are
a function of (split, index); augmentation draws come from a generator seeded by
(seed, epoch, index) (`set_epoch`), so a resumed run sees the same images whatever the
number of DataLoader workers.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import rooms
from cli import UserError
from modalities import IGNORE_INDEX, MODALITIES

# =============================================================================
# Common


# ImageNet statistics: the encoder is initialised from ImageNet ViT-B weights (docs/method.md §2).
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
DATASETS = ("synthetic", "nyu", "sun")
SPLITS = ("train", "val", "test", "pool")      # "val", "pool": synthetic only
SYNTHETIC_ONLY = {"val": "validation", "pool": "foundation pool"}

SYNTHETIC_CLASSES = rooms.SYNTHETIC_CLASSES
# NYU-40 (Gupta et al. 2013) in the official order of `className` in classMapping40.mat.
NYU40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop")
# SUN RGB-D's 37 classes are the first 37 of NYU-40, in the same order (Song et al. 2015).
SUN37_CLASSES = NYU40_CLASSES[:37]
CLASS_NAMES = {"synthetic": SYNTHETIC_CLASSES, "nyu": NYU40_CLASSES, "sun": SUN37_CLASSES}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def num_classes(name: str) -> int:
    _check_name(name)
    return len(CLASS_NAMES[name])


def palette(name: str) -> np.ndarray:
    """uint8 [C, 3]: one distinct colour per class, for pictures.

    The bit-interleaving scheme of the PASCAL VOC devkit: the bits of the class number are
    spread over the high bits of R, G and B, so neighbouring ids get very different colours.
    Entry 0 of that scheme is black, which we skip so that no class looks like padding.
    """
    n = num_classes(name)
    out = np.zeros((n, 3), dtype=np.uint8)
    for c in range(n):
        k, rgb = c + 1, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((k >> ch) & 1) << (7 - bit)
            k >>= 3
        out[c] = rgb
    return out


def conventions(name: str, image_size: int, cues: float = 0.0) -> dict:
    """What a checkpoint must record about the data it was trained on, so that inference on
    new images needs nothing repeated (evaluate.py reads it): the dataset and its classes,
    the training crop, how rgb was normalised and what unit depth was in."""
    return {"dataset": name, "classes": list(CLASS_NAMES[name]), "image_size": int(image_size),
            "rgb_mean": list(RGB_MEAN), "rgb_std": list(RGB_STD), "depth_unit": "metres",
            "depth_missing": 0.0, "depth_normalisation": "per image, modalities.standardize_depth",
            "ignore_index": IGNORE_INDEX, **({"cues": float(cues)} if name == "synthetic" else {})}


def default_root(name: str) -> Optional[str]:
    """Where the CLIs look for a dataset when --data_root is not given."""
    _check_name(name)
    return None if name == "synthetic" else f"data/{name}"


def normalize_rgb(rgb_uint8_hwc: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] → float32 [3, H, W], ImageNet-normalised."""
    a = np.ascontiguousarray(rgb_uint8_hwc)
    if not a.flags.writeable:              # PIL hands out read-only arrays; torch wants writable ones
        a = a.copy()
    x = torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(RGB_MEAN).view(3, 1, 1)
    std = torch.tensor(RGB_STD).view(3, 1, 1)
    return (x - mean) / std


def denormalize_rgb(rgb: torch.Tensor) -> np.ndarray:
    """float [3, H, W] normalised → uint8 [H, W, 3], for pictures."""
    rgb = rgb.detach().float().cpu()
    x = rgb * torch.tensor(RGB_STD).view(3, 1, 1) + torch.tensor(RGB_MEAN).view(3, 1, 1)
    return (x.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()


def make_sample(maps: dict, sample_id: str) -> dict:
    """The sample dict: `maps` ({modality: map}, rows of modalities.MODALITIES, images
    [C, H, W] and labels [H, W] of one size) and the sample's id."""
    size = next(iter(maps.values())).shape[-2:]
    for m, x in maps.items():
        if m not in MODALITIES:
            raise ValueError(f"{sample_id}: {m!r} is not a row of modalities.MODALITIES")
        if x.shape[-2:] != size:
            raise ValueError(f"{sample_id}: the {m} map is {tuple(x.shape)}, not at the image's H x W {tuple(size)}")
    return {**maps, "id": sample_id}


def modalities_of(sample: dict) -> list:
    """The names of a sample's maps, in its order (its other entries, like "id", are not maps)."""
    return [k for k in sample if k in MODALITIES]


def map_size(sample: dict) -> tuple:
    """(H, W) of a sample's maps."""
    return tuple(sample[modalities_of(sample)[0]].shape[-2:])


def pad_value(name: str):
    """What a map of modality `name` is padded with, from its row's kind: labels get
    IGNORE_INDEX, which every loss and metric ignores; images get 0, which is rgb's mean
    after normalisation and depth's "missing"."""
    return IGNORE_INDEX if MODALITIES[name].kind == "labels" else 0.0


def collate(samples: list) -> dict:
    """Stack a list of sample dicts into a batch. Images of different sizes (real test
    sets) are padded at the bottom/right to the largest H and W in the batch with each
    map's pad_value, so that padding is ignored by every loss and metric."""
    if not samples:
        raise ValueError("collate: empty batch")
    H = max(map_size(s)[0] for s in samples)
    W = max(map_size(s)[1] for s in samples)
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if not torch.is_tensor(values[0]):
            batch[key] = values
            continue
        if key in MODALITIES:
            values = [_pad_to(v, H, W, pad_value(key)) for v in values]
        batch[key] = torch.stack(values)
    return batch


def _pad_to(x: torch.Tensor, H: int, W: int, value) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (H, W):
        return x
    return torch.nn.functional.pad(x, (0, W - w, 0, H - h), value=value)


def center_crop(sample: dict, size: int) -> dict:
    """The central size x size window of a sample's maps (padded with their pad_value
    first if smaller), for pictures at the training size."""
    out = dict(sample)
    H, W = map_size(sample)
    y0, x0 = max(0, (H - size) // 2), max(0, (W - size) // 2)
    for m in modalities_of(sample):
        x = _pad_to(sample[m], max(H, size), max(W, size), pad_value(m))
        out[m] = x[..., y0:y0 + size, x0:x0 + size].contiguous()
    return out


def aug_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of one sample in one epoch: a function of (seed, epoch,
    index) only, so it does not matter which worker process draws it or in what order."""
    return np.random.default_rng([seed % 2**64, epoch % 2**64, index % 2**64])


def check_dataset_flags(name: str, root: Optional[str] = None, cues: float = 0.0) -> None:
    """The rules of --dataset, --data_root and --cues, one line each: build_dataset checks
    them, and train.py / finetune.py before any work (engine.check_common_flags)."""
    _check_name(name)
    SyntheticRooms.check_cues(cues)
    if cues != 0 and name != "synthetic":
        raise UserError(f"--cues applies to the synthetic rooms only, not {name}")
    if name == "synthetic" and root:
        raise UserError(f"--data_root {root}: the synthetic rooms are generated, not read; "
                        f"give --dataset nyu or sun to read a dataset folder")


def build_dataset(name: str, root: Optional[str] = None, split: str = "train", train: bool = False,
                  image_size: Optional[int] = None, seed: int = 0, augmentation: str = "finetune",
                  cues: float = 0.0) -> torch.utils.data.Dataset:
    """The dataset `name` ("synthetic", "nyu", "sun"), split "train" or "test" (or, for the
    synthetic rooms only, "val": the validation split, for choices made before looking at
    test; "pool": 8000 more scenes to pre-train a foundation on, results/regime/).

    train=True applies the training augmentation (synthetic: flip; real data: MultiMAE's
    for `augmentation` "finetune" (flip, rescale, crop to image_size) or "pretrain" (random
    resized crop, flip)); train=False returns unaugmented images (synthetic:
    rendered at image_size; real data: full size). `root` defaults to default_root(name);
    the layout under it is detected automatically (see the NYU / SUN sections). `cues` in
    [0, 1]: the synthetic rooms' cross-modal cues (rooms.py, "Cross-modal cues"); 0 = the
    rooms as they always were.
    """
    check_dataset_flags(name, root, cues)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if split in SYNTHETIC_ONLY and name != "synthetic":
        raise UserError(f"{name}: no {split!r} split: the {SYNTHETIC_ONLY[split]} split is the synthetic rooms' "
                        f"(NYUv2 and SUN RGB-D come as train and test only)")
    if name == "synthetic":
        return SyntheticRooms(split, train=train, image_size=image_size or rooms.SYNTHETIC_SIZE, seed=seed,
                              cues=cues)
    return build_real_dataset(name, root or default_root(name), split, train, image_size, seed, augmentation)


# =============================================================================
# Synthetic: the procedural rooms of rooms.py as a dataset


class SyntheticRooms(torch.utils.data.Dataset):
    """The procedural dataset: 2000 train / 500 val / 500 test scenes, rendered on the fly at
    image_size x image_size. Scenes depend only on (split, index) — `seed` drives the
    augmentation, as on real data, so runs with different seeds see the same dataset.
    train=True adds a random horizontal flip (scenes are already random). cues in [0, 1]:
    the strength of the cross-modal cues (rooms.py); the same scenes and labels at every
    level, 0 = the rooms as they always were."""

    def __init__(self, split: str = "train", train: bool = False, image_size: int = rooms.SYNTHETIC_SIZE,
                 seed: int = 0, length: Optional[int] = None, cues: float = 0.0):
        if split not in rooms.SYNTHETIC_LENGTH:
            raise UserError(f"synthetic: unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        if image_size < 8:
            raise UserError(f"synthetic: image_size must be at least 8, got {image_size}")
        self.check_cues(cues)
        self.split, self.train, self.size, self.seed = split, train, int(image_size), seed
        self.cues = float(cues)
        self.length = rooms.SYNTHETIC_LENGTH[split] if length is None else length
        self.epoch = 0

    @staticmethod
    def check_cues(cues: float) -> None:
        if not 0.0 <= cues <= 1.0:        # also refuses NaN
            raise UserError(f"--cues must be in [0, 1], got {cues}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def maps(self, index: int) -> dict:
        """Scene `index` unaugmented: {modality: map} (the module docstring's sample)."""
        rgb, depth, label = rooms.render_synthetic(self.split, index, self.size, self.cues)
        return {"rgb": normalize_rgb(rgb), "depth": torch.from_numpy(depth.copy())[None],
                "semseg": torch.from_numpy(label.copy())}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        maps = self.maps(index)
        if self.train and aug_rng(self.seed, self.epoch, index).uniform() < 0.5:
            maps = {m: x.flip(-1) for m, x in maps.items()}
        return make_sample(maps, f"synthetic/{self.split}/{index}")


# =============================================================================
# Real data: NYU Depth V2 and SUN RGB-D, in the layouts users already have
#
# `build_dataset("nyu" | "sun", root)` looks at the folders under root and picks the
# layout that matches. These two tables are the one place that states each layout's
# files and encodings; inside the project depth is always metres with 0 = missing, and
# labels are 0..C-1 with 255 = void (docs/method.md §6).
#
#   layout      data  written by                                  files per split
#   maskmentor  nyu   python prepare_nyu.py                       {train,test}/{rgb,depth,labels}/NNNN.png
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
DEFAULT_CROP = 224            # training crop of real images when image_size is not given
# Random rescale of real training images. The paper (§4.1) flips, crops and rescales "following
# [1]" (MultiMAE), whose NYU fine-tuning draws scales in 0.1-2.0 at 640x640; at the smaller
# crops used here we default to 0.5-2.0 (RealRGBD(scale_range=...) changes it).
SCALE_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class Layout:
    """One way of storing a dataset on disk (a row of the table above)."""
    key: str                  # short name used in messages
    source: str               # who writes it
    depth: str                # "mm", "multimae", "npy_or_mm", "sun"
    void_zero: bool           # labels stored 0..C with 0 = void (shift by one) vs 0..C-1 / 255


MASKMENTOR = Layout("maskmentor", "python prepare_nyu.py", "mm", False)
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
                        f"or .npy metres (see data.py, real data)")
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


class RealRGBD(torch.utils.data.Dataset):
    """A list of (rgb, depth, label) files in a known layout → sample dicts.

    train=False: the images at full size, unaugmented. train=True: the paper's
    augmentation, "following [1]" (§4.1), i.e. MultiMAE's for each stage:
    augmentation="finetune" (`augment`: random rescale, crop, flip) or "pretrain"
    (`augment_pretrain`: random resized crop, flip), drawn from aug_rng(seed, epoch, index).
    Files are checked for existence up front and decoded (and validated) when a sample is read.
    """

    def __init__(self, name: str, root: str, layout: Layout, items: list, train: bool = False,
                 image_size: Optional[int] = None, seed: int = 0, scale_range=SCALE_RANGE,
                 augmentation: str = "finetune"):
        if augmentation not in ("finetune", "pretrain"):
            raise ValueError(f"augmentation must be 'finetune' or 'pretrain', got {augmentation!r}")
        self.name, self.root, self.layout, self.items = name, root, layout, items
        self.train, self.seed, self.scale_range, self.augmentation = train, seed, scale_range, augmentation
        self.crop = int(image_size or DEFAULT_CROP)
        self.classes = num_classes(name)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def maps(self, index: int) -> dict:
        """Image `index` read, checked and unaugmented: {modality: map} (the module docstring's sample)."""
        item = self.items[index]
        rgb = read_rgb(item.rgb)
        depth = read_depth(item.depth, self.layout, self.name)
        label = read_label(item.label, self.layout, self.classes)
        check_same_size(item.rgb, rgb, {item.depth: depth, item.label: label})
        return {"rgb": normalize_rgb(rgb), "depth": torch.from_numpy(depth)[None], "semseg": torch.from_numpy(label)}

    def __getitem__(self, index: int) -> dict:
        sample = make_sample(self.maps(index), self.items[index].id)
        if self.train:
            rng = aug_rng(self.seed, self.epoch, index)
            if self.augmentation == "pretrain":
                sample = augment_pretrain(sample, rng, self.crop)
            else:
                sample = augment(sample, rng, self.crop, self.scale_range)
        return sample


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
        how = ("run `python prepare_nyu.py --mat nyu_depth_v2_labeled.mat` (see README)" if name == "nyu"
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
    expected = ("{train,test}/{rgb,depth,labels}/ (prepare_nyu.py), {train,test}/{rgb,depth,semseg}/data/ "
                "(MultiMAE), {train,test}/{rgb,depth,labels_40}/ (ESANet), or RGB/ Depth/ Label/ + "
                "train.txt test.txt (CMX)") if name == "nyu" else "RGB/ Depth/ Label/ + train.txt test.txt (CMX)"
    raise UserError(f"{root}: no known {name} layout; found {found[:12] or 'an empty folder'}, "
                    f"expected {expected}")


def build_real_dataset(name: str, root: str, split: str, train: bool, image_size: Optional[int],
                       seed: int, augmentation: str = "finetune") -> RealRGBD:
    layout, items = detect_layout(name, root, split)
    check_split_depth(root, split, layout, items, name)
    return RealRGBD(name, root, layout, items, train=train, image_size=image_size, seed=seed,
                    augmentation=augmentation)


# =============================================================================
# Augmentation (real data): rescale, pad, crop, flip — the same geometry on every map
#
# Each function makes its random draws first, always the same number in the same order
# from the sample's own generator, then applies one geometry to every map the sample has,
# resampled and padded as the map's row of modalities.MODALITIES says.


def resample(name: str, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A map of modality `name` (images [C, H, W], labels [H, W]) scaled to h x w as its
    row's `resample` says: "bilinear", antialiased when shrinking; or "nearest", which
    invents no value (no depth across an edge or a hole, 0 stays missing; labels stay
    ids). Nearest is "nearest-exact": it samples at pixel centres like bilinear does, so
    the maps stay aligned (plain "nearest" is off by up to half a pixel)."""
    labels = MODALITIES[name].kind == "labels"
    y = x[None, None] if labels else x[None]
    if MODALITIES[name].resample == "bilinear":
        y = torch.nn.functional.interpolate(y, (h, w), mode="bilinear", align_corners=False,
                                            antialias=h < x.shape[-2] or w < x.shape[-1])
    else:
        y = torch.nn.functional.interpolate(y.float(), (h, w), mode="nearest-exact").to(x.dtype)
    return y[0, 0] if labels else y[0]


def augment(sample: dict, rng: np.random.Generator, size: int, scale_range=SCALE_RANGE) -> dict:
    """The paper's fine-tuning augmentation (§4.1: random flip, crop, rescale), applied
    with the same geometry to every map of `sample` (rgb normalised, depth, labels...):

    1. rescale by s ~ U(scale_range) (`resample`);
    2. pad to at least size x size (bottom/right) with each map's pad_value;
    3. crop size x size at a uniform position; 4. flip horizontally with p = 0.5.
    The four draws are always made, in this order, so each sample uses a fixed number of
    draws from its own generator.
    """
    s = rng.uniform(*scale_range)
    flip = rng.uniform() < 0.5
    H, W = map_size(sample)
    h, w = max(1, round(H * s)), max(1, round(W * s))
    ph, pw = max(h, size), max(w, size)
    y0 = int(rng.integers(0, ph - size + 1))
    x0 = int(rng.integers(0, pw - size + 1))
    out = dict(sample)
    for m in modalities_of(sample):
        x = resample(m, sample[m], h, w) if (h, w) != (H, W) else sample[m]
        x = _pad_to(x, ph, pw, pad_value(m))[..., y0:y0 + size, x0:x0 + size]
        out[m] = (x.flip(-1) if flip else x).contiguous()
    return out


# MultiMAE pre-trains with torchvision's RandomResizedCrop(scale=(0.2, 1.0)) and a flip, and
# fine-tunes with rescale / pad / crop / flip (`augment`); the paper applies "random
# flipping, cropping, and rescaling following the approach described in [1]" (§4.1) to
# both stages, so each stage follows MultiMAE's own (decision D15 of docs/method.md).
PRETRAIN_SCALE = (0.2, 1.0)           # fraction of the image's area a crop covers
PRETRAIN_RATIO = (3 / 4, 4 / 3)       # its aspect ratio (width / height)


def augment_pretrain(sample: dict, rng: np.random.Generator, size: int, scale=PRETRAIN_SCALE,
                     ratio=PRETRAIN_RATIO) -> dict:
    """MultiMAE's pre-training augmentation, with the same geometry on every map of
    `sample`: a random crop of `scale` of the area and `ratio` aspect (torchvision's
    RandomResizedCrop: up to 10 tries, else the largest centred crop of an allowed
    aspect), resized to size x size (`resample`), then a flip with p = 0.5."""
    H, W = map_size(sample)
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            break
    else:
        aspect = min(max(W / H, ratio[0]), ratio[1])
        w, h = (W, round(W / aspect)) if W / H < aspect else (round(H * aspect), H)
        w, h = min(w, W), min(h, H)
        y0, x0 = (H - h) // 2, (W - w) // 2
    flip = rng.uniform() < 0.5
    out = dict(sample)
    for m in modalities_of(sample):
        x = resample(m, sample[m][..., y0:y0 + h, x0:x0 + w], size, size)
        out[m] = (x.flip(-1) if flip else x).contiguous()
    return out
