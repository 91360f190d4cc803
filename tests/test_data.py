"""data.py: the sample contract, the synthetic rooms (and their claimed complementarity
between rgb and depth), collate / augmentation, and the real-data readers and converter
on small real NYU files (tests/data/, see tests/data/ATTRIBUTION.md)."""
import copy
import dataclasses
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import data
from util import layouts
from tools import prepare_nyu
from util import rooms
from conftest import ROOT, fill_the_disk, fixture_path, make_esanet, one_line_error, real_sample, save, save_palette

# --- common --------------------------------------------------------------------------


def check_sample(s, num_classes, size=None):
    """The sample contract every dataset honours (data.py docstring)."""
    assert set(s) >= {"rgb", "depth", "semseg", "id"} and isinstance(s["id"], str)
    rgb, depth, semseg = s["rgb"], s["depth"], s["semseg"]
    H, W = semseg.shape
    assert rgb.shape == (3, H, W) and rgb.dtype == torch.float32
    assert depth.shape == (1, H, W) and depth.dtype == torch.float32
    assert semseg.dtype == torch.int64
    if size is not None:
        assert (H, W) == size
    assert torch.isfinite(rgb).all() and torch.isfinite(depth).all() and (depth >= 0).all()
    values = set(semseg.unique().tolist())
    assert values <= set(range(num_classes)) | {data.IGNORE_INDEX}, values


def test_class_tables_and_palettes():
    assert data.DATASETS == ("synthetic", "nyu", "sun")
    assert data.num_classes("nyu") == 40 and data.num_classes("sun") == 37
    assert 8 <= data.num_classes("synthetic") <= 10
    assert data.CLASS_NAMES["nyu"][:3] == ("wall", "floor", "cabinet")
    assert data.CLASS_NAMES["nyu"][-1] == "otherprop" and data.CLASS_NAMES["sun"][-1] == "bag"
    for name in data.DATASETS:
        p = data.palette(name)
        assert p.shape == (data.num_classes(name), 3) and p.dtype == np.uint8
        assert len({tuple(c) for c in p}) == len(p)              # distinct
        assert not (p == 0).all(axis=1).any()                     # no black (that is padding)
        assert len(set(data.CLASS_NAMES[name])) == len(data.CLASS_NAMES[name])
    assert data.default_root("nyu") == "data/nyu" and data.default_root("sun") == "data/sun"
    assert not data.default_root("synthetic")
    with pytest.raises(data.UserError, match="unknown dataset"):
        data.build_dataset("cityscapes")
    with pytest.raises(data.UserError, match="split"):
        data.build_dataset("synthetic", split="dev")
    with pytest.raises(data.UserError, match="no 'val' split"):     # validation: the synthetic rooms only
        data.build_dataset("nyu", split="val")


def test_denormalize_inverts_normalize():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = data.normalize_rgb(img)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    assert np.array_equal(data.denormalize_rgb(x), img)


def test_collate_pads_to_the_largest_image():
    def sample(h, w):
        return data.make_sample({"rgb": torch.ones(3, h, w), "depth": torch.ones(1, h, w),
                                 "semseg": torch.ones(h, w, dtype=torch.int64)}, f"{h}x{w}")
    b = data.collate([sample(4, 6), sample(5, 3)])
    assert b["rgb"].shape == (2, 3, 5, 6) and b["depth"].shape == (2, 1, 5, 6) and b["semseg"].shape == (2, 5, 6)
    assert b["id"] == ["4x6", "5x3"]
    assert (b["rgb"][0, :, 4] == 0).all() and (b["depth"][1, :, :, 3:] == 0).all()
    assert (b["semseg"][0, 4] == 255).all() and (b["semseg"][1, :, 3:] == 255).all()
    assert (b["semseg"][1, :, :3] == 1).all()


# --- synthetic -----------------------------------------------------------------------

C = data.num_classes("synthetic")


def test_synthetic_contract_and_determinism():
    train = data.build_dataset("synthetic", split="train")
    test = data.build_dataset("synthetic", split="test")
    assert len(train) == 2000 and len(test) == 500
    a, b = train[3], data.build_dataset("synthetic", split="train")[3]
    check_sample(a, C, (64, 64))
    for k in ("rgb", "depth", "semseg"):
        assert torch.equal(a[k], b[k])                            # a function of (split, index)
    assert not torch.equal(train[0]["rgb"], test[0]["rgb"])       # the splits are different streams
    s = data.build_dataset("synthetic", split="test", image_size=224)[7]
    check_sample(s, C, (224, 224))
    with pytest.raises(IndexError):
        train[2000]


def test_synthetic_train_and_test_scenes_do_not_overlap():
    keys = lambda split, n: {rooms.render_synthetic(split, i, 16)[0].tobytes() for i in range(n)}
    assert not keys("train", 200) & keys("test", 200)


def test_synthetic_statistics():
    counts = np.zeros(C + 1)
    holes = 0
    for i in range(60):
        rgb, depth, label = rooms.render_synthetic("train", i)
        counts += np.bincount(np.where(label == 255, C, label).ravel(), minlength=C + 1)
        holes += (depth == 0).any()
        valid = depth > 0
        assert 0.3 < depth[valid].min() and depth[valid].max() < 12.0
    frac = counts / counts.sum()
    assert (frac[:C] > 0.003).all(), dict(zip(data.SYNTHETIC_CLASSES, frac))   # every class occurs
    assert 0.02 < frac[C] < 0.2                                   # void boundaries, not too many
    assert holes > 30                                             # most images miss some depth


def test_synthetic_back_wall_depth_range():
    # rooms.py: walls 2.5-6 m. The back wall is at z = 2.5..6 m in the room; a pixel's depth
    # there is the camera-z distance, which is within the same range up to the camera's
    # pitch and yaw (cos 15° * cos 20° > 0.9).
    for i in range(20):
        scene = rooms.sample_scene(rooms.synthetic_scene_rng("train", i))
        assert 2.5 <= scene.room_hi[2] <= 6.0
        clean = rooms.render_scene(scene, 32)
        wall = clean["label"] == rooms.WALL
        assert wall.any()
        assert clean["depth"][wall].max() < 6.0 / 0.9


def test_boundary_void_is_one_pixel_and_separates_classes():
    _, _, label = rooms.render_synthetic("train", 5, 96)
    clean = rooms.render_scene(rooms.sample_scene(rooms.synthetic_scene_rng("train", 5)), 96)
    raw = clean["label"]
    assert np.array_equal(label[label != 255], raw[label != 255])
    # Every pair of 4-neighbours with different classes has exactly one void pixel...
    for a, b in ((label[:, :-1], label[:, 1:]), (label[:-1], label[1:])):
        both = (a != 255) & (b != 255)
        assert not (both & (a != b)).any()
    for a, b, ra, rb in ((label[:, :-1], label[:, 1:], raw[:, :-1], raw[:, 1:]),
                         (label[:-1], label[1:], raw[:-1], raw[1:])):
        assert not ((ra != rb) & (a == 255) & (b == 255) & (ra == rb)).any()
    # ...and a pixel is void only on a class edge.
    edge = np.zeros(raw.shape, bool)
    edge[:, :-1] |= raw[:, :-1] != raw[:, 1:]
    edge[:, 1:] |= raw[:, :-1] != raw[:, 1:]
    edge[:-1] |= raw[:-1] != raw[1:]
    edge[1:] |= raw[:-1] != raw[1:]
    assert not ((label == 255) & ~edge).any()


def test_synthetic_depth_noise_grows_with_depth():
    near, far = [], []
    for i in range(30):
        rng = rooms.synthetic_scene_rng("train", i)
        clean = rooms.render_scene(rooms.sample_scene(rng), 64)
        _, depth = rooms.add_sensor_nuisances(clean, rng)
        ok = depth > 0
        err = np.abs(depth - clean["depth"])[ok]
        z = clean["depth"][ok]
        near.append(err[z < 2.0])
        far.append(err[z > 4.5])
    assert np.concatenate(far).mean() > 3 * np.concatenate(near).mean()


def test_synthetic_flip_augmentation_is_seeded_per_epoch_and_index():
    plain = data.build_dataset("synthetic", split="train")
    aug = data.build_dataset("synthetic", split="train", train=True, seed=3)
    flips = 0
    for epoch in (0, 1):
        aug.set_epoch(epoch)
        for i in range(12):
            s, p = aug[i], plain[i]
            flipped = torch.equal(s["rgb"], p["rgb"].flip(-1))
            assert flipped or torch.equal(s["rgb"], p["rgb"])
            ref = p if not flipped else {k: p[k].flip(-1) for k in ("depth", "semseg")}
            assert torch.equal(s["depth"], ref["depth"]) and torch.equal(s["semseg"], ref["semseg"])
            flips += flipped
    assert 4 <= flips <= 20
    # The draw depends on (seed, epoch, index) only, not on the order of access (workers).
    a = data.build_dataset("synthetic", split="train", train=True, seed=3)
    b = data.build_dataset("synthetic", split="train", train=True, seed=3)
    a.set_epoch(5), b.set_epoch(5)
    order = [7, 2, 9, 0]
    got_b = {i: b[i]["rgb"] for i in reversed(order)}
    assert all(torch.equal(a[i]["rgb"], got_b[i]) for i in order)


# Complementarity: edit a scene and re-render; what changes in rgb and in depth is exactly
# what the class table in data.py claims.


def scene_with(pred, start=0):
    """The first train scene from `start` on for which pred(scene) holds."""
    for i in range(start, start + 500):
        scene = rooms.sample_scene(rooms.synthetic_scene_rng("train", i))
        if pred(scene):
            return scene
    raise AssertionError("no such scene")


def rerender(scene, edit, size=96):
    edited = copy.deepcopy(scene)
    edit(edited)
    return rooms.render_scene(scene, size), rooms.render_scene(edited, size)


def test_rug_and_poster_differ_from_floor_and_wall_in_rgb_only():
    for kind, surface, cls in (("rug", rooms.FLOOR, rooms.RUG), ("poster", rooms.WALL, rooms.POSTER)):
        scene = scene_with(lambda s: any(d[0] == kind for d in s.decals))
        a, b = rerender(scene, lambda s: s.decals.__setitem__(slice(None), [d for d in s.decals if d[0] != kind]))
        where = (a["label"] == cls) & (b["label"] == surface)
        assert where.sum() > 20
        assert np.array_equal(a["depth"], b["depth"])                       # identical geometry
        assert np.abs(a["rgb"][where] - b["rgb"][where]).max() > 0.05       # different paint


def test_pillar_differs_from_wall_in_depth_only():
    scene = scene_with(lambda s: any(c[0] == rooms.PILLAR for c in s.cuboids))
    a, b = rerender(scene, lambda s: s.cuboids.__setitem__(slice(None), [c for c in s.cuboids
                                                                         if c[0] != rooms.PILLAR]))
    where = (a["label"] == rooms.PILLAR) & (b["label"] == rooms.WALL)
    assert where.sum() > 20
    assert np.array_equal(a["rgb"][where], b["rgb"][where])                 # painted like the wall
    assert (b["depth"][where] - a["depth"][where]).min() > 0.25             # but stands in front of it


def test_ball_and_disc_differ_in_depth_only():
    def ball_to_disc(s):
        for _, centre, r, rgb in s.spheres:
            back = s.room_hi[2]
            s.decals.append(("disc", centre[0], centre[1], r * back / (back - r), rgb))
        s.spheres.clear()
    # one ball and no disc, so that every disc pixel after the edit is that ball's disc
    scene = scene_with(lambda s: len(s.spheres) == 1 and not any(d[0] == "disc" for d in s.decals))
    a, b = rerender(scene, ball_to_disc)
    where = (a["label"] == rooms.BALL) & (b["label"] == rooms.DISC)
    assert where.sum() > 20
    assert np.array_equal(a["rgb"][where], b["rgb"][where])                 # flat-shaded, same paint
    assert (b["depth"][where] - a["depth"][where]).max() > 0.3              # the bulge
    # Over many scenes the two classes' colours are identically distributed: same means.
    cols = {rooms.BALL: [], rooms.DISC: []}
    for i in range(300):
        clean = rooms.render_scene(rooms.sample_scene(rooms.synthetic_scene_rng("test", i)), 32)
        for c in cols:
            m = clean["label"] == c
            if m.any():
                cols[c].append(clean["rgb"][m].mean(0))
    ball, disc = np.array(cols[rooms.BALL]), np.array(cols[rooms.DISC])
    assert len(ball) > 100 and len(disc) > 100
    se = np.sqrt(ball.var(0) / len(ball) + disc.var(0) / len(disc))
    assert (np.abs(ball.mean(0) - disc.mean(0)) < 4 * se).all()


def test_box_and_table_differ_in_both():
    for cls in (rooms.BOX, rooms.TABLE):
        scene = scene_with(lambda s: any(c[0] == cls for c in s.cuboids))
        a, b = rerender(scene, lambda s: s.cuboids.__setitem__(slice(None), [c for c in s.cuboids if c[0] != cls]))
        where = (a["label"] == cls) & (b["label"] != cls)
        assert where.sum() > 10
        assert np.abs(a["rgb"][where] - b["rgb"][where]).max() > 0.05
        assert (b["depth"][where] - a["depth"][where]).max() > 0.1


# --- real data: fixtures -------------------------------------------------------------


def project_labels(label40):
    """What every NYU reader must return for NYU-40 ids stored with 0 = void."""
    return np.where(label40 == 0, 255, label40.astype(np.int64) - 1)


def test_real_fixture_label_set():
    rgb, label40, depth, raw = real_sample()
    assert rgb.shape == (480, 640, 3) and label40.shape == depth.shape == (480, 640)
    assert len(np.unique(label40)) == 13 and label40.max() <= 40        # as MANIFEST.md says
    assert 1.79 < depth.min() and depth.max() < 3.62 and (raw == 0).any()


def test_embedded_mapping_and_split_are_the_official_ones():
    official = prepare_nyu.nyu40_mapping(fixture_path("meta", "classMapping40.mat"))
    assert np.array_equal(prepare_nyu.nyu40_mapping(), official) and official.shape == (895,) and official[0] == 0
    a, b = prepare_nyu.nyu_splits(), prepare_nyu.nyu_splits(fixture_path("meta", "splits.mat"))
    for s, n in (("train", 795), ("test", 654)):
        assert np.array_equal(a[s], b[s]) and len(a[s]) == n
    assert sorted(np.concatenate([a["train"], a["test"]]).tolist()) == list(range(1, 1450))
    assert 1 in a["test"]                                                # image #1 is a test image


def test_sun_depth_encoding_round_trip():
    # 1 m = 1000 mm is stored rotated left by 3 bits: 8000; beyond 8.191 m the top bits wrap.
    assert layouts.sun_depth_to_metres(np.array([8000], np.uint16))[0] == pytest.approx(1.0)
    assert layouts.metres_to_sun_depth(np.array([10.0]))[0] == ((10000 << 3) & 0xFFFF) | (10000 >> 13)
    mm = np.random.default_rng(0).integers(0, 65536, size=10_000)
    stored = layouts.metres_to_sun_depth(mm / 1000.0)
    assert stored.dtype == np.uint16
    assert np.array_equal(np.round(layouts.sun_depth_to_metres(stored) * 1000).astype(np.int64), mm)
    assert layouts.sun_depth_to_metres(np.zeros(3, np.uint16)).tolist() == [0, 0, 0]


# --- prepare-nyu ---------------------------------------------------------------------


def write_official_mat(path, images, depths, labels, raw_depths=None):
    """A small nyu_depth_v2_labeled.mat: the official dataset names and dtypes, and
    MATLAB's axis order as h5py sees it (N x 3 x W x H, N x W x H)."""
    with h5py.File(path, "w") as f:
        f["images"] = np.stack([im.transpose(2, 1, 0) for im in images]).astype(np.uint8)
        f["depths"] = np.stack([d.T for d in depths]).astype(np.float32)
        f["rawDepths"] = np.stack([d.T for d in (raw_depths or depths)]).astype(np.float32)
        f["labels"] = np.stack([lab.T for lab in labels]).astype(np.uint16)


def raw_labels_for(label40):
    """Raw 894-class ids that the official mapping sends to the given NYU-40 ids."""
    lut = prepare_nyu.nyu40_mapping(fixture_path("meta", "classMapping40.mat"))
    first_raw = np.array([0] + [np.flatnonzero(lut == c)[0] for c in range(1, 41)], np.uint16)
    return first_raw[label40]


@pytest.fixture(scope="module")
def nyu_mat(tmp_path_factory):
    """Four images built from the real one (flipped / rolled so that they differ), split
    train = {2, 4}, test = {1, 3} (1-based, as splits.mat)."""
    rgb, label40, depth, raw = real_sample()
    variants = [lambda a: a, lambda a: a[:, ::-1], lambda a: np.roll(a, 50, axis=1), lambda a: a[::-1]]
    imgs = [np.ascontiguousarray(v(rgb)) for v in variants]
    labs = [np.ascontiguousarray(v(label40)) for v in variants]
    deps = [np.ascontiguousarray(v(depth)) for v in variants]
    raws = [np.ascontiguousarray(v(raw)) for v in variants]
    d = tmp_path_factory.mktemp("nyu_mat")
    write_official_mat(d / "nyu.mat", imgs, deps, [raw_labels_for(lab) for lab in labs], raws)
    scipy.io.savemat(d / "splits.mat", {"trainNdxs": np.array([[2], [4]], np.uint16),
                                        "testNdxs": np.array([[1], [3]], np.uint16)})
    return d, imgs, labs, deps, raws


def test_prepare_nyu_round_trips_pixels_labels_and_split(nyu_mat, tmp_path):
    d, imgs, labs, deps, _ = nyu_mat
    out = tmp_path / "nyu"
    counts = prepare_nyu.prepare_nyu(str(d / "nyu.mat"), str(out), splits=str(d / "splits.mat"), progress=False)
    assert counts == {"written": 4, "skipped": 0}
    assert sorted(os.listdir(out / "train" / "rgb")) == ["0002.png", "0004.png"]
    assert sorted(os.listdir(out / "test" / "labels")) == ["0001.png", "0003.png"]
    for split, idx in (("train", [2, 4]), ("test", [1, 3])):
        ds = data.build_dataset("nyu", str(out), split)
        assert ds.layout.key == "maskmentor" and len(ds) == 2
        for j, i in enumerate(idx):
            s = ds[j]
            check_sample(s, 40, (480, 640))
            assert np.array_equal(data.denormalize_rgb(s["rgb"]), imgs[i - 1])
            assert np.abs(s["depth"][0].numpy() - deps[i - 1]).max() <= 0.0005 + 1e-6   # rounded to mm
            assert np.array_equal(s["semseg"].numpy(), project_labels(labs[i - 1]))
            assert s["id"] == f"{split}/rgb/{i:04d}.png"
    # Re-running skips the finished images; a missing file is written again.
    os.remove(out / "test" / "depth" / "0003.png")
    counts = prepare_nyu.prepare_nyu(str(d / "nyu.mat"), str(out), splits=str(d / "splits.mat"), progress=False)
    assert counts == {"written": 1, "skipped": 3}
    assert not [f for f in os.listdir(out / "test" / "depth") if ".tmp" in f]


def test_prepare_nyu_raw_depth_keeps_holes(nyu_mat, tmp_path):
    d, _, _, _, raws = nyu_mat
    prepare_nyu.prepare_nyu(str(d / "nyu.mat"), str(tmp_path), splits=str(d / "splits.mat"), depth="raw", progress=False)
    s = data.build_dataset("nyu", str(tmp_path), "test")[0]
    assert ((s["depth"][0] == 0).numpy() == (raws[0] == 0)).all()


@pytest.mark.slow
def test_prepare_nyu_cli(nyu_mat, tmp_path):
    d = nyu_mat[0]
    p = subprocess.run([sys.executable, "tools/prepare_nyu.py", "--mat", str(d / "nyu.mat"), "--splits",
                        str(d / "splits.mat"), "--mapping", fixture_path("meta", "classMapping40.mat"),
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "4 images written" in p.stdout
    # The default (embedded) split names images up to 1449: this file has 4.
    p = subprocess.run([sys.executable, "tools/prepare_nyu.py", "--mat", str(d / "nyu.mat"), "--out",
                        str(tmp_path / "p")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "outside the 4 images" in lines[0], p.stderr


def test_prepare_nyu_bad_inputs(nyu_mat, tmp_path):
    with pytest.raises(data.UserError) as e:           # the embedded split names images up to 1449
        prepare_nyu.prepare_nyu(str(nyu_mat[0] / "nyu.mat"), str(tmp_path / "o"), progress=False)
    one_line_error(e, "embedded split", "outside the 4 images")
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(data.UserError) as e:
        prepare_nyu.prepare_nyu(str(junk), str(tmp_path / "o"), progress=False)
    one_line_error(e, junk, "HDF5")
    with pytest.raises(data.UserError) as e:
        prepare_nyu.prepare_nyu(str(tmp_path / "none.mat"), str(tmp_path / "o"), progress=False)
    one_line_error(e, "none.mat", "not found", "https://cs.nyu.edu/", "docs/guide.md")   # says where to get it
    with h5py.File(tmp_path / "other.mat", "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(data.UserError) as e:
        prepare_nyu.prepare_nyu(str(tmp_path / "other.mat"), str(tmp_path / "o"), progress=False)
    one_line_error(e, "other.mat", "'images'")
    with pytest.raises(data.UserError) as e:
        prepare_nyu.nyu40_mapping(fixture_path("meta", "splits.mat"))
    one_line_error(e, "splits.mat", "mapClass")


def test_prepare_nyu_flags_are_one_line_errors(tmp_path):
    """cli.parse_config's rules: no abbreviated flags, --mat required, choices checked."""
    for argv, words in ((["--ma", "x.mat"], "unrecognized arguments: --ma"), ([], "--mat is required: the official"),
                        (["--mat", "x.mat", "--depth", "holes"], "invalid choice: 'holes'")):
        with pytest.raises(data.UserError) as e:
            prepare_nyu.main(argv + ["--out", str(tmp_path / "o")])
        one_line_error(e, words)
    assert not (tmp_path / "o").exists()


def test_prepare_nyu_never_writes_over_its_inputs(nyu_mat, tmp_path):
    d = nyu_mat[0]
    before = {f: open(d / f, "rb").read() for f in os.listdir(d)}
    for flag in ("--mat", "--splits"):
        with pytest.raises(data.UserError) as e:
            prepare_nyu.main(["--mat", str(d / "nyu.mat"), "--splits", str(d / "splits.mat"),
                              "--out", str(d / ("nyu.mat" if flag == "--mat" else "splits.mat"))])
        one_line_error(e, "--out", f"that is the {flag} file", "outputs never replace inputs")
    assert {f: open(d / f, "rb").read() for f in os.listdir(d)} == before


def test_prepare_nyu_on_a_full_disk_is_one_line_and_resumes(nyu_mat, tmp_path, monkeypatch):
    d = nyu_mat[0]
    args = ["--mat", str(d / "nyu.mat"), "--splits", str(d / "splits.mat")]
    prepare_nyu.main(args + ["--out", str(tmp_path / "ok")])
    first = {k: tmp_path / "ok" / "train" / k / "0002.png" for k in ("rgb", "depth", "labels")}
    out = tmp_path / "nyu"
    with monkeypatch.context() as m:       # room for the first image's rgb and depth, not its labels
        fill_the_disk(m, room=os.path.getsize(first["rgb"]) + os.path.getsize(first["depth"]) + 10)
        with pytest.raises(data.UserError) as e:
            prepare_nyu.main(args + ["--out", str(out)])
    one_line_error(e, f"{out / 'train' / 'labels' / '0002.png'}: no space left on device")
    written = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, files in os.walk(out) for f in files)
    assert written == ["train/depth/0002.png", "train/rgb/0002.png"]      # whole files, no temporary one
    assert prepare_nyu.main(args + ["--out", str(out)]) == {"written": 4, "skipped": 0}   # space again: run again
    for k, p in first.items():
        assert open(out / "train" / k / "0002.png", "rb").read() == open(p, "rb").read()


# --- the layouts users already have ----------------------------------------------------


def make_multimae(root, rgb, label40, depth):
    for split in ("train", "test"):       # tools/prepare_nyuv2.py: 0-based names, depth x 2^16/10
        save(f"{root}/{split}/rgb/data/0000.png", rgb)
        save(f"{root}/{split}/depth/data/0000.png", np.uint16(depth * 2 ** 16 / 10))
        save_palette(f"{root}/{split}/semseg/data/0000.png", label40)


def make_cmx(root, label40, depth, depth_ext=".npy", list_line=None):
    """SA-Gate's release: RGB/0.jpg, Depth/0.npy (metres), Label/0.png, lists 'RGB/0.jpg<TAB>Label/0.png'."""
    os.makedirs(f"{root}/RGB", exist_ok=True)
    shutil.copy(fixture_path("nyu_0001", "rgb.jpg"), f"{root}/RGB/0.jpg")
    save(f"{root}/Depth/0{depth_ext}", depth)
    save_palette(f"{root}/Label/0.png", label40)
    line = list_line or open(fixture_path("meta", "cmx_test.txt")).readline()      # the real first line
    for split in ("train", "test"):
        with open(f"{root}/{split}.txt", "w") as f:
            f.write(line)


@pytest.mark.parametrize("layout", ["multimae", "esanet", "cmx", "cmx-names-mm-png"])
def test_nyu_layouts_read_back_the_same_metres_and_labels(layout, tmp_path):
    rgb, label40, depth, _ = real_sample()
    root = str(tmp_path / layout)
    if layout == "multimae":
        make_multimae(root, rgb, label40, depth)
        tol, key = 1 / 6553.6 + 1e-6, "multimae"         # truncated by uint16(), float32 rounding
    elif layout == "esanet":
        make_esanet(root, rgb, label40, depth)
        tol, key = 1e-3 + 1e-6, "esanet"
    elif layout == "cmx":
        make_cmx(root, label40, depth.astype(np.float32))
        tol, key = 1e-6, "cmx"
    else:                                  # CMX's own lists hold bare names; 16-bit PNG in mm
        make_cmx(root, label40, np.round(depth * 1000).astype(np.uint16), ".png", list_line="0\n")
        tol, key = 5e-4 + 1e-6, "cmx"
    for split in ("train", "test"):
        ds = data.build_dataset("nyu", root, split)
        assert ds.layout.key == key and len(ds) == 1
        s = ds[0]
        check_sample(s, 40, (480, 640))
        assert np.array_equal(data.denormalize_rgb(s["rgb"]), rgb)
        assert np.abs(s["depth"][0].numpy() - depth).max() <= tol
        assert np.array_equal(s["semseg"].numpy(), project_labels(label40))
        assert len(np.unique(s["semseg"].numpy())) == 13


def test_sun_layout_reads_the_official_depth_encoding(tmp_path):
    rgb, label40, depth, raw = real_sample()
    label37 = np.where(label40 > 37, 0, label40)                           # SUN has 37 classes
    root = tmp_path / "sun"
    for split in ("train", "test"):
        save(f"{root}/RGB/img-{split}.jpg", rgb)
        save(f"{root}/Depth/img-{split}.png", layouts.metres_to_sun_depth(raw))
        save(f"{root}/labels/img-{split}.png", label37.astype(np.uint8))   # DFormer names it labels/
        (root / f"{split}.txt").write_text(f"RGB/img-{split}.jpg Label/img-{split}.png\n")
    s = data.build_dataset("sun", str(root), "test")[0]
    check_sample(s, 37)
    assert np.abs(s["depth"][0].numpy() - raw).max() <= 5e-4 + 1e-6
    assert ((s["depth"][0] == 0).numpy() == (raw == 0)).all()
    assert np.array_equal(s["semseg"].numpy(), np.where(label37 == 0, 255, label37.astype(np.int64) - 1))
    save(f"{root}/Depth/img-test.png", np.round(raw * 1000).astype(np.uint16))    # plain mm: refused
    with pytest.raises(data.UserError) as e:
        data.build_dataset("sun", str(root), "test")[0]
    one_line_error(e, "img-test.png", "bit-rotated")


def test_each_depth_encoding_is_an_explicit_case(tmp_path):
    """read_depth decodes each layout's depth code as the table says (2.5 m in each
    encoding reads back as 2.5 m); a code it does not know is an error naming it, not
    millimetres."""
    stored = {"mm": np.uint16(2500), "npy_or_mm": np.uint16(2500), "multimae": np.uint16(2.5 * 6553.6),
              "sun": layouts.metres_to_sun_depth(np.float64(2.5))}
    for code, v in stored.items():
        path = str(tmp_path / f"{code}.png")
        save(path, np.full((6, 8), v, np.uint16))
        depth = layouts.read_depth(path, dataclasses.replace(layouts.MASKMENTOR, depth=code), "nyu")
        assert depth.dtype == np.float32 and np.allclose(depth, 2.5), code
    with pytest.raises(ValueError, match="unknown depth encoding 'cm'"):
        layouts.read_depth(str(tmp_path / "mm.png"), dataclasses.replace(layouts.MASKMENTOR, depth="cm"), "nyu")


def test_missing_root_and_unknown_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.UserError) as e:
        data.build_dataset("nyu")
    one_line_error(e, "data/nyu", "prepare_nyu.py")
    with pytest.raises(data.UserError) as e:
        data.build_dataset("sun")
    one_line_error(e, "data/sun")
    (tmp_path / "weird" / "images").mkdir(parents=True)
    with pytest.raises(data.UserError) as e:
        data.build_dataset("nyu", str(tmp_path / "weird"))
    one_line_error(e, "weird", "images", "labels_40", "RGB/")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.UserError) as e:
        data.build_dataset("sun", str(tmp_path / "empty"))
    one_line_error(e, "empty folder", "RGB/")


# --- bad input: one line naming the file and the problem -----------------------------


def esanet_root(tmp_path):
    rgb, label40, depth, _ = real_sample()
    root = tmp_path / "esanet"
    make_esanet(str(root), rgb[:48, :64], label40[:48, :64], depth[:48, :64])
    return root


def first_sample_error(root, name="nyu", split="test"):
    with pytest.raises(data.UserError) as e:
        data.build_dataset(name, str(root), split)[0]
    return e


def test_truncated_and_corrupt_images(tmp_path):
    root = esanet_root(tmp_path)
    path = root / "test" / "rgb" / "0001.png"
    path.write_bytes(path.read_bytes()[:200])
    one_line_error(first_sample_error(root), path, "cannot read")
    path.write_bytes(b"\x89PNG garbage garbage")
    one_line_error(first_sample_error(root), path, "cannot read")


def test_size_mismatch(tmp_path):
    root = esanet_root(tmp_path)
    path = root / "test" / "depth" / "0001.png"
    save(str(path), np.ones((40, 64), np.uint16) * 2000)
    one_line_error(first_sample_error(root), path, "64x40", "rgb")


def test_labels_outside_the_class_set(tmp_path):
    root = esanet_root(tmp_path)
    path = root / "test" / "labels_40" / "0001.png"
    lab = np.zeros((48, 64), np.uint8)
    lab[3, 3] = 41
    save(str(path), lab)
    one_line_error(first_sample_error(root), path, "41", "outside")
    save(str(path), np.zeros((48, 64, 3), np.uint8))                    # a colour rendering
    one_line_error(first_sample_error(root), path, "class ids")


def test_nan_and_negative_depth(tmp_path):
    rgb, label40, depth, _ = real_sample()
    root = tmp_path / "cmx"
    for bad, needle in ((np.nan, "NaN"), (-1.0, "negative")):
        d = depth.astype(np.float32).copy()
        d[10, 10] = bad
        make_cmx(str(root), label40, d)
        one_line_error(first_sample_error(root), root / "Depth" / "0.npy", needle)


def test_depth_in_another_encoding_is_refused(tmp_path):
    _, label40, _, _ = real_sample()
    root = tmp_path / "cmx"
    # Depth2HHA's PNGs are metres x 10000: read as millimetres they would be 18-36 m.
    make_cmx(str(root), label40, np.asarray(Image.open(fixture_path("nyu_0001", "depth_filled.png"))), ".png")
    one_line_error(first_sample_error(root), root / "Depth" / "0.png", "encoding")
    # DFormer's release: depth rescaled per image into an 8-bit PNG.
    save(str(root / "Depth" / "0.png"), np.zeros((480, 640), np.uint8))
    one_line_error(first_sample_error(root), root / "Depth" / "0.png", "8-bit", "metres cannot be recovered")


def test_split_list_naming_a_missing_image(tmp_path):
    _, label40, depth, _ = real_sample()
    root = tmp_path / "cmx"
    make_cmx(str(root), label40, depth.astype(np.float32))
    with open(root / "test.txt", "a") as f:
        f.write("RGB/7.jpg\tLabel/7.png\n")
    with pytest.raises(data.UserError) as e:
        data.build_dataset("nyu", str(root), "test")
    one_line_error(e, "test.txt:2", "'7'")
    (root / "train.txt").write_text("\n")
    with pytest.raises(data.UserError) as e:
        data.build_dataset("nyu", str(root), "train")
    one_line_error(e, "train.txt", "empty")


def test_empty_and_incomplete_folders(tmp_path):
    root = esanet_root(tmp_path)
    os.remove(root / "test" / "depth" / "0001.png")
    with pytest.raises(data.UserError) as e:
        data.build_dataset("nyu", str(root), "test")
    one_line_error(e, root / "test" / "depth", "0001")
    for f in ("rgb/0001.png", "labels_40/0001.png"):
        os.remove(root / "test" / f)
    with pytest.raises(data.UserError) as e:
        data.build_dataset("nyu", str(root), "test")
    one_line_error(e, root / "test" / "rgb", "no images")


# --- augmentation ---------------------------------------------------------------------


def coordinate_dataset(tmp_path, H=40, W=80, **kw):
    """A maskmentor-layout dataset whose three maps encode the same coordinates: rgb red =
    3x, green = 6y; depth = 1 m + 1 cm * x (0 = a hole every 7th column); label = y."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([3 * x, 6 * y, np.zeros_like(x)], -1).astype(np.uint8)
    mm = (1000 + 10 * x).astype(np.uint16)
    mm[:, 3::7] = 0
    for split in ("train", "test"):
        save(f"{tmp_path}/{split}/rgb/0001.png", rgb)
        save(f"{tmp_path}/{split}/depth/0001.png", mm)
        save(f"{tmp_path}/{split}/labels/0001.png", y.astype(np.uint8))
    return data.build_dataset("nyu", str(tmp_path), "train", train=True, **kw), mm


def test_augmentation_keeps_rgb_depth_and_labels_aligned(tmp_path):
    ds, mm = coordinate_dataset(tmp_path, image_size=32, seed=1)
    depth_values = set((mm / 1000.0).astype(np.float32).ravel().tolist())
    flips = scales = 0
    for epoch in range(12):
        ds.set_epoch(epoch)
        s = ds[0]
        check_sample(s, 40, (32, 32))
        img = data.denormalize_rgb(s["rgb"]).astype(np.float64)
        d, lab = s["depth"][0].numpy(), s["semseg"].numpy()
        pad = lab == 255
        assert (d[pad] == 0).all() and (s["rgb"][:, torch.from_numpy(pad)] == 0).all()
        assert set(d.ravel().tolist()) <= depth_values | {0.0}           # nearest: no invented depth
        assert set(lab[~pad].tolist()) <= set(range(40))
        x_rgb, y_rgb = img[..., 0] / 3, img[..., 1] / 6
        valid = ~pad & (d > 0)
        x_depth = (d - 1.0) / 0.01
        assert np.abs(x_rgb - x_depth)[valid].max() <= 1.0 + 1e-3
        assert np.abs(y_rgb - lab)[~pad].max() <= 1.0 + 1e-3
        r = int(np.argmin(pad.sum(1)))                                # the least padded row
        flips += np.diff(x_rgb[r][~pad[r]]).mean() < 0                 # x decreasing: mirrored
        scales += len(np.unique(lab[~pad])) != lab.shape[0]
    assert flips >= 2 and scales >= 2


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    ds, _ = coordinate_dataset(tmp_path, image_size=24, seed=5)
    ds.set_epoch(3)
    a = ds[0]
    b = data.build_dataset("nyu", str(tmp_path), "train", train=True, image_size=24, seed=5)
    b.set_epoch(3)
    assert all(torch.equal(a[k], b[0][k]) for k in ("rgb", "depth", "semseg"))
    b.set_epoch(4)
    assert not torch.equal(a["rgb"], b[0]["rgb"])
    plain = data.build_dataset("nyu", str(tmp_path), "test")[0]            # train=False: full size
    assert plain["rgb"].shape == (3, 40, 80)


@pytest.mark.slow
def test_dataloader_workers_do_not_change_the_batches():
    ds = data.build_dataset("synthetic", split="train", train=True, seed=2)
    ds.set_epoch(1)
    sub = torch.utils.data.Subset(ds, range(16))
    runs = [list(torch.utils.data.DataLoader(sub, batch_size=4, num_workers=w, collate_fn=data.collate))
            for w in (0, 2)]
    for a, b in zip(*runs):
        assert all(torch.equal(a[k], b[k]) for k in ("rgb", "depth", "semseg")) and a["id"] == b["id"]


# --- depth in the wrong unit, missing splits: one line each -------------------------------


def test_depth_in_a_wrong_unit_is_refused_with_the_likely_unit(tmp_path):
    rgb, label40, depth, _ = real_sample()
    # MultiMAE's layout holding millimetre PNGs: 6.55x too small, each image passes alone
    mm = tmp_path / "multimae_mm"
    make_multimae(str(mm), rgb, label40, depth)
    for split in ("train", "test"):
        save(f"{mm}/{split}/depth/data/0000.png", np.uint16(depth * 1000))
    with pytest.raises(data.UserError) as e:
        data.build_dataset("nyu", str(mm), "test")
    one_line_error(e, str(mm), "median depth", "MultiMAE's encoding")
    # whole metres in a uint16 PNG read as millimetres (ESANet's layout)
    whole = tmp_path / "esanet_m"
    make_esanet(str(whole), rgb, label40, depth)
    save(f"{whole}/test/depth/0001.png", np.round(depth).astype(np.uint16))
    with pytest.raises(data.UserError) as e:
        data.build_dataset("nyu", str(whole), "test")
    one_line_error(e, "0001.png", "not an indoor range", "metres (whole numbers)")
    # SUN / CMX layout with millimetres in the .npy files that should hold metres
    cmx = tmp_path / "cmx_mm"
    make_cmx(str(cmx), label40, (depth * 1000).astype(np.float32))
    with pytest.raises(data.UserError) as e:
        data.build_dataset("nyu", str(cmx), "test")
    one_line_error(e, "0.npy", "millimetres where metres were expected")


def test_all_zero_depth_is_refused(tmp_path):
    rgb, label40, depth, _ = real_sample()
    root = tmp_path / "esanet"
    make_esanet(str(root), rgb, label40, depth)
    save(f"{root}/test/depth/0001.png", np.zeros(depth.shape, np.uint16))
    with pytest.raises(data.UserError) as e:
        data.build_dataset("nyu", str(root), "test")
    one_line_error(e, "0001.png", "every depth pixel is 0")


def test_a_copy_without_the_test_split_says_so(tmp_path):
    rgb, label40, depth, _ = real_sample()
    root = tmp_path / "esanet"
    make_esanet(str(root), rgb, label40, depth)
    shutil.rmtree(root / "test")
    assert len(data.build_dataset("nyu", str(root), "train")) == 1
    with pytest.raises(data.UserError) as e:
        data.build_dataset("nyu", str(root), "test")
    one_line_error(e, "no test split", "train/")


def test_pretraining_augmentation_is_a_random_resized_crop(tmp_path):
    """MultiMAE's pre-training augmentation: crops of 20-100 % of the area resized to the
    crop size, applied alike to the three maps (labels and depth nearest: no new values)."""
    rgb, label40, depth, _ = real_sample()
    make_esanet(str(tmp_path), rgb, label40, depth)
    ds = data.build_dataset("nyu", str(tmp_path), "train", train=True, image_size=64, augmentation="pretrain")
    plain = data.build_dataset("nyu", str(tmp_path), "train")[0]
    labels, depths = set(plain["semseg"].unique().tolist()), set(plain["depth"].unique().tolist())
    areas = []
    for epoch in range(40):
        ds.set_epoch(epoch)
        s = ds[0]
        assert s["rgb"].shape == (3, 64, 64) and s["depth"].shape == (1, 64, 64) and s["semseg"].shape == (64, 64)
        assert set(s["semseg"].unique().tolist()) <= labels
        assert set(s["depth"].unique().tolist()) <= depths | {0.0}
        areas.append(len(s["semseg"].unique()))
    assert len(set(areas)) > 3                        # different crops
    # the same crop for the three maps: where the label changes, so does the depth (mostly)
    ds.set_epoch(0)
    a, b = ds[0], ds[0]
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["semseg"], b["semseg"])
