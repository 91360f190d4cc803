"""data.py — every image the project sees: the sample dict, the datasets, augmentation.

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
  common        constants, class names, palettes, the sample and its padding, collate,
                the dataset flags, build_dataset
  synthetic     the dataset of procedural RGB-D rooms (rendered by util/rooms.py): no
                download, the default of every CLI
  real data     NYU Depth V2 and SUN RGB-D in the layouts users already have
                (util/layouts.py: the table of every layout's files and encodings, the
                readers)
  augmentation  rescale / pad / crop / flip, jointly on every map of a sample

`python tools/prepare_nyu.py --mat nyu_depth_v2_labeled.mat` converts the official NYU file
into the layout read first.

Randomness: a dataset never touches the global RNG. Scenes of the synthetic dataset are
a function of (split, index); augmentation draws come from a generator seeded by
(seed, epoch, index) (`set_epoch`), so a resumed run sees the same images whatever the
number of DataLoader workers.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from modalities import IGNORE_INDEX, MODALITIES
from util import rooms
from util.cli import UserError
from util.layouts import (Layout, check_same_size, check_split_depth, detect_layout, read_depth, read_label,
                          read_rgb)

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
    them, and train.py / finetune.py before any work (util/runs.check_common_flags)."""
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
    [0, 1]: the synthetic rooms' cross-modal cues (util/rooms.py, "Cross-modal cues"); 0 = the
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
# Synthetic: the procedural rooms of util/rooms.py as a dataset


class SyntheticRooms(torch.utils.data.Dataset):
    """The procedural dataset: 2000 train / 500 val / 500 test scenes, rendered on the fly at
    image_size x image_size. Scenes depend only on (split, index) — `seed` drives the
    augmentation, as on real data, so runs with different seeds see the same dataset.
    train=True adds a random horizontal flip (scenes are already random). cues in [0, 1]:
    the strength of the cross-modal cues (util/rooms.py); the same scenes and labels at every
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
# Real data: NYU Depth V2 and SUN RGB-D, in the layouts users already have (util/layouts.py:
# the table of layouts and encodings, the readers)

DEFAULT_CROP = 224            # training crop of real images when image_size is not given
# Random rescale of real training images. The paper (§4.1) flips, crops and rescales "following
# [1]" (MultiMAE), whose NYU fine-tuning draws scales in 0.1-2.0 at 640x640; at the smaller
# crops used here we default to 0.5-2.0 (RealRGBD(scale_range=...) changes it).
SCALE_RANGE = (0.5, 2.0)


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


if __name__ == "__main__":       # a module, not a command: say so rather than exit 0 having done nothing
    import sys
    convert = "python tools/prepare_nyu.py --mat nyu_depth_v2_labeled.mat (docs/guide.md, \"Real data\")"
    if sys.argv[1:] in (["--help"], ["-h"]):
        print(f"usage: data.py is imported by train.py, finetune.py and evaluate.py, not run; the NYU converter "
              f"is {convert}; see its --help")
        sys.exit(0)
    print(f"error: data.py is a module, not a command: the NYU converter is {convert}", file=sys.stderr)
    sys.exit(2)
