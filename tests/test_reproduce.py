"""reproduce.py: equal budgets, determinism, a frozen separate KD teacher, the studies' flow,
and the --quick miniature end to end (diagnostics.py's checks: tests/test_diagnostics.py)."""
import dataclasses
import json
import os

import pytest
import torch

import data
from studies import diagnostics
import masking
import model as M
from studies import report
from studies import reproduce as R
from util import checkpoints
import sttp
import train
from conftest import run_objective


def test_every_pretraining_variant_gets_the_same_optimiser_steps():
    batches, warmup = 7, 2
    # the warm-up is plain MIM (one step a batch), then each mode makes its own steps a batch
    steps = {mode: (warmup + (report.pretrain_epochs(mode, warmup, 3) - warmup) * report.steps_per_batch(mode)) * batches
             for mode, _, _ in R.VARIANTS.values() if mode}
    assert len(set(steps.values())) == 1, steps
    assert report.pretrain_epochs("sttp", warmup, 3) == 5 and report.pretrain_epochs("m2im", warmup, 3) == 14


def test_the_equal_epochs_variant_gets_4x_the_steps_of_sttp():
    cfg = R.parse([])
    assert "maskmentor_epochs" not in cfg.variants.split(",")            # not in the default run
    argv = {v: R.pretrain_argv(cfg, R.Spec(v), 0) for v in ("m2im", "maskmentor", "maskmentor_epochs")}
    epochs = {v: int(a[a.index("--epochs") + 1]) for v, a in argv.items()}
    assert epochs["maskmentor_epochs"] == epochs["m2im"] == 1 + 4 * (epochs["maskmentor"] - 1)
    assert argv["maskmentor_epochs"][argv["maskmentor_epochs"].index("--mode") + 1] == "sttp"


def test_bad_flags_are_one_line_errors():
    with pytest.raises(data.UserError, match="kd needs mim"):
        R.parse(["--variants", "kd"])
    with pytest.raises(data.UserError, match="unknown foo"):
        R.parse(["--variants", "mim,foo"])
    with pytest.raises(data.UserError, match="fewer than --batch_size"):
        R.parse(["--finetune_images", "8", "--batch_size", "16"])
    assert R.parse(["--quick", "--seeds", "1"]).seeds == 1          # explicit flags beat --quick's


def _tiny_cfg(tmp_path, **kw):
    cfg = R.parse(["--quick", "--seeds", "1", "--work_dir", str(tmp_path / "runs"), "--out_dir", str(tmp_path / "res"),
                   "--pretrain_images", "32", "--finetune_images", "32", "--test_images", "16"])
    return dataclasses.replace(cfg, **kw)


@pytest.mark.slow
def test_a_run_is_deterministic_with_its_seed(tmp_path):
    a = R.run_variant(_tiny_cfg(tmp_path / "a"), R.Spec("maskmentor"), 0, "pretrain")
    b = R.run_variant(_tiny_cfg(tmp_path / "b"), R.Spec("maskmentor"), 0, "pretrain")
    assert a["steps"] == b["steps"] > 0 and a["images"] == b["images"] == a["steps"] * 16
    wa = torch.load(tmp_path / "a/runs/maskmentor/seed0/pretrain/ckpt.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b/runs/maskmentor/seed0/pretrain/ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra = R.run_variant(_tiny_cfg(tmp_path / "a"), R.Spec("maskmentor"), 0, "finetune")
    rb = R.run_variant(_tiny_cfg(tmp_path / "b"), R.Spec("maskmentor"), 0, "finetune")
    assert ra["clean"] == rb["clean"] and ra["depth holes 30%"] == rb["depth holes 30%"]


def test_budget_counter_counts_steps_and_the_images_behind_each():
    cfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=10)
    net, teacher = M.MaskMentor(cfg), M.MaskMentor(cfg).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    ds = data.build_dataset("synthetic", None, "train", image_size=64)
    batch = data.collate([ds[i] for i in range(4)])
    ocfg = sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=32))
    with R.BudgetCounter() as count:
        run_objective("sttp", net, opt, batch, ocfg, None)                 # 3 teacher + 1 student step
        run_objective("kd", net, opt, batch, ocfg, None, teacher)          # the frozen teacher's forward is not learning
    got = count.summary()
    # the student step of sttp and kd's one step see Algorithm 1's input; each step at lr 1e-4
    assert {k: got[k] for k in ("steps", "images", "images_per_step", "missing_modality_steps")} == \
        {"steps": 5, "images": 20, "images_per_step": [4], "missing_modality_steps": 2}
    assert got["integrated_lr"] == pytest.approx(5e-4) and got["missing_modality_lr"] == pytest.approx(2e-4)


def test_the_kd_teacher_is_frozen_and_separate(tmp_path):
    cfg = dataclasses.replace(M.PRESETS["tiny"], num_classes=10)
    torch.manual_seed(0)
    source = M.MaskMentor(cfg)
    path = str(tmp_path / "ckpt.pt")
    checkpoints.save_checkpoint({"model": source.state_dict(), "config": {}, "kind": "pretrain",
                           "model_config": dataclasses.asdict(cfg)}, path)
    student = M.MaskMentor(cfg)
    student.load_state_dict(source.state_dict())          # even starting from the same weights
    teacher = train.load_teacher(path, cfg, "cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not {p.data_ptr() for p in teacher.parameters()} & {p.data_ptr() for p in student.parameters()}
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ds = data.build_dataset("synthetic", None, "train", image_size=64)
    batch = data.collate([ds[i] for i in range(4)])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    logs = run_objective("kd", student, opt, batch, sttp.ObjectiveConfig(masking=masking.MaskingConfig(budget=32)),
                         torch.Generator().manual_seed(0), teacher)
    assert logs["token"] > 0                                  # a real signal
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


@pytest.mark.slow
def test_quick_runs_everything_end_to_end_and_resumes(tmp_path):
    argv = ["--quick", "--work_dir", str(tmp_path / "runs"), "--out_dir", str(tmp_path / "res")]
    out = R.main(argv)
    for name in ("ablation.md", "ablation.json", "ablation.png"):
        assert (tmp_path / "res" / name).stat().st_size > 0
    summary = out["summary"]
    assert set(summary) == set(R.DEFAULT_VARIANTS)
    pre = {v: (s["pretrain_steps"], s["pretrain_images"]) for v, s in summary.items() if v != "baseline"}
    assert len(set(map(str, pre.values()))) == 1 and len(pre["mim"][0]) == 1, pre     # equal, and per seed too
    assert len({str(s["finetune_steps"]) for s in summary.values()}) == 1
    for r in out["results"]:
        for stage in ("pretrain", "finetune"):
            if r[stage]:
                assert r[stage]["steps"] == r[stage]["optimizer_steps"] and r[stage]["images_per_step"] == [16]
    assert set(summary["maskmentor"]) >= set(diagnostics.DEGRADATIONS) and "depth holes 10%" not in summary["m2im"]
    md = (tmp_path / "res" / "ablation.md").read_text()
    assert "## Table 3" in md and "## Table 4" in md and "56.0 / 46.7 / 33.8" in md and "depth holes 50%" in md
    saved = json.loads((tmp_path / "res" / "ablation.json").read_text())
    assert set(saved["cost"]["per_batch_s"]) == {"mim", "sttp", "kd", "sttp teacher_complete",
                                                 "sttp teacher_masked_fresh"}
    for r in out["results"]:               # every run is scored on validation too, and it is not test
        assert set(r["val"]) == set(report.SETTINGS) and r["val"] != {s: r["clean"][s] for s in report.SETTINGS}
    # the diagnostics: per-class IoU of every variant, held-out checks of every pre-training
    diag = out["diagnostics"]
    assert set(diag["per_class_iou"]) == set(R.DEFAULT_VARIANTS) and set(diag["pretrain"]) == set(R.DEFAULT_VARIANTS) - {"baseline"}
    assert len(diag["per_class_iou"]["mim"]["depth"]) == data.num_classes("synthetic")
    for v, d in diag["pretrain"].items():
        r = d["reconstruction"]
        assert set(r) == {"complete input", "rgb only", "depth only"}
        assert all(0 < x < 10 for losses in r.values() for x in losses.values()), v
        assert d["tokens"]["raw_matched"] < d["tokens"]["raw_other_image"], v
        assert d["tokens"]["grad_share"] > 0, v
        assert ("token_last" in d["train_log"]) == (v in ("maskmentor", "token", "kd"))
    assert "## Diagnostics" in md and "| pillar | depth |" in md
    # A second invocation reuses every finished run and reports the same numbers.
    again = R.main(argv)
    assert again["meta"]["runs_reused"] == again["meta"]["runs"]
    assert again["summary"] == summary


def test_a_finished_run_with_other_settings_is_not_reused(tmp_path):
    out = tmp_path / "mim" / "seed0" / "pretrain"
    out.mkdir(parents=True)
    (out / "budget.json").write_text(json.dumps({"steps": 3, "argv": ["--batch_size", "32"]}))
    assert R._stage(str(out), None, ["--batch_size", "32"])["steps"] == 3          # same settings: reused
    with pytest.raises(data.UserError, match="finished earlier with other settings"):
        R._stage(str(out), None, ["--batch_size", "8"])


def test_a_configuration_is_named_by_its_levels_and_passes_them_all():
    cfg = R.parse(["--token_norm", "center"])
    mm, mim = R.specs(cfg)[3], R.specs(cfg)[1]
    assert mm.name == "maskmentor+center" and mim.name == "mim"
    assert R.Spec("maskmentor", ("teacher_complete", "hidden", "none")).name == "maskmentor+teacher_complete+hidden"
    argv = R.pretrain_argv(cfg, mm, 0)
    for flag, level in [("--token_target", "last_teacher_step"), ("--token_positions", "all"), ("--token_norm", "center")]:
        assert argv[argv.index(flag) + 1] == level
    assert "--token_norm" not in R.pretrain_argv(cfg, mim, 0)
    assert R.run_dir(cfg, mm, 1).endswith(os.path.join("maskmentor+center", "seed1"))


def per_config(**scores):
    return {n: {"score": s} for n, s in scores.items()}


def test_the_selection_rule():
    costs = {"a": 1.0, "b": 1.0, "c": 2.0, "d": 1.03}
    # the best wins when nothing is within one pooled std of it
    assert report.select(["a", "b"], per_config(a=(50.0, 0.5), b=(48.0, 0.5)), costs) == "a"
    # c is best, a is within one pooled std (sqrt((1^2 + 1^2)/2) = 1) and cheaper: a
    assert report.select(["a", "c"], per_config(a=(50.0, 1.0), c=(50.9, 1.0)), costs) == "a"
    # ... but not when it is more than one pooled std below
    assert report.select(["a", "c"], per_config(a=(49.0, 1.0), c=(50.9, 1.0)), costs) == "c"
    # equally cheap (within 5 %): the higher score
    assert report.select(["a", "d"], per_config(a=(50.0, 1.0), d=(50.5, 1.0)), costs) == "d"


def fake_result(spec, seed, rgb, depth):
    clean = {s: {"miou": 60.0 + seed, "macc": 70.0} for s in report.SETTINGS}
    val = {"rgbd": {"miou": 60.0}, "rgb": {"miou": rgb + 0.1 * seed}, "depth": {"miou": depth - 0.1 * seed}}
    tokens = {"grad_share": 0.1, "centred_matched": 0.5, "centred_other_image": 1.0}
    return {"variant": spec.variant, "name": spec.name, "seed": seed, "val": val, "clean": clean,
            "pretrain": {"seconds": 60.0}, "finetune": {"seconds": 30.0}, "eval_seconds": 5.0,
            "diagnostics": {"pretrain": {"tokens": tokens, "train_log": {"token_last": 0.1}}}}


def test_the_token_study_chooses_on_validation_and_runs_the_combination(tmp_path, monkeypatch):
    """The study's flow with the training replaced by fixed scores: `missing` and
    `standardize` are each their factor's best, so their combination is run, and it wins."""
    val = {"maskmentor": 40, "maskmentor+missing": 43, "maskmentor+standardize": 42,
           "maskmentor+missing+standardize": 45}
    asked = []

    def run_all(cfg, runs):
        asked.append(list(dict.fromkeys(sp.name for sp, _ in runs)))
        assert [s for _, s in runs] == [0, 1, 2] * len(asked[-1])
        return [fake_result(sp, s, val.get(sp.name, 39), val.get(sp.name, 39)) for sp, s in runs]

    monkeypatch.setattr(R, "run_all", run_all)
    monkeypatch.setattr(R, "measure_cost", lambda cfg, repeats: {"per_batch_s": {
        "mim": 1.0, "sttp": 4.0, "kd": 1.3, "sttp teacher_complete": 6.0, "sttp teacher_masked_fresh": 4.6}})
    out = R.main(["--study", "token", "--work_dir", str(tmp_path / "runs"), "--out_dir", str(tmp_path / "res")])
    assert len(asked[0]) == 7 and asked[1] == ["maskmentor+missing+standardize"]
    assert out["factor_best"] == ["maskmentor", "maskmentor+missing", "maskmentor+standardize"]
    assert out["chosen"] == "maskmentor+missing+standardize"
    md = (tmp_path / "res" / "token_study.md").read_text()
    assert "**Chosen (the rule over every configuration above): `maskmentor+missing+standardize`.**" in md


@pytest.mark.parametrize("mode,schedule", [("sttp", "steps"), ("m2im", "batches"), ("sttp", "batches")])
def test_the_counted_lr_is_the_schedules(tmp_path, mode, schedule):
    """The integrated lr and the missing-modality steps BudgetCounter counts in a run are
    what report.integrated_lr computes from the schedule and the objectives' declared steps;
    on the step schedule a self-teaching run and a one-step run get the same total."""
    argv = ["--mode", mode, "--subset", "32", "--batch_size", "16", "--epochs", "3", "--warmup_epochs", "1",
            "--vis_every", "0", "--lr_schedule", schedule, "--out_dir", str(tmp_path)]
    with R.BudgetCounter() as count:
        train.main(argv)
    got = count.summary()
    want = report.integrated_lr(mode, 1, 3, 2, 1e-3, 0.0, train.TRAIN_PRESETS["tiny"]["lr_warmup_epochs"], schedule)
    assert (got["steps"], got["missing_modality_steps"]) == (want["steps"], want["missing_steps"])
    assert got["integrated_lr"] == pytest.approx(want["lr"], rel=1e-9)
    assert got["missing_modality_lr"] == pytest.approx(want["missing_lr"], rel=1e-9)
    one_step = report.integrated_lr("m2im", 1, 1 + 2 * report.steps_per_batch(mode), 2, 1e-3, 0.0, 0.5, schedule)
    if schedule == "steps":
        assert want["lr"] == pytest.approx(one_step["lr"])


def test_the_regime_specs_name_their_runs_and_pass_their_flags():
    cfg = R.parse(["--study", "regime", "--quick"])
    assert cfg.seeds == 2 and cfg.foundation_images == 64                    # --quick's, over the study's 5
    assert R.parse(["--study", "regime"]).seeds == 5 and R.parse(["--study", "regime"]).out_dir == "results/regime"
    adapt = R.Spec("m2im", regime="adapt", lr=3e-4, schedule="steps", inputs="rgb", layer_decay=0.001)
    assert adapt.name == "m2im+lr0.0003+steps+adapt" and adapt.finetune_dir == "finetune-rgb-ld0.001"
    pre, ft = R.pretrain_argv(cfg, adapt, 1), R.finetune_argv(cfg, adapt, 1)
    assert pre[pre.index("--init") + 1] == R.foundation_ckpt(cfg, 1) and pre[pre.index("--lr") + 1] == "0.0003"
    assert ft[ft.index("--inputs") + 1] == "rgb" and ft[ft.index("--layer_decay") + 1] == "0.001"
    # the foundation fine-tuned directly; no pre-training lr or schedule for it
    none = R.Spec("baseline", regime="adapt", lr=3e-4, schedule="steps")
    assert none == R.Spec("baseline", regime="adapt") and none.name == "baseline+adapt"
    ft = R.finetune_argv(cfg, none, 0)
    assert ft[ft.index("--pretrained") + 1] == R.foundation_ckpt(cfg, 0)
    f = R.pretrain_argv(cfg, R.FOUNDATION, 0)
    assert f[f.index("--split") + 1] == "pool" and f[f.index("--mode") + 1] == "mim"
    # what waits for what: an adapt run's pre-training waits for the foundation, tw0 adds its flag
    order = [(sp.name, s, st) for sp, s, st in R.tasks([(adapt, 0), (R.Spec("tw0"), 0)])]
    assert order.index(("foundation", 0, "pretrain")) < order.index((adapt.name, 0, "pretrain"))
    assert "--token_weight" in R.pretrain_argv(cfg, R.Spec("tw0"), 0)


def test_the_regime_study_chooses_its_lr_on_validation_then_runs_every_row(tmp_path, monkeypatch):
    """The study's flow with the training replaced by fixed scores: the pilot's lr with the
    best validation score is chosen (3e-4 here), every later adapt run uses it, each row has
    the protocol's seeds, and the report pairs the variants by seed."""
    asked = []

    def run_all(cfg, runs):
        asked.append(runs)
        out = []
        for sp, s in runs:
            bump = {"m2im": 1.0, "maskmentor": 2.0}.get(sp.variant, 0.0) + (5.0 if sp.lr == 3e-4 else 0.0)
            r = fake_result(sp, s, 40 + bump, 50 + bump)
            r["clean"] = {c: {"miou": 60.0 + bump + s} for c in R.evaluate.SETTINGS}
            r.update({f: getattr(sp, f) for f in ("regime", "lr", "schedule", "inputs", "layer_decay")})
            r["pretrain"].update(integrated_lr=0.5, missing_modality_lr=0.1, missing_modality_steps=3)
            out.append(r)
        return out

    monkeypatch.setattr(R, "run_all", run_all)
    monkeypatch.setattr(diagnostics, "loss_log", lambda path, batches: {"first": 2.0, "last": 1.0, "last_epoch_drop": 0.01})
    out = R.main(["--study", "regime", "--work_dir", str(tmp_path / "runs"), "--out_dir", str(tmp_path / "res")])
    assert out["chosen_lr"] == 3e-4
    pilot, rows = asked
    assert {(sp.variant, sp.lr) for sp, _ in pilot if sp.variant != "baseline"} == \
        {(v, lr) for v in ("mim", "m2im") for lr in R.PILOT_LRS}
    assert {s for sp, s in pilot if sp.variant == "mim"} == {0, 1}
    adapt = [sp for sp, _ in rows if sp.regime == "adapt"]
    assert adapt and all(sp.lr == 3e-4 and sp.schedule == "steps" for sp in adapt)
    seeds = lambda **kw: sorted(s for sp, s in pilot + rows
                                if all(getattr(sp, k) == v for k, v in kw.items()))
    assert seeds(variant="maskmentor", regime="adapt") == [0, 1, 2, 3, 4]
    assert seeds(variant="mim", regime="adapt", inputs="rgb") == [0, 1, 2, 3, 4]
    assert seeds(variant="m2im", regime="adapt", layer_decay=R.NEAR_FROZEN) == [0, 1, 2]
    assert seeds(variant="m2im", regime="scratch") == [0, 1, 2]
    md = (tmp_path / "res" / "regime.md").read_text()
    assert "| 0.0003 (chosen) |" in md and "| M²IM − MIM | **+1.00 ± 0.00**" in md
    n = len(out["runs"])   # each fake run: 60 s pre-training + 30 s fine-tuning + 5 s evaluation
    assert f"runs; their own time summed: {n * 95 / 60:.0f} min" in md
    assert (tmp_path / "res" / "regime.png").is_file() and (tmp_path / "res" / "regime.json").is_file()


def test_the_schedule_study_arms_get_equal_budgets():
    """Every arm of results/schedule/PROTOCOL.md: the same optimiser steps (epochs x steps per
    batch at its --teacher_iters), the flags the protocol names, the seeds it gives it."""
    cfg = R.parse(["--study", "schedule"])
    specs = R.schedule_specs(cfg, 1e-3)
    steps = {}
    for sp, seed in specs:
        argv = R.pretrain_argv(cfg, sp, seed)
        ti = int(argv[len(argv) - argv[::-1].index("--teacher_iters")])      # the last one given
        epochs, warm = int(argv[argv.index("--epochs") + 1]), int(argv[argv.index("--warmup_epochs") + 1])
        steps[sp.variant] = warm + (epochs - warm) * report.steps_per_batch(report.VARIANTS[sp.variant][0], ti)
        assert "--init" in argv and argv[argv.index("--lr") + 1] == "0.001"
    assert len(set(steps.values())) == 1, steps
    argv = lambda v: R.pretrain_argv(cfg, next(sp for sp, _ in specs if sp.variant == v), 0)
    assert argv("kd_foundation")[argv("kd_foundation").index("--teacher") + 1] == R.foundation_ckpt(cfg, 0)
    last = lambda a, flag: a[len(a) - a[::-1].index(flag)]             # the value of its last occurrence
    assert last(argv("self_fresh"), "--teacher_iters") == "0" and last(argv("self_fresh"), "--token_target") == \
        "teacher_complete"
    assert last(argv("tw0_ti1"), "--teacher_iters") == "1" and last(argv("tw0_ti1"), "--token_weight") == "0"
    assert "rgb,depth" in argv("mim_rgbd") and "--token_target" not in argv("mim_rgbd")
    seeds = {}
    for sp, s in specs:
        seeds.setdefault(sp.variant, set()).add(s)
    assert all(len(seeds[v]) == 5 for v in R.SCHEDULE_KEY + R.SCHEDULE_A + R.SCHEDULE_B + R.SCHEDULE_C)
    assert all(len(seeds[v]) == 3 for v in R.SCHEDULE_D)


def _schedule_runs(effects, seeds=5):
    """Fake schedule-study runs: per arm a test/val mIoU of 50 + its effect on rgb only (0 on
    the other inputs) + a per-seed term shared by every arm (what pairing by seed removes) +
    a small arm-and-seed-specific term, with the diagnostics and budgets real runs carry."""
    runs = []
    for a, (v, eff) in enumerate(effects.items()):
        for s in range(seeds):
            noise = 0.05 * ((7 * s + 3 * a) % 5 - 2)
            score = {c: 50.0 + s + (eff + noise if c == "rgb" else 0.0) for c in report.SETTINGS}
            per_class = [score["rgb"]] * len(report.rooms.SYNTHETIC_CLASSES)
            clean = {c: {"miou": m, "macc": m, "per_class_iou": per_class} for c, m in score.items()}
            runs.append({"variant": v, "name": v, "seed": s, "regime": "adapt", "lr": 1e-3, "inputs": "any",
                         "layer_decay": 0.0, "schedule": "steps", "clean": clean,
                         "val": {c: {"miou": m} for c, m in score.items()}, "eval_seconds": 5.0,
                         "finetune": {"seconds": 30.0},
                         "pretrain": {"seconds": 60.0, "optimizer_steps": 1683, "images": 13464, "integrated_lr": 0.8,
                                      "missing_modality_steps": 374, "missing_modality_lr": 0.2},
                         "diagnostics": {"pretrain": {"reconstruction": {"rgb only": {"depth": 0.5}},
                                                      "tokens": {"raw_matched": 0.1, "raw_other_image": 0.3,
                                                                 "grad_share": 0.2}}}})
    return runs


def _arms(runs):
    return lambda v: report.runs_of(runs, variant=v, regime="adapt", lr=1e-3)


def test_the_schedule_verdicts_follow_the_protocols_rules():
    """Made-up effects with known answers: dilution and repetition each half of tw0's deficit
    and additive; KD clearly helps, the fresh target harms, the STTP token loss is within
    noise; M²IM's gain halves without label maps; KD above M²IM on rgb only and level
    elsewhere, so it is the one flagged."""
    effects = {"m2im": 0.0, "mim": -1.0, "tw0": -1.2, "mix25": -0.6, "m2im_x4": -0.6, "kd_foundation": 1.0,
               "self_fresh": -1.0, "maskmentor": -1.2, "m2im_rgbd": -1.5, "mim_rgbd": -2.0,
               "tw0_ti1": -0.6, "maskmentor_ti1": -0.6}
    text = "\n".join(report.schedule_verdicts(_arms(_schedule_runs(effects))))
    assert "**Dilution** (mix25 − M²IM) -0.60" in text and text.count(": explains the deficit") == 2
    assert "The two **add up**" in text
    assert "frozen foundation (KD): **helps**, +1.00" in text and "complete forward: **harms**, -1.00" in text
    assert "(MaskMentor − tw0): **no effect detectable at this n**, +0.00" in text
    assert "EMA teacher: not run." in text
    assert "**survives without label maps**: M²IM − MIM +0.50" in text and "survives 50%" in text
    assert "A flag: M²IM + token loss to the frozen foundation is clearly above M²IM" in text

    effects.update(mix25=-0.2, kd_foundation=0.0, m2im_rgbd=-2.0)   # dilution too small; no gain left
    text = "\n".join(report.schedule_verdicts(_arms(_schedule_runs(effects))))
    assert "(mix25 − M²IM) -0.20 (95 % CI" in text and text.count(": does not explain") == 1
    assert "The two **do not add up**" in text
    assert "**does not survive without label maps**" in text and "A flag: none" in text


def test_write_schedule_reports_every_arm_and_run(tmp_path):
    """The whole report from fake runs: every arm of the protocol has its row, every run its
    line, the rules' verdicts come first, the chart is written."""
    effects = {v: 0.0 for v in report.SCHEDULE_ARMS}
    runs = _schedule_runs(effects, seeds=3)
    cfg = dataclasses.asdict(R.parse(["--study", "schedule"]))
    study = {"config": cfg, "runs": runs, "chosen_lr": 1e-3, "pilot_lrs": [1e-3], "regime_pilot": {"0.0003": 60.0},
             "foundation": [{"first": 3.0, "last": 1.5, "last_epoch_drop": 0.02}] * 3,
             "meta": {"runs": len(runs), "run_minutes": report.run_seconds(runs) / 60, "wall_minutes": 1.0,
                      "machine": "test"}}
    md, png = tmp_path / "schedule.md", tmp_path / "schedule.png"
    report.write_schedule(study, str(md), str(png))
    text = md.read_text()
    assert text.index("## What the protocol's rules say") < text.index("## Step 0")
    for v in report.SCHEDULE_ARMS:
        assert f"| {report.VARIANTS[v][1]} | 50.0 " in text or f"| {report.VARIANTS[v][1]} | 51.0 " in text
    assert sum(line.startswith("| ") and " | 0.001 | " in line for line in text.splitlines()) == len(runs)
    assert f"their own time summed: {len(runs) * 95 / 60:.0f} min" in text and png.is_file()
