"""util/rooms.py — the synthetic RGB-D rooms: the embedded default dataset (no download).

Each sample is a procedurally rendered room seen by a pinhole camera: an rgb image, a
depth map in metres with sensor noise and holes, and a class map. Scenes are a function
of (split, index) only, so every run, seed and machine sees the same images. The classes
are built so that rgb and depth are complementary, as in real RGB-D data (the table
below): some classes need rgb, some need depth, so missing a modality costs accuracy,
which is the situation MaskMentor is about.

This file only renders numpy arrays. data.py wraps them into the project's sample dict
(`data.SyntheticRooms`), with augmentation; nothing here knows about torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import numpy as np

from modalities import IGNORE_INDEX    # the void label, defined once

SYNTHETIC_CLASSES = ("floor", "wall", "ceiling", "rug", "poster", "pillar", "ball", "disc", "box", "table")

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
# The last column as data, for studies/reproduce.py's complementarity check: what segmenting the class
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
# All of this is at cues = 0, the default; `cues` > 0 lets some of it leak, as in real
# data ("Cross-modal cues" below).
#
# Sensor nuisances (after rendering): a lighting gradient across the image, Gaussian
# rgb noise quantised to 8 bits; depth noise growing as z² (Kinect-like, Khoshelham &
# Elberink 2012) and a few elliptical holes plus scattered dropouts set to 0 (missing).
# Class boundaries are void (255) for one pixel, on the nearer side of the edge (the
# decal's side where both are at the same depth), as PASCAL VOC marks object outlines.
#
# Cross-modal cues (`cues` in [0, 1], issue 16). The rooms above keep every cross-modal
# cue out. Real RGB-D is not that clean: rgb carries weak geometry cues, depth weak
# appearance cues, and the sensor's holes follow both. `cues` adds four, each scaled by
# the knob. cues = 0 skips them all and renders the rooms above bit for bit: the cues draw
# from a generator of their own (synthetic_cue_rng), never from the scene's, so a scene at
# cues 0.5 and 1 is also the same room with the same cues at two strengths. Each cue is
# linear in the knob (1 and 2 multiply, which adds a small cues² term: at 0.5 the rgb
# changes by 50.5% of its change at 1). Labels never change. Sizes at cues = 1, measured
# on 100 val scenes at 64x64 (rgb noise σ = 5/255):
#
#  1. Lambert shading on every surface (Lambert's cosine law: a matte surface looks
#     albedo · max(n·l, 0) bright under a light from direction l): rgb times
#     1 - cues · 0.45 · (1 - max(n·l, 0)), n the surface normal, l the scene's light_dir.
#     0.45 makes cues = 1 exactly the rule box and table have always been lit by (0.55
#     ambient + 0.45 direct), so the strongest setting is one consistent lighting, not a
#     new one. Median factors: floor 0.92, walls 0.70, ceiling 0.55 (it faces away from
#     the light); the pillar's front face gets the wall's (same normal) and its side faces
#     the side walls'; a ball spans 0.55-0.97 over its sphere where its disc is flat. The
#     images get darker: mean luminance 0.57 -> 0.41.
#  2. Contact shadows: ambient occlusion (Zhukov et al. 1998), a crease or a contact
#     sees less of the surrounding light. rgb times 1 - cues · 0.3 · occlusion, occlusion
#     in [0, 1] from the scene's distance field probed 5-40 cm out along the normal
#     (Evans 2006); 0.3: where two surfaces meet at a right angle each loses half of
#     the sky it sees, i.e. half of the ambient share 0.55 of cue 1. 19% of pixels
#     darken by more than 5%, 3% by more than 20%: room corners, the floor around boxes,
#     legs and pillars, the wall around a ball. With 1, the pillar differs from the wall
#     it hides by 10/255 on average (0 at cues = 0, 5/255 at 0.5), a ball from the same
#     disc by 15/255.
#  3. Decoration relief: a rug has a thickness, a picture frame stands off the wall, a
#     plate-like disc has a rim. The decal's surface is raised along its normal by cues ·
#     h, h uniform in RELIEF (rug 1-2 cm; poster frame 1-3 cm, its print halfway; disc
#     0.3-1 cm), so its depth comes nearer by cues · h / |n·d|, more at grazing views:
#     a rug by 2.8 cm on average (5-95%: 1.9-4.2 cm), a poster 1.5 cm, a disc 0.6 cm. The
#     depth noise is 0.6 cm at 2 m and 2.4 cm at 4 m, so the relief is faint.
#  4. Holes that follow appearance and geometry, as a structured-light sensor (Kinect v1)
#     loses depth: dark, low-albedo surfaces return too little of the projected infrared
#     pattern, and at a depth discontinuity the projector (7.5 cm beside the camera)
#     leaves a shadow on the far side and edge pixels mix fore- and background. Extra
#     holes with probability cues · min(0.6 · darkness + 0.5 · edge, 1): darkness ramps
#     from 0 at luminance 0.3 to 1 at 0.1; edge marks the far side of a depth jump of
#     more than 10% (dropout_propensity); 0.6 and 0.5 rather than 1 keep a hole a
#     tendency, not a detector of dark paint or of edges. 7.4% of pixels miss depth
#     instead of 1.5%: 65% of the darkest pixels (luminance < 0.1), 51% of far-side edge
#     pixels, no change elsewhere. The z² noise and the holes above stay as they are.
#
# diagnostics.cross_modal_predictability measures what this does per class before anything
# is trained.

FLOOR, WALL, CEILING, RUG, POSTER, PILLAR, BALL, DISC, BOX, TABLE = range(len(SYNTHETIC_CLASSES))
SYNTHETIC_SIZE = 64                       # default image side, pixels
# The validation split is for choices (recipes, settings); test is for reporting only. The
# pool is for pre-training a foundation to start from (results/regime/: the stand-in for
# weights trained on other data, as released MultiMAE weights are), never for evaluation.
SYNTHETIC_LENGTH = {"train": 2000, "val": 500, "test": 500, "pool": 8000}
_SYNTHETIC_SPLIT_KEY = {"train": 1, "test": 2, "val": 3, "pool": 4}   # different seed streams: no shared scene
_SYNTHETIC_BASE_SEED = 20240229
_HFOV = math.radians(60.0)                # about a Kinect's 58°
# The cross-modal cues' sizes at cues = 1 (header, "Cross-modal cues").
CUE_LAMBERT = 0.45                        # 1. shading 1 - 0.45 (1 - n.l): box and table's 0.55 + 0.45 n.l
CUE_CONTACT = 0.3                         # 2. a closed crease is 30% darker
AO_PROBES = (0.05, 0.1, 0.2, 0.4)         # 2. occlusion probes along the normal, metres: contact shadows ~40 cm wide
RELIEF = {"rug": (0.01, 0.02), "poster": (0.01, 0.03), "disc": (0.003, 0.01)}   # 3. metres, uniform
HOLE_DARK, DARK_LUMA = 0.6, 0.3           # 4. up to 60% holes on dark pixels (luminance below 0.3)
HOLE_EDGE, EDGE_JUMP = 0.5, 0.1           # 4. 50% holes behind a depth jump of more than 10%


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


def camera_rays(scene: Scene, size: int) -> list:
    """World directions of the pixels' rays, [d_x, d_y, d_z] flat [H*W] arrays, each with
    camera-z component 1 (so the ray parameter of a hit is its depth): the camera
    direction turned by the pitch, then by the yaw."""
    xs, ys, _, _ = _pixel_grid(size)
    cp, sp, cy, sy = math.cos(scene.pitch), math.sin(scene.pitch), math.cos(scene.yaw), math.sin(scene.yaw)
    dz0 = ys * sp + cp
    d = [xs * cy + dz0 * sy, ys * cp - sp, -xs * sy + dz0 * cy]
    for a in d:
        a[a == 0] = 1e-12                 # no ray exactly parallel to a plane
    return d


def render_scene(scene: Scene, size: int, cues: float = 0.0,
                 cue_rng: Optional[np.random.Generator] = None) -> dict:
    """Ray-cast a scene: clean (noise-free) maps, before any sensor nuisance.

    Returns rgb float [H, W, 3] in [0, 1], depth float [H, W] metres (camera z), label
    int64 [H, W] (no void yet). Each ray's direction has camera-z component 1, so the ray
    parameter t at a hit IS the depth a Kinect would report. Arrays are kept per
    coordinate ([N] each, not [N, 3]): numpy is much faster on long flat arrays.

    cues in [0, 1] adds the cross-modal cues (header, "Cross-modal cues") at that
    strength; their random draws (each decal's relief) come from `cue_rng` (default: a
    fixed generator), never from the scene's. Also returns surface_depth float [H, W]:
    the depth without the decorations' relief (depth itself at cues = 0).
    """
    if cues > 0 and cue_rng is None:
        cue_rng = np.random.default_rng(0)
    _, _, us, vs = _pixel_grid(size)
    n = size * size
    d = camera_rays(scene, size)
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
    # the class table above says rgb must not see it (pillar, ball). (cues > 0 shades the
    # rest too, below.)
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
    # Decals: paint only; depth stays that of the surface underneath (cues > 0: plus a
    # small relief, `height` metres along the surface normal, drawn per decal).
    height = np.zeros(n)
    if cues > 0:
        heights = [cue_rng.uniform(*RELIEF[decal[0]]) for decal in scene.decals]
    on_back = surf == 3
    for k, decal in enumerate(scene.decals):
        if decal[0] == "rug":
            _, x0, x1, z0, z1, a, b, axis_s, period = decal
            inside = on_floor & (p[0] >= x0) & (p[0] <= x1) & (p[2] >= z0) & (p[2] <= z1)
            stripe = (p[axis_s][inside] / period) % 1.0 < 0.5
            label[inside] = RUG
            albedo[inside] = np.where(stripe[:, None], a, b)
            if cues > 0:
                height[inside] = heights[k]
        elif decal[0] == "poster":
            _, x0, x1, y0, y1, frame, inner = decal
            inside = on_back & (p[0] >= x0) & (p[0] <= x1) & (p[1] >= y0) & (p[1] <= y1)
            m = 0.15 * min(x1 - x0, y1 - y0)
            px, py = p[0][inside], p[1][inside]
            core = (px >= x0 + m) & (px <= x1 - m) & (py >= y0 + m) & (py <= y1 - m)
            label[inside] = POSTER
            albedo[inside] = np.where(core[:, None], inner, frame)
            if cues > 0:                  # the print sits halfway down the frame's rebate
                height[inside] = np.where(core, 0.5, 1.0) * heights[k]
        else:
            _, cx, cy, r, rgb = decal
            inside = on_back & ((p[0] - cx) ** 2 + (p[1] - cy) ** 2 <= r * r)
            label[inside] = DISC
            albedo[inside] = rgb
            if cues > 0:
                height[inside] = heights[k]
    # Cross-modal cues (header, "Cross-modal cues"); cues == 0 skips them all, so the
    # scene renders exactly as without the knob.
    surface_depth = t_best                # the depth without relief, for the void boundaries
    if cues > 0:
        normal = _surface_normals(scene, surf, face, d, p)
        # 1. Lambert shading on every surface; box and table already have it at full strength.
        cos = np.clip(sum(normal[a] * scene.light_dir[a] for a in range(3)), 0.0, 1.0)
        lambert = np.where(shaded, 1.0, 1.0 - cues * CUE_LAMBERT * (1.0 - cos))
        # 2. Contact shadows: ambient occlusion from the nearby geometry.
        contact = 1.0 - cues * CUE_CONTACT * _occlusion(scene, p, normal, size)
        albedo *= (lambert * contact)[:, None]
        # 3. Relief: the decal's surface is raised by cues * height along its normal n, so
        # the ray (camera-z component 1) meets it cues * height / |n . d| metres sooner.
        on = np.flatnonzero(height)
        t_best = t_best.copy()            # surface_depth keeps the depth without relief
        t_best[on] -= cues * height[on] / np.abs(sum(normal[a][on] * d[a][on] for a in range(3)))
    # Lighting as a function of the image position only (a lamp off to one side).
    light = scene.light_gain * (1.0 + scene.light_gx * us + scene.light_gy * vs)
    rgb = np.clip(albedo * light[:, None], 0.0, 1.0)
    return {"rgb": rgb.reshape(size, size, 3), "depth": t_best.reshape(size, size),
            "label": label.reshape(size, size), "surface_depth": surface_depth.reshape(size, size)}


def _surface_normals(scene: Scene, surf: np.ndarray, face: np.ndarray, d: list, p: list) -> list:
    """Unit normal of the surface each ray hits, [n_x, n_y, n_z] flat arrays, facing the
    camera: -sign(d_a) along the hit face's axis a for the room and the cuboids, the
    radial direction for a sphere."""
    n_cub = len(scene.cuboids)
    axis = np.array([0, 1, 1, 2] + [0] * (n_cub + len(scene.spheres)))[surf]
    cuboid = (surf >= 4) & (surf < 4 + n_cub)
    axis[cuboid] = face[cuboid]
    normal = [np.where(axis == a, -np.sign(d[a]), 0.0) for a in range(3)]
    for s, (_, centre, radius, _) in enumerate(scene.spheres):
        on = surf == 4 + n_cub + s
        for a in range(3):
            normal[a][on] = (p[a][on] - centre[a]) / radius
    return normal


def _occlusion(scene: Scene, p: list, normal: list, size: int) -> np.ndarray:
    """Ambient occlusion in [0, 1] at each hit point, from the scene's distance field
    (Evans 2006; Quilez's "SDF ambient occlusion"): step AO_PROBES metres out along the
    normal; where the nearest surface is closer than the step, something blocks the sky
    hemisphere there. 0 on open surfaces (a convex surface never occludes itself: the
    probe is exactly `step` from it), 1 in a closed crease."""
    dist = []                             # per probe: distance from the probe to the nearest surface
    for step in AO_PROBES:
        q = [p[a] + step * normal[a] for a in range(3)]
        # inside the room box: distance to its nearest wall, floor or ceiling
        dist.append(np.minimum.reduce([q[a] - scene.room_lo[a] for a in range(3)]
                                      + [scene.room_hi[a] - q[a] for a in range(3)]))
    # An object can only occlude a hit point less than 2 * max(AO_PROBES) from it (a probe
    # is that far at most): find those points in the image box of the object grown by
    # that reach, then probe them only.
    reach = 2 * max(AO_PROBES)
    objects = ([("box", lo, hi) for _, lo, hi, _ in scene.cuboids]
               + [("sphere", c, r) for _, c, r, _ in scene.spheres])
    for obj in objects:
        lo, hi = (obj[1], obj[2]) if obj[0] == "box" else (obj[1] - obj[2], obj[1] + obj[2])
        idx = _cuboid_pixels(scene, lo - reach, hi + reach, size)
        idx = idx[_distance_to(obj, [p[a][idx] for a in range(3)]) < reach]
        for i, step in enumerate(AO_PROBES):
            q = [p[a][idx] + step * normal[a][idx] for a in range(3)]
            dist[i][idx] = np.minimum(dist[i][idx], _distance_to(obj, q))
    blocked = [np.clip(1.0 - dist_i / step, 0.0, 1.0) for dist_i, step in zip(dist, AO_PROBES)]
    return sum(blocked) / len(AO_PROBES)


def _distance_to(obj: tuple, q: list) -> np.ndarray:
    """Signed distance (negative inside) from points q ([x, y, z] arrays) to an object:
    ("box", lo, hi) or ("sphere", centre, radius)."""
    if obj[0] == "sphere":
        _, centre, radius = obj
        return np.sqrt(sum((q[a] - centre[a]) ** 2 for a in range(3))) - radius
    _, lo, hi = obj
    e = [np.abs(q[a] - 0.5 * (lo[a] + hi[a])) - 0.5 * (hi[a] - lo[a]) for a in range(3)]
    return (np.sqrt(sum(np.maximum(x, 0.0) ** 2 for x in e))
            + np.minimum(np.maximum(np.maximum(e[0], e[1]), e[2]), 0.0))


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


def add_sensor_nuisances(clean: dict, rng: np.random.Generator, cues: float = 0.0,
                         cue_rng: Optional[np.random.Generator] = None):
    """Camera and Kinect imperfections on a rendered scene. Returns (rgb uint8 [H, W, 3],
    depth float32 [H, W] metres with 0 = missing). cues > 0 adds holes that follow
    appearance and geometry (cue 4), drawn from `cue_rng` (default: a fixed generator)."""
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
    if cues > 0:                                                           # cue 4
        cue_rng = np.random.default_rng(0) if cue_rng is None else cue_rng
        missing |= cue_rng.uniform(size=z.shape) < cues * dropout_propensity(clean)
    depth = np.where(missing, 0.0, np.maximum(depth, 0.05)).astype(np.float32)
    return rgb, depth


def dropout_propensity(clean: dict) -> np.ndarray:
    """Cue 4's extra hole probability per pixel at cues = 1, float [H, W] in [0, 1]:
    HOLE_DARK * darkness + HOLE_EDGE * edge (at most 1), where darkness ramps from 0 at
    rgb luminance DARK_LUMA to 1 at DARK_LUMA - 0.2, and edge marks the far side of a
    depth jump: pixels within max(1, W // 64) pixels (about one pixel of a 64-pixel
    image's projector shadow, scaled with the image) of a neighbour in their row or
    column that is more than EDGE_JUMP (relative) nearer."""
    luma = clean["rgb"] @ np.array([0.299, 0.587, 0.114])                  # Rec. 601 luma
    darkness = np.clip((DARK_LUMA - luma) / 0.2, 0.0, 1.0)
    z = clean["depth"]
    edge = np.zeros(z.shape, dtype=bool)
    for k in range(1, max(1, z.shape[1] // 64) + 1):
        edge[:, k:] |= z[:, k:] > (1 + EDGE_JUMP) * z[:, :-k]             # nearer pixel on the left
        edge[:, :-k] |= z[:, :-k] > (1 + EDGE_JUMP) * z[:, k:]             # ... on the right
        edge[k:] |= z[k:] > (1 + EDGE_JUMP) * z[:-k]                       # ... above
        edge[:-k] |= z[:-k] > (1 + EDGE_JUMP) * z[k:]                      # ... below
    return np.minimum(HOLE_DARK * darkness + HOLE_EDGE * edge, 1.0)


@lru_cache(maxsize=8)
def _row_col(H: int, W: int):
    yy, xx = np.mgrid[0:H, 0:W]
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def synthetic_scene_rng(split: str, index: int) -> np.random.Generator:
    """The generator that draws scene `index` of `split`: different streams per split."""
    return np.random.default_rng([_SYNTHETIC_BASE_SEED, _SYNTHETIC_SPLIT_KEY[split], index])


def synthetic_cue_rng(split: str, index: int) -> np.random.Generator:
    """The generator of the cues' random draws for scene `index` of `split`: a stream of
    its own (the 7 keeps it apart from the scene's), so cues = 0 draws nothing from the
    scene's generator that it did not draw before, and every cue level > 0 gets the same
    draws: the same room, its cues at different strengths."""
    return np.random.default_rng([_SYNTHETIC_BASE_SEED, _SYNTHETIC_SPLIT_KEY[split], index, 7])


# Rendering one 64x64 scene takes ~2 ms, a third of a tiny training step (~6.5 ms with
# cues > 0, mostly the contact shadows' distance probes). studies/reproduce.py,
# which trains dozens of models on the same scenes in one process, sets this to {} so each
# scene is rendered once; None (the default) keeps no renders.
render_cache: Optional[dict] = None


def render_synthetic(split: str, index: int, size: int = SYNTHETIC_SIZE, cues: float = 0.0) -> tuple:
    """Sample `index` of `split` as numpy arrays: (rgb uint8 [H, W, 3], depth float32
    [H, W] metres, label int64 [H, W] with void boundaries). Read-only when cached.
    cues in [0, 1]: the strength of the cross-modal cues (header); 0 is the rooms as they
    always were, bit for bit; the labels are the same at every level."""
    cues = float(cues)
    if not 0.0 <= cues <= 1.0:
        raise ValueError(f"cues must be in [0, 1], got {cues}")
    key = (split, index, size, cues)
    if render_cache is not None and key in render_cache:
        return render_cache[key]
    out = render_with_clean(split, index, size, cues)[:3]
    if render_cache is not None:
        for a in out:
            a.setflags(write=False)
        render_cache[key] = out
    return out


def render_with_clean(split: str, index: int, size: int, cues: float) -> tuple:
    """(rgb, depth, label) as render_synthetic returns them (never cached), and the clean
    maps before the sensor's nuisances (render_scene's dict: what the cue probe,
    diagnostics.cross_modal_predictability, takes its targets from)."""
    rng = synthetic_scene_rng(split, index)
    cue_rng = synthetic_cue_rng(split, index)
    scene = sample_scene(rng)
    clean = render_scene(scene, size, cues, cue_rng)
    rgb, depth = add_sensor_nuisances(clean, rng, cues, cue_rng)
    # Void boundaries from the depth without relief: along a decal's outline neighbouring
    # pixels differ in depth by less than the relief, which would move the void pixel
    # across the outline, and the labels would depend on cues.
    return rgb, depth, boundary_void(clean["label"], clean["surface_depth"]), clean
