"""rooms.py's cross-modal cues (issue 16): cues = 0 is the renderer as it was before the
knob, bit for bit; every cue does what rooms.py's header says and grows with the knob;
the labels never change; data.py passes the knob through."""
import copy
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from util import rooms
from conftest import ROOT, one_line_error

# The last commit whose rooms.py had no cues: the renderer every existing number comes from.
BEFORE_CUES = "6ad3da97300d2306cadd1edd0ed3839286a5e5b9"
LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def rooms_before_cues(tmp_path_factory):
    """rooms.py as of BEFORE_CUES, imported under another name."""
    try:
        source = subprocess.run(["git", "show", f"{BEFORE_CUES}:rooms.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.fail("needs the repository's git history (rooms.py before the cues): run the tests in a git clone")
    path = tmp_path_factory.mktemp("before_cues") / "rooms_before_cues.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("rooms_before_cues", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def scenes_with(pred, split="train", n=1):
    """The first n (index, scene) of `split` for which pred(scene) holds."""
    found = []
    for i in range(2000):
        scene = rooms.sample_scene(rooms.synthetic_scene_rng(split, i))
        if pred(scene):
            found.append((i, scene))
            if len(found) == n:
                return found
    raise AssertionError("no such scene")


def render(index, scene, size, cues, split="train"):
    """render_scene as render_synthetic calls it: the scene's own cue generator."""
    return rooms.render_scene(scene, size, cues, rooms.synthetic_cue_rng(split, index))


# --- cues = 0 is the old renderer; cues change rgb and depth only ---------------------


def test_cues_zero_is_the_renderer_before_cues_bit_for_bit(rooms_before_cues):
    for split in ("train", "val", "test"):
        for index in (0, 3, 58, 499):
            for size in (16, 64, 97):
                before = rooms_before_cues.render_synthetic(split, index, size)
                for now in (rooms.render_synthetic(split, index, size),
                            rooms.render_synthetic(split, index, size, cues=0.0)):
                    for a, b in zip(before, now):
                        assert a.dtype == b.dtype and np.array_equal(a, b), (split, index, size)


def test_labels_are_the_same_at_every_cue_level():
    for split in ("train", "val", "test"):
        for index in range(8):
            label = rooms.render_synthetic(split, index, 64)[2]
            for cues in (0.25, 0.5, 1.0):
                rgb, depth, label_c = rooms.render_synthetic(split, index, 64, cues)
                assert np.array_equal(label, label_c)


def test_the_same_room_at_every_level_with_cues_growing_linearly():
    half, full = 0.0, 0.0
    for index, scene in scenes_with(lambda s: len(s.decals) >= 2, n=8):
        r = {c: render(index, scene, 64, c) for c in (0.0, 0.5, 1.0)}
        # relief is linear in the knob: half the depth change at 0.5
        d0 = r[0.0]["depth"]
        assert np.abs(d0 - r[1.0]["depth"]).max() > 0.002
        np.testing.assert_allclose(d0 - r[0.5]["depth"], 0.5 * (d0 - r[1.0]["depth"]), rtol=0, atol=1e-12)
        assert np.array_equal(r[0.0]["surface_depth"], r[1.0]["surface_depth"])
        # shading and contact shadows are nearly linear (their product adds a small c² term)
        half += np.abs(r[0.5]["rgb"] - r[0.0]["rgb"]).sum()
        full += np.abs(r[1.0]["rgb"] - r[0.0]["rgb"]).sum()
    assert 0.45 < half / full < 0.6, half / full


def test_render_cache_keeps_each_cue_level(monkeypatch):
    monkeypatch.setattr(rooms, "render_cache", {})
    plain = rooms.render_synthetic("val", 2, 32)
    cued = rooms.render_synthetic("val", 2, 32, cues=1)
    assert set(rooms.render_cache) == {("val", 2, 32, 0.0), ("val", 2, 32, 1.0)}
    assert rooms.render_synthetic("val", 2, 32, cues=1.0) is cued
    assert not np.array_equal(plain[0], cued[0])
    for bad in (-0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match="cues"):
            rooms.render_synthetic("val", 2, 32, cues=bad)


# --- each cue does what rooms.py's header says -----------------------------------------


def test_shading_and_contact_shadows_show_the_pillar_and_the_ball_in_rgb():
    def without_pillar(s):
        s.cuboids[:] = [c for c in s.cuboids if c[0] != rooms.PILLAR]

    def ball_to_disc(s):
        for _, centre, r, rgb in s.spheres:
            back = s.room_hi[2]
            s.decals.append(("disc", centre[0], centre[1], r * back / (back - r), rgb))
        s.spheres.clear()

    cases = ((lambda s: any(c[0] == rooms.PILLAR for c in s.cuboids), without_pillar, rooms.PILLAR, rooms.WALL),
             (lambda s: len(s.spheres) == 1 and not any(d[0] == "disc" for d in s.decals), ball_to_disc,
              rooms.BALL, rooms.DISC))
    for pred, edit, cls, look_alike in cases:
        differences = {0.0: [], 1.0: []}
        for index, scene in scenes_with(pred, n=10):
            edited = copy.deepcopy(scene)
            edit(edited)
            for cues in differences:
                a, b = render(index, scene, 96, cues), render(index, edited, 96, cues)
                where = (a["label"] == cls) & (b["label"] == look_alike)
                if where.sum() > 20:
                    differences[cues].append(np.abs(a["rgb"][where] - b["rgb"][where]).mean())
        assert len(differences[1.0]) >= 5
        assert max(differences[0.0]) == 0.0               # test_data.py's claims hold at cues = 0
        assert np.mean(differences[1.0]) > 5 / 255, (cls, np.mean(differences[1.0]) * 255)


def test_lambert_shading_follows_the_surface_normal(monkeypatch):
    # Without contact shadows, cue 1 alone: a surface facing the light keeps its
    # brightness, one facing away gets the ambient share 1 - CUE_LAMBERT; box and table
    # are shaded already and do not change.
    monkeypatch.setattr(rooms, "CUE_CONTACT", 0.0)
    for index, scene in scenes_with(lambda s: True, n=10):
        a, b = render(index, scene, 64, 0.0), render(index, scene, 64, 1.0)
        lit = a["rgb"].max(-1) < 0.99                     # not clipped at white
        ratio = (b["rgb"] @ LUMA)[lit] / (a["rgb"] @ LUMA)[lit]
        label = a["label"][lit]
        assert ratio.min() > 1 - rooms.CUE_LAMBERT - 1e-9 and ratio.max() < 1 + 1e-9
        np.testing.assert_allclose(ratio[(label == rooms.BOX) | (label == rooms.TABLE)], 1.0, atol=1e-12)
        ceiling = label == rooms.CEILING                  # faces down, the light comes from above
        np.testing.assert_allclose(ratio[ceiling], 1 - rooms.CUE_LAMBERT, atol=1e-9)
        assert 0.3 <= rooms.CUE_LAMBERT <= 0.5            # faint, but clear: header, cue 1
        floor = label == rooms.FLOOR                      # faces up: n.l = the light's height share
        np.testing.assert_allclose(ratio[floor], 1 - rooms.CUE_LAMBERT * (1 - scene.light_dir[1]), atol=1e-9)


def test_contact_shadows_darken_where_objects_meet_the_floor(monkeypatch):
    near, far = [], []
    for index, scene in scenes_with(lambda s: any(c[0] == rooms.BOX for c in s.cuboids), n=6):
        shadowed = render(index, scene, 128, 1.0)
        monkeypatch.setattr(rooms, "CUE_CONTACT", 0.0)
        unshadowed = render(index, scene, 128, 1.0)
        monkeypatch.undo()
        darkening = 1 - (shadowed["rgb"] @ LUMA).ravel() / np.maximum((unshadowed["rgb"] @ LUMA).ravel(), 1e-9)
        assert darkening.min() > -1e-9 and darkening.max() < rooms.CUE_CONTACT + 1e-9
        # floor hit points, and their distance to the nearest object and to the walls
        d = rooms.camera_rays(scene, 128)
        depth = shadowed["depth"].ravel()
        p = [depth * d[0], scene.cam_h + depth * d[1], depth * d[2]]
        floor = shadowed["label"].ravel() == rooms.FLOOR
        q = [a[floor] for a in p]
        to_object = np.min([rooms._distance_to(("box", lo, hi), q) for _, lo, hi, _ in scene.cuboids]
                           + [rooms._distance_to(("sphere", c, r), q) for _, c, r, _ in scene.spheres], axis=0)
        to_wall = np.minimum.reduce([q[0] - scene.room_lo[0], scene.room_hi[0] - q[0], scene.room_hi[2] - q[2]])
        near.append(darkening[floor][to_object < 0.03])
        open_floor = (to_object > 2 * max(rooms.AO_PROBES)) & (to_wall > max(rooms.AO_PROBES))
        far.append(darkening[floor][open_floor])
    near, far = np.concatenate(near), np.concatenate(far)
    assert near.size > 20 and far.size > 500
    assert near.mean() > 0.15, near.mean()                # up to 0.3 at the contact itself
    assert np.abs(far).max() < 1e-12                      # nothing nearby: no shadow


def test_relief_raises_rugs_posters_and_discs_by_the_stated_height():
    def has_all(s):
        kinds = [d[0] for d in s.decals]
        return kinds.count("rug") == 1 and kinds.count("poster") == 1 and "disc" in kinds

    for index, scene in scenes_with(has_all, n=3):
        d = rooms.camera_rays(scene, 96)
        label0 = render(index, scene, 96, 0.0)["label"].ravel()
        for cues in (0.0, 0.5, 1.0):
            clean = render(index, scene, 96, cues)
            assert np.array_equal(clean["label"].ravel(), label0)
            depth = clean["depth"].ravel()
            above_floor = scene.cam_h + depth * d[1]                 # height of the hit point
            off_wall = scene.room_hi[2] - depth * d[2]               # distance in front of the back wall
            rug, poster, disc = (label0 == c for c in (rooms.RUG, rooms.POSTER, rooms.DISC))
            assert rug.sum() > 10 and poster.sum() > 10 and disc.sum() > 10
            if cues == 0:
                for h in (above_floor[rug], off_wall[poster], off_wall[disc]):
                    assert np.abs(h).max() < 1e-9                    # paint only
                continue
            h = above_floor[rug] / cues                              # one rug, one thickness
            assert np.ptp(h) < 1e-9 and rooms.RELIEF["rug"][0] <= h[0] <= rooms.RELIEF["rug"][1]
            h = np.unique(np.round(off_wall[poster] / cues, 9))     # the frame, and the print halfway
            assert len(h) == 2 and h[1] == pytest.approx(2 * h[0])
            assert rooms.RELIEF["poster"][0] <= h[1] <= rooms.RELIEF["poster"][1]
            h = off_wall[disc] / cues
            assert (h >= rooms.RELIEF["disc"][0] - 1e-9).all() and (h <= rooms.RELIEF["disc"][1] + 1e-9).all()


def test_extra_holes_follow_dark_surfaces_and_depth_edges():
    rate = {}                                             # (where, cues) -> [holes, pixels]
    for index in range(40):
        scene = rooms.sample_scene(rooms.synthetic_scene_rng("val", index))
        clean = render(index, scene, 64, 1.0, split="val")
        luma = clean["rgb"] @ LUMA
        z = clean["depth"]
        nearer = np.zeros(z.shape, dtype=bool)            # a 4-neighbour more than 10% nearer
        nearer[:, 1:] |= z[:, 1:] > 1.1 * z[:, :-1]
        nearer[:, :-1] |= z[:, :-1] > 1.1 * z[:, 1:]
        nearer[1:] |= z[1:] > 1.1 * z[:-1]
        nearer[:-1] |= z[:-1] > 1.1 * z[1:]
        where = {"dark": luma < 0.1, "edge": nearer & (luma > 0.35), "elsewhere": ~nearer & (luma > 0.35)}
        for cues in (0.0, 1.0):
            holes = rooms.render_synthetic("val", index, 64, cues)[1] == 0
            for name, mask in where.items():
                counts = rate.setdefault((name, cues), [0, 0])
                counts[0] += (holes & mask).sum()
                counts[1] += mask.sum()
    r = {k: holes / max(pixels, 1) for k, (holes, pixels) in rate.items()}
    assert rate["dark", 1.0][1] > 20 and rate["edge", 1.0][1] > 200
    assert r["dark", 0.0] < 0.05 and r["dark", 1.0] > 0.4          # ~0.6 x darkness
    assert r["edge", 0.0] < 0.05 and r["edge", 1.0] > 0.3          # ~0.5 behind a jump
    assert r["elsewhere", 1.0] == r["elsewhere", 0.0]              # the old holes only


# --- data.py passes the knob through ---------------------------------------------------


def test_datasets_pass_cues_through_and_refuse_bad_values():
    for ds in (data.build_dataset("synthetic", split="val", cues=0.5), data.SyntheticRooms("val", cues=0.5)):
        assert ds.cues == 0.5
        rgb, depth, label = rooms.render_synthetic("val", 3, 64, 0.5)
        s = ds[3]
        assert torch.equal(s["rgb"], data.normalize_rgb(rgb))
        assert torch.equal(s["depth"][0], torch.from_numpy(depth)) and torch.equal(s["semseg"], torch.from_numpy(label))
    plain = data.build_dataset("synthetic", split="test")[0]
    cued = data.build_dataset("synthetic", split="test", cues=1)[0]
    assert torch.equal(plain["semseg"], cued["semseg"]) and not torch.equal(plain["rgb"], cued["rgb"])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(data.UserError) as e:
            data.build_dataset("synthetic", cues=bad)
        one_line_error(e, "--cues must be in [0, 1], got", bad)
        with pytest.raises(data.UserError) as e:
            data.SyntheticRooms("train", cues=bad)
        one_line_error(e, "--cues must be in [0, 1], got", bad)
    for name in ("nyu", "sun"):
        with pytest.raises(data.UserError) as e:
            data.build_dataset(name, root="/nonexistent", split="test", cues=0.5)
        one_line_error(e, f"--cues applies to the synthetic rooms only, not {name}")
