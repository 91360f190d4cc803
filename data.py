"""data.py — every image the project sees: datasets, file layouts, augmentation, converters.

All datasets return the same sample dict (SPEC.md §6), which is all that the rest of the
project (masking → model → sttp → the scripts, DESIGN.md) ever sees:

    rgb     float32 [3, H, W]  normalised with RGB_MEAN / RGB_STD (ImageNet)
    depth   float32 [1, H, W]  metres, 0 = missing
    semseg  int64   [H, W]     class ids 0..C-1, IGNORE_INDEX (255) = void
    id      str                names the sample (a file, or "synthetic/train/17"), for
                               messages and pictures

Sections, top to bottom:
  common        UserError, constants, class names, palettes, collate, build_dataset
  synthetic     procedural RGB-D rooms: no download, the default of every CLI; its
                class table says which classes rgb or depth alone can tell apart
  real data     NYU Depth V2 and SUN RGB-D in the layouts users already have; its two
                tables are the one place that states every layout's files and encodings
  augmentation  rescale / pad / crop / flip, jointly on the three maps
  prepare-nyu   `python data.py prepare-nyu --mat nyu_depth_v2_labeled.mat` converts the
                official file into data/nyu/{train,test}/{rgb,depth,labels}/NNNN.png

Randomness: a dataset never touches the global RNG. Scenes of the synthetic dataset are
a function of (split, index); augmentation draws come from a generator seeded by
(seed, epoch, index) (`set_epoch`), so a resumed run sees the same images whatever the
number of DataLoader workers.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# =============================================================================
# Common


class UserError(Exception):
    """A problem the user can fix (missing file, bad layout, bad flag...). str(e) is one
    line naming the file or flag and the problem; the CLIs print it without a traceback."""


IGNORE_INDEX = 255
# ImageNet statistics: the encoder is initialised from ImageNet ViT-B weights (SPEC.md §2).
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
DATASETS = ("synthetic", "nyu", "sun")

SYNTHETIC_CLASSES = ("floor", "wall", "ceiling", "rug", "poster", "pillar", "ball", "disc", "box", "table")
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


def make_sample(rgb: torch.Tensor, depth: torch.Tensor, semseg: torch.Tensor, sample_id: str) -> dict:
    return {"rgb": rgb, "depth": depth, "semseg": semseg, "id": sample_id}


# The value each map is padded with: rgb 0 is the dataset mean after normalisation,
# depth 0 means "missing", semseg 255 is ignored by the loss and the metrics.
PAD_VALUE = {"rgb": 0.0, "depth": 0.0, "semseg": IGNORE_INDEX}


def collate(samples: list) -> dict:
    """Stack a list of sample dicts into a batch. Images of different sizes (real test
    sets) are padded at the bottom/right to the largest H and W in the batch with
    PAD_VALUE, so that padding is ignored by every loss and metric."""
    if not samples:
        raise ValueError("collate: empty batch")
    H = max(s["semseg"].shape[-2] for s in samples)
    W = max(s["semseg"].shape[-1] for s in samples)
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if not torch.is_tensor(values[0]):
            batch[key] = values
            continue
        if key in PAD_VALUE:
            values = [_pad_to(v, H, W, PAD_VALUE[key]) for v in values]
        batch[key] = torch.stack(values)
    return batch


def _pad_to(x: torch.Tensor, H: int, W: int, value) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (H, W):
        return x
    return torch.nn.functional.pad(x, (0, W - w, 0, H - h), value=value)


def center_crop(sample: dict, size: int) -> dict:
    """The central size x size window of a sample's maps (padded with PAD_VALUE first if
    smaller), for pictures at the training size."""
    out = dict(sample)
    H, W = sample["semseg"].shape[-2:]
    y0, x0 = max(0, (H - size) // 2), max(0, (W - size) // 2)
    for key, value in PAD_VALUE.items():
        x = _pad_to(sample[key], max(H, size), max(W, size), value)
        out[key] = x[..., y0:y0 + size, x0:x0 + size].contiguous()
    return out


def aug_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of one sample in one epoch: a function of (seed, epoch,
    index) only, so it does not matter which worker process draws it or in what order."""
    return np.random.default_rng([seed % 2**64, epoch % 2**64, index % 2**64])


def build_dataset(name: str, root: Optional[str] = None, split: str = "train", train: bool = False,
                  image_size: Optional[int] = None, seed: int = 0) -> torch.utils.data.Dataset:
    """The dataset `name` ("synthetic", "nyu", "sun"), split "train" or "test".

    train=True applies the training augmentation (synthetic: flip; real data: flip,
    rescale, crop to image_size); train=False returns unaugmented images (synthetic:
    rendered at image_size; real data: full size). `root` defaults to default_root(name);
    the layout under it is detected automatically (see the NYU / SUN sections).
    """
    _check_name(name)
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}: choose 'train' or 'test'")
    if name == "synthetic":
        return SyntheticRooms(split, train=train, image_size=image_size or SYNTHETIC_SIZE, seed=seed)
    return build_real_dataset(name, root or default_root(name), split, train, image_size, seed)


# =============================================================================
# Synthetic: procedural RGB-D rooms
#
# A pinhole camera (60° field of view, 1.1-1.6 m high, pitched down 0-15°, yawed ±20°)
# looks into a box-shaped room; every pixel's ray is cast against the room and a few
# objects (vectorised numpy, no loops over pixels). Depth is the camera-z distance in
# metres, as a Kinect measures it: the floor's depth grows towards the horizon, the back
# wall is 2.5-6 m away, objects stand in front. The classes are built so that the two
# modalities are complementary, as in real RGB-D data:
#
#   class    what tells it apart                               modality needed
#   -------  ------------------------------------------------  ---------------------------
#   floor    horizontal plane, plank texture                   either
#   wall     vertical planes, flat colour                      either
#   ceiling  horizontal plane overhead, pale flat colour       either
#   rug      vs floor: colour + stripes only, same depth       rgb only (depth = floor)
#   poster   vs wall: colour + frame only, same depth          rgb only (depth = wall)
#   pillar   vs wall: painted exactly like the wall            depth only (rgb = wall)
#   ball     vs disc: sphere bulging out of the wall           depth only (rgb = disc's)
#   disc     vs ball: flat decal on the wall                   depth only (rgb = ball's)
#   box      coloured shaded cuboid on the floor               both
#   table    wooden slab on four legs                          both
#
# The last column as data, for reproduce.py's complementarity check: what segmenting the class
# from ONE modality can rely on. The disc needs both: rgb to see it on the wall (depth shows
# only the wall), depth to tell it from a ball (rgb shows a ball's colours).
SYNTHETIC_CUE = {"floor": "either", "wall": "either", "ceiling": "either", "rug": "rgb", "poster": "rgb",
                 "pillar": "depth", "ball": "depth", "disc": "both", "box": "both", "table": "both"}
#
# Ball and disc draw their colour, size and position on the back wall from the same
# distributions and are both flat-shaded, so their rgb is identically distributed; only
# the ball's relief (a bulge of 0.4-1 m) shows in depth. The pillar and the walls share
# one flat albedo and lighting depends on the image position only, so the pillar's colour
# equals the wall's at every pixel (rgb sees only its outline where it hides the floor,
# the ceiling or an object). Rug and poster are paint on the floor and wall planes.
# tests/test_data.py checks each of these claims by editing a scene and re-rendering it.
#
# Sensor nuisances (after rendering): a lighting gradient across the image, Gaussian
# rgb noise quantised to 8 bits; depth noise growing as z² (Kinect-like, Khoshelham &
# Elberink 2012) and a few elliptical holes plus scattered dropouts set to 0 (missing).
# Class boundaries are void (255) for one pixel, on the nearer side of the edge (the
# decal's side where both are at the same depth), as PASCAL VOC marks object outlines.

FLOOR, WALL, CEILING, RUG, POSTER, PILLAR, BALL, DISC, BOX, TABLE = range(len(SYNTHETIC_CLASSES))
SYNTHETIC_SIZE = 64                       # default image side, pixels
SYNTHETIC_LENGTH = {"train": 2000, "test": 500}
_SYNTHETIC_SPLIT_KEY = {"train": 1, "test": 2}   # different seed streams: no shared scene
_SYNTHETIC_BASE_SEED = 20240229
_HFOV = math.radians(60.0)                # about a Kinect's 58°


@dataclass
class Scene:
    """Everything needed to render one synthetic image: camera, room, objects, colours.

    Colours are rgb in [0, 1]. Cuboids are axis-aligned [lo, hi] in world metres
    (x right, y up, z forward from the camera's foot); the camera stands at (0, cam_h, 0).
    """
    cam_h: float
    pitch: float                          # radians, positive = looking down
    yaw: float                            # radians, positive = turned right
    room_lo: np.ndarray                   # (x_left, 0, z_behind)
    room_hi: np.ndarray                   # (x_right, ceiling height, back wall z)
    wall_rgb: np.ndarray
    ceiling_rgb: np.ndarray
    floor_rgb: np.ndarray
    plank_axis: int                       # 0 = planks along z (seams vary in x), 2 = along x
    plank_width: float
    light_dir: np.ndarray                 # for the shaded classes (box, table)
    light_gain: float                     # image-space lighting: gain * (1 + gx u + gy v)
    light_gx: float
    light_gy: float
    cuboids: list = field(default_factory=list)   # (class, lo, hi, rgb)
    spheres: list = field(default_factory=list)   # (class, centre, radius, rgb)
    # decals: flat paint on a surface, no depth of their own.
    # ("rug", x0, x1, z0, z1, rgb_a, rgb_b, stripe_axis, period) on the floor;
    # ("poster", x0, x1, y0, y1, rgb_frame, rgb_inner) and ("disc", cx, cy, r, rgb) on the back wall
    decals: list = field(default_factory=list)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (h in turns) → rgb float [3]."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _object_colour(rng) -> np.ndarray:
    """The shared colour distribution of balls and discs (saturated, any hue)."""
    return _hsv(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a random room with its objects."""
    u = rng.uniform
    back = u(2.5, 6.0)
    scene = Scene(
        cam_h=u(1.1, 1.6), pitch=math.radians(u(0.0, 15.0)), yaw=math.radians(u(-20.0, 20.0)),
        room_lo=np.array([-u(1.2, 3.0), 0.0, -1.0]), room_hi=np.array([u(1.2, 3.0), u(2.5, 3.0), back]),
        wall_rgb=_hsv(u(), u(0.0, 0.35), u(0.5, 0.9)),
        ceiling_rgb=_hsv(u(), u(0.0, 0.08), u(0.8, 0.97)),
        floor_rgb=_hsv(u(0.03, 0.12), u(0.0, 0.6), u(0.25, 0.7)),
        plank_axis=2 * int(rng.integers(2)), plank_width=u(0.12, 0.3),
        light_dir=_unit(np.array([u(-0.5, 0.5), 1.0, -u(0.2, 1.0)])),
        light_gain=u(0.8, 1.15), light_gx=u(-0.4, 0.4), light_gy=u(-0.4, 0.4))
    x_left, x_right = scene.room_lo[0], scene.room_hi[0]
    ceiling = scene.room_hi[1]

    def x_at(z, half_width):
        """An x so that an object of this half width at depth z is mostly in the room and
        roughly in view (the view half-width at depth z is z * tan(30°))."""
        reach = min(z * math.tan(_HFOV / 2), 3.0)
        lo = max(x_left + half_width, -reach)
        hi = min(x_right - half_width, reach)
        return u(lo, hi) if hi > lo else 0.5 * (x_left + x_right)

    # Rug (rgb only): a striped rectangle painted on the floor.
    if u() < 0.7:
        w, d = u(0.8, 2.0), u(0.6, 1.6)
        z0 = u(1.3, max(1.4, back - d - 0.2))
        x0 = x_at(z0 + d / 2, w / 2) - w / 2
        a = _hsv(u(), u(0.3, 0.9), u(0.3, 0.9))
        b = _hsv(u(), u(0.3, 0.9), u(0.3, 0.9))
        scene.decals.append(("rug", x0, x0 + w, z0, z0 + d, a, b, 2 * int(rng.integers(2)), u(0.1, 0.3)))
    # Posters (rgb only): framed rectangles painted on the back wall.
    for _ in range(rng.integers(0, 3)):
        w, h = u(0.5, 1.4), u(0.5, 1.1)
        cx, cy = x_at(back, w / 2), u(1.0, min(2.2, ceiling - h / 2 - 0.05))
        scene.decals.append(("poster", cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2,
                             _hsv(u(), u(0.0, 1.0), u(0.1, 1.0)), _hsv(u(), u(0.0, 1.0), u(0.1, 1.0))))
    # Balls and discs (depth only between them): same colour / size / height distributions.
    # The disc's world radius is scaled by back / (back - r) so that its image is as large
    # as a ball of radius r touching the wall, whose nearest point is at back - 2r.
    for _ in range(rng.integers(1, 4)):
        r = u(0.2, 0.5)
        cx, cy = x_at(back, r), u(0.8, min(2.0, ceiling - r))
        if u() < 0.5:
            scene.spheres.append((BALL, np.array([cx, cy, back - r]), r, _object_colour(rng)))
        else:
            scene.decals.append(("disc", cx, cy, r * back / (back - r), _object_colour(rng)))
    # Pillar (depth only): floor-to-ceiling cuboid, painted like the wall, in front of it.
    if u() < 0.6:
        w, d = u(0.3, 0.6), u(0.3, 0.6)
        z = back - u(0.3, 1.5) - d
        x = x_at(z, w / 2)
        scene.cuboids.append((PILLAR, np.array([x - w / 2, 0.0, z]), np.array([x + w / 2, ceiling, z + d]),
                              scene.wall_rgb))
    # Boxes (both): coloured cuboids on the floor.
    for _ in range(rng.integers(1, 4)):
        w, h, d = u(0.3, 0.8), u(0.25, 0.8), u(0.3, 0.8)
        z = u(1.3, max(1.4, back - d - 0.1))
        x = x_at(z, w / 2)
        scene.cuboids.append((BOX, np.array([x - w / 2, 0.0, z]), np.array([x + w / 2, h, z + d]),
                              _hsv(u(), u(0.2, 0.8), u(0.35, 0.9))))
    # Table (both): a wooden top on four legs.
    if u() < 0.7:
        w, d, top, leg = u(0.8, 1.6), u(0.6, 1.0), u(0.65, 0.8), 0.06
        z = u(1.5, max(1.6, back - d - 0.2))
        x = x_at(z, w / 2)
        wood = _hsv(u(0.04, 0.1), u(0.4, 0.7), u(0.25, 0.6))
        x0, x1, z1 = x - w / 2, x + w / 2, z + d
        scene.cuboids.append((TABLE, np.array([x0, top - 0.05, z]), np.array([x1, top, z1]), wood))
        for lx, lz in ((x0, z), (x1 - leg, z), (x0, z1 - leg), (x1 - leg, z1 - leg)):
            scene.cuboids.append((TABLE, np.array([lx, 0.0, lz]),
                                  np.array([lx + leg, top - 0.05, lz + leg]), wood))
    return scene


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@lru_cache(maxsize=8)
def _pixel_grid(size: int):
    """Camera-frame ray directions through the pixel centres (x right, y up, z = 1) and
    the pixel centres in [-0.5, 0.5] (u right, v down) for image-space lighting; flat
    [H*W] arrays, read-only, cached per size."""
    f = size / 2.0 / math.tan(_HFOV / 2)
    c = np.arange(size) + 0.5 - size / 2.0
    xs, ys = (a.ravel() for a in np.meshgrid(c / f, -c / f))
    us, vs = (a.ravel() for a in np.meshgrid(c / size, c / size))
    for a in (xs, ys, us, vs):
        a.setflags(write=False)
    return xs, ys, us, vs


def render_scene(scene: Scene, size: int) -> dict:
    """Ray-cast a scene: clean (noise-free) maps, before any sensor nuisance.

    Returns rgb float [H, W, 3] in [0, 1], depth float [H, W] metres (camera z), label
    int64 [H, W] (no void yet). Each ray's direction has camera-z component 1, so the ray
    parameter t at a hit IS the depth a Kinect would report. Arrays are kept per
    coordinate ([N] each, not [N, 3]): numpy is much faster on long flat arrays.
    """
    xs, ys, us, vs = _pixel_grid(size)
    n = size * size
    # World direction = yaw(pitch(camera direction)); origin o = the camera.
    cp, sp, cy, sy = math.cos(scene.pitch), math.sin(scene.pitch), math.cos(scene.yaw), math.sin(scene.yaw)
    dz0 = ys * sp + cp
    d = [xs * cy + dz0 * sy, ys * cp - sp, -xs * sy + dz0 * cy]
    for a in d:
        a[a == 0] = 1e-12                 # no ray exactly parallel to a plane
    inv = [1.0 / a for a in d]
    o = (0.0, scene.cam_h, 0.0)

    # The room: each ray leaves the room box through the surface it sees.
    t_axis = [np.where(d[a] > 0, scene.room_hi[a] - o[a], scene.room_lo[a] - o[a]) * inv[a] for a in range(3)]
    t_best = np.minimum(np.minimum(t_axis[0], t_axis[1]), t_axis[2])
    # surface ids: 0 side wall, 1 floor, 2 ceiling, 3 back wall, then 4 + k for object k
    surf = np.where(t_axis[0] == t_best, 0, np.where(t_axis[2] == t_best, 3, np.where(d[1] < 0, 1, 2)))
    face = np.zeros(n, dtype=np.int64)    # axis of the hit face's normal (for shading)

    # Cuboids (slab method), each tested only on the pixels inside its projected bounding
    # box: most of the image never sees a given object, and this keeps 64x64 under 2 ms.
    for k, (_, lo, hi, _) in enumerate(scene.cuboids):
        idx = _cuboid_pixels(scene, lo, hi, size)
        if idx.size == 0:
            continue
        t_in, far = [], np.inf
        for a in range(3):
            t1 = (lo[a] - o[a]) * inv[a][idx]
            t2 = (hi[a] - o[a]) * inv[a][idx]
            t_in.append(np.minimum(t1, t2))
            far = np.minimum(far, np.maximum(t1, t2))
        near = np.maximum(np.maximum(t_in[0], t_in[1]), t_in[2])
        hit = (far >= near) & (near > 0) & (near < t_best[idx])
        idx, near = idx[hit], near[hit]
        t_best[idx] = near
        surf[idx] = 4 + k
        face[idx] = np.where(t_in[0][hit] == near, 0, np.where(t_in[1][hit] == near, 1, 2))
    # Spheres: |o + t d - c|^2 = r^2, nearer root.
    a2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    for s, (_, centre, radius, _) in enumerate(scene.spheres):
        oc = [o[i] - centre[i] for i in range(3)]
        b = d[0] * oc[0] + d[1] * oc[1] + d[2] * oc[2]
        disc = b * b - a2 * (oc[0] ** 2 + oc[1] ** 2 + oc[2] ** 2 - radius * radius)
        hit = disc >= 0
        t_s = np.full(n, np.inf)
        t_s[hit] = (-b[hit] - np.sqrt(disc[hit])) / a2[hit]
        closer = (t_s > 0) & (t_s < t_best)
        t_best = np.where(closer, t_s, t_best)
        surf = np.where(closer, 4 + len(scene.cuboids) + s, surf)

    p = [o[a] + t_best * d[a] for a in range(3)]       # hit points, world metres
    # Per-surface class and albedo, gathered from small tables by surface id.
    classes = np.array([WALL, FLOOR, CEILING, WALL] + [c[0] for c in scene.cuboids]
                       + [s[0] for s in scene.spheres], dtype=np.int64)
    albedo_table = np.stack([scene.wall_rgb, scene.floor_rgb, scene.ceiling_rgb, scene.wall_rgb]
                            + [c[3] for c in scene.cuboids] + [s[3] for s in scene.spheres])
    label = classes[surf]
    albedo = albedo_table[surf]
    # Lambert shading for the classes that are told apart by shape in rgb too (box, table);
    # everything else is flat-shaded, so that shading never leaks geometry into rgb where
    # the class table above says rgb must not see it (pillar, ball).
    shaded = (label == BOX) | (label == TABLE)
    if shaded.any():
        f = face[shaded]
        d_face = np.choose(f, [d[0][shaded], d[1][shaded], d[2][shaded]])
        cos = -np.sign(d_face) * scene.light_dir[f]    # the face's normal points at the camera
        albedo[shaded] *= (0.55 + 0.45 * np.clip(cos, 0, 1))[:, None]
    # Floor planks: darker seams every plank_width metres.
    on_floor = surf == 1
    seam = on_floor & (np.abs((p[scene.plank_axis] / scene.plank_width) % 1.0 - 0.5) > 0.45)
    albedo[seam] *= 0.75
    # Decals: paint only; depth stays that of the surface underneath.
    on_back = surf == 3
    for decal in scene.decals:
        if decal[0] == "rug":
            _, x0, x1, z0, z1, a, b, axis_s, period = decal
            inside = on_floor & (p[0] >= x0) & (p[0] <= x1) & (p[2] >= z0) & (p[2] <= z1)
            stripe = (p[axis_s][inside] / period) % 1.0 < 0.5
            label[inside] = RUG
            albedo[inside] = np.where(stripe[:, None], a, b)
        elif decal[0] == "poster":
            _, x0, x1, y0, y1, frame, inner = decal
            inside = on_back & (p[0] >= x0) & (p[0] <= x1) & (p[1] >= y0) & (p[1] <= y1)
            m = 0.15 * min(x1 - x0, y1 - y0)
            px, py = p[0][inside], p[1][inside]
            core = (px >= x0 + m) & (px <= x1 - m) & (py >= y0 + m) & (py <= y1 - m)
            label[inside] = POSTER
            albedo[inside] = np.where(core[:, None], inner, frame)
        else:
            _, cx, cy, r, rgb = decal
            inside = on_back & ((p[0] - cx) ** 2 + (p[1] - cy) ** 2 <= r * r)
            label[inside] = DISC
            albedo[inside] = rgb
    # Lighting as a function of the image position only (a lamp off to one side).
    light = scene.light_gain * (1.0 + scene.light_gx * us + scene.light_gy * vs)
    rgb = np.clip(albedo * light[:, None], 0.0, 1.0)
    return {"rgb": rgb.reshape(size, size, 3), "depth": t_best.reshape(size, size),
            "label": label.reshape(size, size)}


def _cuboid_pixels(scene: Scene, lo: np.ndarray, hi: np.ndarray, size: int) -> np.ndarray:
    """Flat indices of the pixels inside the image bounding box of a cuboid's projection
    (all pixels when a corner is behind the camera)."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    rel = corners - np.array([0.0, scene.cam_h, 0.0])
    # camera coordinates = pitch^-1(yaw^-1(world)), the inverse of render_scene's rotation.
    cy, sy, cp, sp = math.cos(scene.yaw), math.sin(scene.yaw), math.cos(scene.pitch), math.sin(scene.pitch)
    x1 = rel[:, 0] * cy - rel[:, 2] * sy
    z1 = rel[:, 0] * sy + rel[:, 2] * cy
    y = rel[:, 1] * cp + z1 * sp
    z = -rel[:, 1] * sp + z1 * cp
    if (z <= 1e-3).any():
        return np.arange(size * size)
    f = size / 2.0 / math.tan(_HFOV / 2)
    u = f * x1 / z + size / 2.0
    v = -f * y / z + size / 2.0
    c0, c1 = max(int(u.min()) - 1, 0), min(int(math.ceil(u.max())) + 1, size)
    r0, r1 = max(int(v.min()) - 1, 0), min(int(math.ceil(v.max())) + 1, size)
    if c0 >= c1 or r0 >= r1:
        return np.zeros(0, dtype=np.int64)
    return (np.arange(r0, r1)[:, None] * size + np.arange(c0, c1)[None, :]).ravel()


def boundary_void(label: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Copy of `label` with class boundaries set to IGNORE_INDEX, one pixel wide.

    For every pair of 4-neighbours with different classes exactly one pixel is marked:
    the nearer one (the occluding object's outline); at equal depth (a decal on its
    surface, the wall meeting the floor) the one with the larger class id.
    """
    out = label.copy()
    void = np.zeros(label.shape, dtype=bool)
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        la, lb, da, db = label[tuple(a)], label[tuple(b)], depth[tuple(a)], depth[tuple(b)]
        differ = la != lb
        a_marked = (da < db) | ((da == db) & (la > lb))
        void[tuple(a)] |= differ & a_marked
        void[tuple(b)] |= differ & ~a_marked
    out[void] = IGNORE_INDEX
    return out


def add_sensor_nuisances(clean: dict, rng: np.random.Generator):
    """Camera and Kinect imperfections on a rendered scene. Returns (rgb uint8 [H, W, 3],
    depth float32 [H, W] metres with 0 = missing)."""
    H, W = clean["depth"].shape
    rgb = clean["rgb"] + rng.normal(0.0, 0.02, size=(H, W, 3))
    rgb = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    z = clean["depth"]
    depth = z + rng.normal(0.0, 1.0, size=z.shape) * (0.0015 * z * z)     # σ grows as z²
    missing = rng.uniform(size=z.shape) < 0.003                            # scattered dropouts
    yy, xx = _row_col(H, W)
    for _ in range(rng.integers(0, 4)):                                    # holes
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        ry, rx = rng.uniform(0.02, 0.08) * H, rng.uniform(0.02, 0.08) * W
        missing |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    depth = np.where(missing, 0.0, np.maximum(depth, 0.05)).astype(np.float32)
    return rgb, depth


@lru_cache(maxsize=8)
def _row_col(H: int, W: int):
    yy, xx = np.mgrid[0:H, 0:W]
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def synthetic_scene_rng(split: str, index: int) -> np.random.Generator:
    """The generator that draws scene `index` of `split`: different streams per split."""
    return np.random.default_rng([_SYNTHETIC_BASE_SEED, _SYNTHETIC_SPLIT_KEY[split], index])


# Rendering one 64x64 scene takes ~2 ms, a third of a tiny training step. reproduce.py,
# which trains dozens of models on the same scenes in one process, sets this to {} so each
# scene is rendered once; None (the default) keeps no renders.
render_cache: Optional[dict] = None


def render_synthetic(split: str, index: int, size: int = SYNTHETIC_SIZE) -> tuple:
    """Sample `index` of `split` as numpy arrays: (rgb uint8 [H, W, 3], depth float32
    [H, W] metres, label int64 [H, W] with void boundaries). Read-only when cached."""
    key = (split, index, size)
    if render_cache is not None and key in render_cache:
        return render_cache[key]
    rng = synthetic_scene_rng(split, index)
    scene = sample_scene(rng)
    clean = render_scene(scene, size)
    rgb, depth = add_sensor_nuisances(clean, rng)
    out = (rgb, depth, boundary_void(clean["label"], clean["depth"]))
    if render_cache is not None:
        for a in out:
            a.setflags(write=False)
        render_cache[key] = out
    return out


class SyntheticRooms(torch.utils.data.Dataset):
    """The procedural dataset: 2000 train / 500 test scenes, rendered on the fly at
    image_size x image_size. Scenes depend only on (split, index) — `seed` drives the
    augmentation, as on real data, so runs with different seeds see the same dataset.
    train=True adds a random horizontal flip (scenes are already random)."""

    def __init__(self, split: str = "train", train: bool = False, image_size: int = SYNTHETIC_SIZE,
                 seed: int = 0, length: Optional[int] = None):
        if split not in SYNTHETIC_LENGTH:
            raise UserError(f"synthetic: unknown split {split!r}: choose 'train' or 'test'")
        if image_size < 8:
            raise UserError(f"synthetic: image_size must be at least 8, got {image_size}")
        self.split, self.train, self.size, self.seed = split, train, int(image_size), seed
        self.length = SYNTHETIC_LENGTH[split] if length is None else length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rgb, depth, label = render_synthetic(self.split, index, self.size)
        if self.train and aug_rng(self.seed, self.epoch, index).uniform() < 0.5:
            rgb, depth, label = rgb[:, ::-1], depth[:, ::-1], label[:, ::-1]
        return make_sample(normalize_rgb(rgb), torch.from_numpy(depth.copy())[None],
                           torch.from_numpy(label.copy()), f"synthetic/{self.split}/{index}")


# =============================================================================
# Real data: NYU Depth V2 and SUN RGB-D, in the layouts users already have
#
# `build_dataset("nyu" | "sun", root)` looks at the folders under root and picks the
# layout that matches. These two tables are the one place that states each layout's
# files and encodings; inside the project depth is always metres with 0 = missing, and
# labels are 0..C-1 with 255 = void (SPEC.md §6).
#
#   layout      data  written by                                  files per split
#   maskmentor  nyu   python data.py prepare-nyu (end of file)    {train,test}/{rgb,depth,labels}/NNNN.png
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


MASKMENTOR = Layout("maskmentor", "python data.py prepare-nyu", "mm", False)
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
        if layout.depth == "sun":
            # In SUN's encoding every depth under 8.192 m has its low 3 bits zero; plain
            # millimetres use them ~7/8 of the time. Refuse rather than decode garbage.
            nonzero = v[v > 0]
            if nonzero.size and np.count_nonzero(nonzero & 7) > 0.5 * nonzero.size:
                raise UserError(f"{path}: not SUN RGB-D's bit-rotated depth encoding (the low 3 bits are in "
                                f"use: plain millimetres?); expected the toolbox's depth / depth_bfx PNGs")
            depth = sun_depth_to_metres(v)
        elif layout.depth == "multimae":
            depth = (v / 6553.6).astype(np.float32)
        else:                                   # "mm" and the PNG case of "npy_or_mm"
            depth = (v / 1000.0).astype(np.float32)
    if not np.isfinite(depth).all():
        raise UserError(f"{path}: depth contains NaN or infinite values")
    if (depth < 0).any():
        raise UserError(f"{path}: depth contains negative values (min {depth.min():.3g})")
    if dataset == "nyu" and depth.size and depth.max() > NYU_MAX_DEPTH:
        raise UserError(f"{path}: depth up to {depth.max():.1f} m read as the {layout.key} layout's encoding "
                        f"({layout.depth}); NYU's Kinect sees at most ~10 m, so the file uses another encoding")
    return depth


def read_depth_file(path: str, metres_per_unit: float = 0.001) -> np.ndarray:
    """One depth image outside any dataset (evaluate.py's single-image mode): a .npy of
    metres, or a 16-bit PNG whose values times `metres_per_unit` are metres (0.001 for
    millimetres, the Kinect/NYU convention). float32 [H, W], 0 = missing."""
    if path.endswith(".npy"):
        return read_depth(path, MASKMENTOR, "synthetic")      # metres, checked for NaN / < 0
    return (_read_uint16(path) * metres_per_unit).astype(np.float32)


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
    augmentation (§4.1: random flip, crop, rescale; `augment`), drawn from
    aug_rng(seed, epoch, index). Files are checked for existence up front and decoded
    (and validated) when a sample is read.
    """

    def __init__(self, name: str, root: str, layout: Layout, items: list, train: bool = False,
                 image_size: Optional[int] = None, seed: int = 0, scale_range=SCALE_RANGE):
        self.name, self.root, self.layout, self.items = name, root, layout, items
        self.train, self.seed, self.scale_range = train, seed, scale_range
        self.crop = int(image_size or DEFAULT_CROP)
        self.classes = num_classes(name)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        rgb = read_rgb(item.rgb)
        depth = read_depth(item.depth, self.layout, self.name)
        label = read_label(item.label, self.layout, self.classes)
        check_same_size(item.rgb, rgb, {item.depth: depth, item.label: label})
        rgb_t = normalize_rgb(rgb)
        depth_t = torch.from_numpy(depth)[None]
        label_t = torch.from_numpy(label)
        if self.train:
            rgb_t, depth_t, label_t = augment(rgb_t, depth_t, label_t, aug_rng(self.seed, self.epoch, index),
                                              self.crop, self.scale_range)
        return make_sample(rgb_t, depth_t, label_t, item.id)


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
        how = ("run `python data.py prepare-nyu --mat nyu_depth_v2_labeled.mat` (see README)" if name == "nyu"
               else "put SUN RGB-D there in the RGB/ Depth/ Label/ + train.txt/test.txt layout (see README)")
        raise UserError(f"{root} not found: {how}, or pass --data_root")
    if name == "nyu":
        # The label folder tells the split-folder layouts apart (rgb/ and depth/ are shared).
        for layout, *sub in _SPLIT_FOLDER_LAYOUTS:
            if os.path.isdir(os.path.join(root, split, sub[2])):
                return layout, _split_folder_items(root, split, layout, tuple(sub))
    if os.path.isdir(os.path.join(root, "RGB")) and os.path.isdir(os.path.join(root, "Depth")) and \
            _first_folder(root, ("Label", "labels", "label")):
        layout = CMX_NYU if name == "nyu" else CMX_SUN
        return layout, _list_file_items(root, split, layout)
    found = sorted(os.listdir(root))
    expected = ("{train,test}/{rgb,depth,labels}/ (prepare-nyu), {train,test}/{rgb,depth,semseg}/data/ "
                "(MultiMAE), {train,test}/{rgb,depth,labels_40}/ (ESANet), or RGB/ Depth/ Label/ + "
                "train.txt test.txt (CMX)") if name == "nyu" else "RGB/ Depth/ Label/ + train.txt test.txt (CMX)"
    raise UserError(f"{root}: no known {name} layout; found {found[:12] or 'an empty folder'}, "
                    f"expected {expected}")


def build_real_dataset(name: str, root: str, split: str, train: bool, image_size: Optional[int],
                       seed: int) -> RealRGBD:
    layout, items = detect_layout(name, root, split)
    return RealRGBD(name, root, layout, items, train=train, image_size=image_size, seed=seed)


# =============================================================================
# Augmentation (real data): rescale, pad, crop, flip — jointly on the three maps


def augment(rgb: torch.Tensor, depth: torch.Tensor, label: torch.Tensor, rng: np.random.Generator,
            size: int, scale_range=SCALE_RANGE):
    """The paper's fine-tuning augmentation (§4.1: random flip, crop, rescale), applied
    with the same geometry to rgb [3,H,W] (normalised), depth [1,H,W] and label [H,W].

    1. rescale by s ~ U(scale_range): rgb bilinear; depth and labels nearest, so that no
       depth is invented across an edge or a hole (0 stays missing) and labels stay ids;
    2. pad to at least size x size (bottom/right): rgb 0 (the mean after normalisation),
       depth 0 (missing), label IGNORE_INDEX;
    3. crop size x size at a uniform position; 4. flip horizontally with p = 0.5.
    The four draws are always made, in this order, so each sample uses a fixed number of
    draws from its own generator.
    """
    s = rng.uniform(*scale_range)
    flip = rng.uniform() < 0.5
    H, W = label.shape
    h, w = max(1, round(H * s)), max(1, round(W * s))
    if (h, w) != (H, W):
        # "nearest-exact" samples at pixel centres like bilinear does, so the three maps
        # stay aligned (plain "nearest" is off by up to half a pixel).
        rgb = torch.nn.functional.interpolate(rgb[None], (h, w), mode="bilinear", align_corners=False,
                                              antialias=s < 1)[0]
        depth = torch.nn.functional.interpolate(depth[None], (h, w), mode="nearest-exact")[0]
        label = torch.nn.functional.interpolate(label[None, None].float(), (h, w),
                                                mode="nearest-exact")[0, 0].long()
    ph, pw = max(h, size), max(w, size)
    rgb = _pad_to(rgb, ph, pw, PAD_VALUE["rgb"])
    depth = _pad_to(depth, ph, pw, PAD_VALUE["depth"])
    label = _pad_to(label, ph, pw, PAD_VALUE["semseg"])
    y0 = int(rng.integers(0, ph - size + 1))
    x0 = int(rng.integers(0, pw - size + 1))
    crop = (slice(y0, y0 + size), slice(x0, x0 + size))
    rgb, depth, label = rgb[(slice(None),) + crop], depth[(slice(None),) + crop], label[crop]
    if flip:
        rgb, depth, label = rgb.flip(-1), depth.flip(-1), label.flip(-1)
    return rgb.contiguous(), depth.contiguous(), label.contiguous()


# =============================================================================
# prepare-nyu: the official labelled .mat → the maskmentor layout
#
#   python data.py prepare-nyu --mat nyu_depth_v2_labeled.mat [--out data/nyu]
#
# writes data/nyu/{train,test}/{rgb,depth,labels}/NNNN.png (table above): NNNN is the
# official 1-based index of the image among the 1449 (so test/rgb/0001.png is image #1,
# as in splits.mat); rgb 8-bit PNG; depth uint16 PNG in millimetres, rounded (0 =
# missing; the filled `depths` by default, `--depth raw` for the Kinect's `rawDepths`
# with its holes); labels uint8 0..39 (NYU-40 minus one), 255 = void. Every file is
# written under a temporary name and renamed, so an interrupted run can simply be run
# again: finished images are skipped.
#
# The official .mat is MATLAB v7.3 = HDF5, read with h5py. MATLAB stores arrays
# column-major, so h5py sees the axes reversed: images N x 3 x 640 x 480 (uint8),
# depths / rawDepths N x 640 x 480 (float32 metres), labels N x 640 x 480 (uint16 raw
# ids 0..894, 0 = unlabelled); transposing the last axes gives 480 x 640.
#
# The 894 → 40 mapping and the 795 / 654 split are small, so they are embedded below and
# the user needs only the big .mat; --mapping classMapping40.mat and --splits splits.mat
# read the official files instead (tests/test_data.py checks that both agree).
# Sources: classMapping40.mat `mapClass` (Gupta et al., CVPR 2013) and splits.mat
# (Silberman et al., ECCV 2012), as redistributed by github.com/ankurhanda/nyuv2-meta-data.

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
    """Write a PNG under a temporary name, then rename: never half a file at `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


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
        raise UserError(f"{mat}: file not found (download nyu_depth_v2_labeled.mat, see README)") from None
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
            for folder in folders.values():
                os.makedirs(folder, exist_ok=True)
            for i in tqdm(idx, desc=f"prepare-nyu {split}", unit="img", disable=not progress):
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):                       # one line, like the other CLIs
        raise UserError(f"{self.prog}: {message} (see --help)")


def main(argv=None) -> None:
    parser = _Parser(prog="data.py", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("prepare-nyu", help="convert nyu_depth_v2_labeled.mat into data/nyu (see data.py)")
    p.add_argument("--mat", required=True, help="the official nyu_depth_v2_labeled.mat (MATLAB v7.3)")
    p.add_argument("--splits", default=None, help="splits.mat (default: the official split, embedded)")
    p.add_argument("--mapping", default=None, help="classMapping40.mat (default: the official mapping, embedded)")
    p.add_argument("--out", default=default_root("nyu"), help="output folder (default: data/nyu)")
    p.add_argument("--depth", default="filled", choices=("filled", "raw"),
                   help="the filled `depths` (default) or the Kinect's `rawDepths` with holes")
    args = parser.parse_args(argv)
    counts = prepare_nyu(args.mat, args.out, args.splits, args.mapping, args.depth)
    print(f"prepare-nyu: {counts['written']} images written, {counts['skipped']} already there, in {args.out}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
