"""train.py — MaskMentor pre-training (paper §3.5): a MIM warm-up, then STTP.

    python train.py                                 # tiny model on the embedded synthetic data
    python train.py --dataset nyu --config base     # the paper's setting (GPU)
    python train.py --mode m2im                     # an ablation row of Table 3
    python train.py --modalities rgb,depth          # pre-train without semantic maps as input
    python train.py --resume                        # continue out/pretrain/ckpt.pt exactly
    torchrun --nproc_per_node 4 train.py --config base --dtype bfloat16   # 4 GPUs

Every flag is a field of `TrainConfig` below (`python train.py --help`, docs/cli.md);
`--config` picks the model preset and that preset's training defaults, other flags
override them. The first `warmup_epochs` epochs train plain MIM on complete modalities,
the rest use `--mode` (default sttp): one objective of sttp.py per batch. The loop,
checkpoints and exact resume are util/engine.py's; how each iteration runs (torchrun,
micro-batches, precision, compile) util/runtime.py's. Every `--vis_every` epochs it also
draws the paper's Figure 4 (util/vis.py): what the network reconstructs from complete,
rgb-only and depth-only input, on the same test images.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

import data
import masking
import model as M
import modalities
import sttp
from util import ops, vis
from util.checkpoints import init_encoder, load_checkpoint, load_weights
from util.cli import UserError, arg, check_numbers, pick_device, run_cli, write_png
from util.engine import Loop, to_device
from util.lr_sched import param_groups
from util.runs import RUN_CONTROL, check_common_flags, check_out_dir, start_run, training_set
from util.runtime import DTYPES, Runtime, autocast_dtype, grad_scaler, init_distributed


# The objectives' defaults, written once in the method (sttp.ObjectiveConfig).
OBJECTIVE = sttp.ObjectiveConfig()


@dataclass
class TrainConfig:
    """MaskMentor pre-training: MIM warm-up on complete modalities, then --mode."""
    dataset: str = arg("synthetic", "dataset to pre-train on", data.DATASETS)
    data_root: str = arg("", "dataset folder (default: data/<dataset>)")
    split: str = arg("train", "what to pre-train on: the training split, or the synthetic rooms' pool "
                     "(8000 scenes apart from train/val/test, for a foundation to start from: results/regime/)",
                     ("train", "pool"))
    subset: int = arg(0, "use only the first N training images (0 = all)")
    cues: float = arg(0.0, "synthetic rooms: strength of their cross-modal cues, 0 (none) to 1 (util/rooms.py)")
    config: str = arg("tiny", "model preset and its training defaults", tuple(M.PRESETS))
    init: str = arg("", "weights to start from: a MultiMAE, MAE or timm ViT-B, or a ckpt.pt of train.py "
                        "(MultiMAE-shaped: its encoder and MIM heads load); third-party weights keep their own "
                        "licences (MultiMAE's and MAE's: CC BY-NC 4.0, non-commercial)")
    mode: str = arg("sttp", "objective after the warm-up (docs/cli.md: the objectives)", sttp.OBJECTIVES)
    modalities: str = arg(",".join(modalities.DEFAULT), "comma-separated pre-training inputs, rows of "
                          "modalities.MODALITIES (e.g. rgb,depth: no semantic maps)")
    warmup_epochs: int = arg(1, "epochs of plain MIM on complete modalities first (paper: ~100)")
    epochs: int = arg(4, "total epochs, warm-up included (paper: 100 + 400); more on --resume extends the run, "
                       "its cosine recomputed over the new total from the current step")
    batch_size: int = arg(32, "images per batch, over all processes under torchrun (paper: 12)")
    lr: float = arg(1e-3, "peak learning rate (paper: 1e-5)")
    min_lr: float = arg(0.0, "final learning rate of the cosine schedule")
    lr_warmup_epochs: float = arg(0.5, "linear learning-rate warm-up from 0, in epochs")
    lr_schedule: str = arg("batches", "what the warm-up and cosine count: batches, or optimiser steps (then "
                           "objectives with 4 and 1 steps a batch get the same lr at every step: results/regime/)",
                           ("batches", "steps"))
    weight_decay: float = arg(0.05, "AdamW weight decay (MultiMAE's value; biases, norms, tokens exempt: ours)")
    image_size: int = arg(64, "training crop size")
    budget: int = arg(32, "visible tokens over all modalities (MultiMAE: 98 of 3x196)")
    alpha: float = arg(1.0, "Dirichlet concentration of the token split (MultiMAE: 1)")
    p_drop: float = arg(0.5, "p_m, modality drop probability of Algorithm 1 (paper: 0.5)")
    patch_masking: str = arg("dirichlet", "patch masking of the kept modalities", ("dirichlet", "mae"))
    mask_ratio: float = arg(0.75, "per-modality mask ratio, only with --patch_masking mae")
    at_least_one_dropped: bool = arg(False, "Figure 2's caption: the student always misses a modality")
    teacher_iters: int = arg(OBJECTIVE.teacher_iters, "teacher iterations per student iteration (sttp, token)")
    token_weight: float = arg(OBJECTIVE.token_weight, "weight of the token loss")
    token_target: str = arg(OBJECTIVE.token_target, "where the token targets come from (docs/method.md D4)",
                            tuple(sttp.TOKEN_TARGETS))
    token_positions: str = arg(OBJECTIVE.token_positions, "where the token loss is taken (D5)",
                               tuple(sttp.TOKEN_POSITIONS))
    token_norm: str = arg(OBJECTIVE.token_norm, "normalisation of the tokens before the cosine (D6; chosen on "
                          "validation, results/token_study/)", tuple(sttp.TOKEN_NORMS))
    teacher: str = arg("", "--mode kd: checkpoint of the separately pre-trained frozen teacher")
    clip_grad: float = arg(0.0, "gradient-norm clipping (0 = off)")
    seed: int = arg(0, "seed of data order, masking and initialisation")
    out_dir: str = arg("out/pretrain", "where ckpt.pt, log.jsonl, loss_curve.png and recon_*.png go")
    vis_every: int = arg(1, "write a reconstruction picture (Figure 4) every N epochs and at the end; 0 = never")
    resume: bool = arg(False, "continue the run saved in out_dir/ckpt.pt")
    overwrite: bool = arg(False, "start over in an --out_dir that holds a run (its checkpoint and logs are replaced)")
    grad_ckpt: bool = arg(False, "recompute encoder activations in the backward (less memory, ~30 % more time)")
    accum_steps: int = arg(1, "split each batch into this many micro-batches whose gradients add up to one "
                                "optimiser step: the same step, less memory (docs/guide.md)")
    stop_after: int = arg(0, "stop (with a checkpoint) after this many batches; 0 = run to the end")
    ckpt_every: int = arg(0, "also checkpoint every N batches (0 = at the end of each epoch)")
    workers: int = arg(0, "DataLoader worker processes")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = arg("float32", "autocast dtype; float16 adds loss scaling", tuple(DTYPES))
    compile: bool = arg(False, "torch.compile the network, masking and losses, one whole graph; "
                               "AdamW's fused kernel (util/runtime.py)")


TRAIN_PRESETS = {
    # Whole pipeline in minutes on 2 CPU cores (README's results table).
    "tiny": dict(image_size=64, budget=32, batch_size=32, lr=1e-3, epochs=4, warmup_epochs=1,
                 lr_warmup_epochs=0.5),
    # The paper's §4.1 (docs/method.md §4): ViT-B at 224, batch 12, lr 1e-5 cosine, 100 + 400 epochs.
    "base": dict(image_size=224, budget=98, batch_size=12, lr=1e-5, epochs=500, warmup_epochs=100,
                 lr_warmup_epochs=0.0, vis_every=20),
}


def validate(cfg: TrainConfig) -> None:
    patch = check_common_flags(cfg, positive=("budget", "alpha"),
                               non_negative=("vis_every", "token_weight", "teacher_iters"))
    check_numbers(cfg, unit=("p_drop", "mask_ratio"))
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise UserError(f"--warmup_epochs must be in [0, --epochs={cfg.epochs}], got {cfg.warmup_epochs}")
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise UserError(f"--mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
    n = (cfg.image_size // patch) ** 2
    if cfg.budget > n:
        raise UserError(f"--budget {cfg.budget} exceeds the {n} tokens of one modality")
    if cfg.at_least_one_dropped and cfg.p_drop == 0:
        raise UserError("--at_least_one_dropped needs --p_drop > 0")
    try:
        names = modalities.check(cfg.modalities.split(","))
    except ValueError as e:
        raise UserError(f"--modalities {cfg.modalities}: {e}")
    if not modalities.segmenter_inputs(names):          # finetune.py would have nothing to segment from
        takes = modalities.segmenter_inputs(modalities.MODALITIES)
        raise UserError(f"--modalities {cfg.modalities}: none of them is an input a segmenter takes "
                        f"({', '.join(takes)}), so finetune.py could not use this pre-training")
    objective = sttp.OBJECTIVES[cfg.mode]
    if len(names) < 2 and objective.drops_modalities:
        raise UserError(f"--mode {cfg.mode} drops modalities and needs at least two, got --modalities {cfg.modalities}")
    token_flags = [f"--{n}" for n in ("token_target", "token_positions", "token_norm")
                   if getattr(cfg, n) != getattr(TrainConfig, n)]
    if token_flags and not objective.token_loss:
        with_token = ", ".join(m for m, o in sttp.OBJECTIVES.items() if o.token_loss)
        raise UserError(f"{', '.join(token_flags)}: the token loss belongs to --mode {with_token}, not {cfg.mode}")
    if objective.teacher and not cfg.teacher:
        raise UserError(f"--mode {cfg.mode} needs --teacher PATH (a pre-training checkpoint, e.g. from "
                        f"--mode {objective.teacher})")
    if cfg.teacher and not objective.teacher:
        raise UserError(f"--teacher is the frozen teacher of --mode "
                        f"{', '.join(m for m, o in sttp.OBJECTIVES.items() if o.teacher)}; --mode {cfg.mode} has none")
    if cfg.teacher_iters == 0 and cfg.token_target == "last_teacher_step" and objective.token_loss \
            and not objective.teacher:
        raise UserError(f"--teacher_iters 0: --mode {cfg.mode} then has no teacher iteration whose tokens could be "
                        f"the target; give --token_target teacher_complete or teacher_masked_fresh")


def objective_config(cfg: TrainConfig) -> sttp.ObjectiveConfig:
    mc = masking.MaskingConfig(budget=cfg.budget, alpha=cfg.alpha, p_drop=cfg.p_drop,
                               patch_masking=cfg.patch_masking, mask_ratio=cfg.mask_ratio,
                               at_least_one_dropped=cfg.at_least_one_dropped)
    return sttp.ObjectiveConfig(masking=mc, teacher_iters=cfg.teacher_iters, token_weight=cfg.token_weight,
                                token_target=cfg.token_target, token_positions=cfg.token_positions,
                                token_norm=cfg.token_norm)


def load_teacher(path: str, model_cfg: M.ModelConfig, device) -> M.MaskMentor:
    ckpt = load_checkpoint(path, "pretrain")
    tcfg = M.ModelConfig.from_dict(ckpt["model_config"])
    if tcfg != model_cfg:
        raise UserError(f"{path}: the teacher's model config differs from the student's")
    teacher = M.MaskMentor(tcfg)
    load_weights(teacher, ckpt, path)
    return teacher.to(device).eval().requires_grad_(False)


def picture_batch(cfg, device, n: int = 2) -> dict:
    """The images every reconstruction picture shows: the first n of the test split (the
    training split if there is no test split), unaugmented, centre-cropped to the
    training size. The same images every time, so the pictures show training progress."""
    try:
        dataset = data.build_dataset(cfg.dataset, cfg.data_root or None, "test", image_size=cfg.image_size,
                                     cues=cfg.cues)
    except UserError:
        dataset = data.build_dataset(cfg.dataset, cfg.data_root or None, "train", image_size=cfg.image_size,
                                     cues=cfg.cues)
    samples = [data.center_crop(dataset[i], cfg.image_size) for i in range(min(n, len(dataset)))]
    return to_device(data.collate(samples), device)


def main(argv=None):
    cfg, ckpt = start_run(TrainConfig, argv, TRAIN_PRESETS, RUN_CONTROL, "pretrain")
    validate(cfg)
    rank, _, device = init_distributed(pick_device(cfg.device))
    dtype = autocast_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    # Seeded alike in every process: masking is drawn for the global batch (util/runtime.py).
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    dataset = training_set(cfg, augmentation="pretrain", split=cfg.split)
    model_cfg = dataclasses.replace(M.PRESETS[cfg.config], image_size=cfg.image_size,
                                    num_classes=data.num_classes(cfg.dataset),
                                    modalities=tuple(cfg.modalities.split(",")))
    net = M.MaskMentor(model_cfg).to(device)
    if cfg.init and ckpt is None:      # a resumed run finds these weights in its own checkpoint
        init_encoder(net, cfg.init)
    teacher = load_teacher(cfg.teacher, model_cfg, device) if sttp.OBJECTIVES[cfg.mode].teacher else None
    scaler = grad_scaler(dtype, device)
    runtime = Runtime(device, dtype, scaler, cfg.clip_grad, accum_steps=cfg.accum_steps, compile=cfg.compile)
    optimizer = torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                  **runtime.optimizer_options())
    ocfg = objective_config(cfg)
    check_out_dir(cfg)                 # last of the checks, before any work (never lose a run)
    phase = lambda epoch: "mim" if epoch < cfg.warmup_epochs else cfg.mode
    per_batch = lambda epoch: sttp.OBJECTIVES[phase(epoch)].steps_per_batch(ocfg)
    loop = Loop(cfg, net, optimizer, dataset, generator, device,
                extra={"kind": "pretrain", "model_config": dataclasses.asdict(model_cfg),
                       "data": data.conventions(cfg.dataset, cfg.image_size, cfg.cues)}, scaler=scaler,
                steps_per_batch=per_batch if cfg.lr_schedule == "steps" else None)
    if ckpt is not None:
        loop.resume(ckpt)
    net.grad_ckpt = cfg.grad_ckpt
    # Under torchrun DDP must be told when a step may leave parameters without gradient
    # (--mode token: sttp.OBJECTIVES says which objectives do; tests/test_distributed.py).
    model = runtime.wrap(net, find_unused_parameters=sttp.OBJECTIVES[cfg.mode].unused_parameters)

    split = f" {cfg.split} split" if cfg.split != "train" else ""        # e.g. the foundation pool
    print(f"pre-training {cfg.config} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters) "
          f"on {cfg.dataset}{split} ({len(dataset)} images) on {device}; {ops.backend()}")
    print(f"schedule: {cfg.warmup_epochs} MIM warm-up epoch(s), then {cfg.epochs - cfg.warmup_epochs} "
          f"epoch(s) of {cfg.mode}; the lr per {'optimiser step' if cfg.lr_schedule == 'steps' else 'batch'}; "
          f"output in {cfg.out_dir}")

    def step(batch, epoch):
        return runtime.run_objective(sttp.OBJECTIVES[phase(epoch)], model, optimizer, batch, ocfg, generator, teacher)

    after_epoch = lambda done: None
    if cfg.vis_every and rank == 0:
        shown = picture_batch(cfg, device)
        names, palette = data.CLASS_NAMES[cfg.dataset], data.palette(cfg.dataset)

        def after_epoch(done):
            if done % cfg.vis_every == 0 or done == cfg.epochs:
                path = os.path.join(cfg.out_dir, f"recon_epoch{done:03d}.png")
                write_png(path, vis.reconstruction_figure(net, shown, ocfg.masking, cfg.seed, palette, names))

    net.train()
    loop.run(step, phase, after_epoch)
    return net


if __name__ == "__main__":
    run_cli(main)
