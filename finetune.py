"""finetune.py — fine-tune for RGB-D segmentation with missing modalities (paper §3.2, §3.5).

    python finetune.py                          # from out/pretrain/ckpt.pt (train.py's output)
    python finetune.py --pretrained none        # Table 3's "baseline": no multimodal pre-training
    python finetune.py --dataset nyu --config base
    python finetune.py --inputs rgb             # a dedicated rgb-only model (Table 2's reference)

The MIM heads and the semseg input adapter are discarded; the encoder, global token and
rgb/depth input adapters come from the pre-training checkpoint, and a randomly
initialised ConvNeXt head is added (model.Segmenter). Each training sample independently
sees rgb only, depth only, or both (`--p_missing`, default 2/3: one third each), so one
network learns every input condition; the loss is cross-entropy with 255 ignored.
`--inputs rgbd|rgb|depth` instead trains a dedicated model that always sees exactly those
inputs (a dedicated rgb or depth model has only that input adapter): what a model trained
for one input condition reaches, against which the joint model's loss is measured.
The checkpoint goes to `<out_dir>/ckpt.pt`; evaluate.py finds it there by default.
Same loop, checkpoints and resume as train.py (util/engine.py), and the same
`torchrun --nproc_per_node N finetune.py ...` with a global --batch_size (util/runtime.py).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

import data
import model as M
import modalities
from util import ops
from util.checkpoints import init_encoder, load_checkpoint
from util.cli import UserError, arg, check_numbers, pick_device, run_cli
from util.degrade import sample_present      # which inputs each sample shows (D9)
from util.engine import Loop
from util.lr_sched import param_groups
from util.runs import RUN_CONTROL, check_common_flags, check_out_dir, start_run, training_set
from util.runtime import DTYPES, Runtime, autocast_dtype, grad_scaler, init_distributed


@dataclass
class FinetuneConfig:
    """Fine-tune encoder + ConvNeXt head on rgb-only / depth-only / rgb+depth samples."""
    dataset: str = arg("synthetic", "dataset to fine-tune on", data.DATASETS)
    data_root: str = arg("", "dataset folder (default: data/<dataset>)")
    subset: int = arg(0, "use only the first N training images (0 = all)")
    cues: float = arg(0.0, "synthetic rooms: strength of their cross-modal cues, 0 (none) to 1 (util/rooms.py)")
    pretrained: str = arg("out/pretrain/ckpt.pt", "pre-training checkpoint (ckpt.pt, or an exported .safetensors "
                          "with its .json), or 'none' for the baseline")
    init: str = arg("", "ViT-B checkpoint (MultiMAE, MAE or timm) to initialise the encoder from; third-party "
                        "weights keep their own licences (MultiMAE's and MAE's: CC BY-NC 4.0, non-commercial)")
    config: str = arg("tiny", "model preset (default: the pre-training checkpoint's)", tuple(M.PRESETS))
    epochs: int = arg(6, "epochs (paper: 500); more on --resume extends the run, its cosine recomputed over the "
                       "new total from the current step")
    batch_size: int = arg(32, "images per batch, over all processes under torchrun (paper: 2)")
    lr: float = arg(1e-3, "peak learning rate (paper: 3e-5)")
    min_lr: float = arg(0.0, "final learning rate of the cosine schedule")
    lr_warmup_epochs: float = arg(0.5, "linear learning-rate warm-up from 0, in epochs")
    weight_decay: float = arg(0.05, "AdamW weight decay (MultiMAE)")
    layer_decay: float = arg(0.75, "lr factor per encoder block towards the input (MultiMAE: 0.75)")
    drop_path: float = arg(0.0, "stochastic depth in the encoder (MultiMAE: 0.1)")
    image_size: int = arg(64, "training crop size")
    inputs: str = arg("any", "what the model sees: any = each sample rgb only, depth only or both (--p_missing); "
                      "rgbd, rgb, depth = a dedicated model that always sees exactly those (Table 2)",
                      ("any",) + tuple(modalities.INPUT_CONDITIONS))
    p_missing: float = arg(2 / 3, "--inputs any: probability that a sample misses rgb or depth (either, equally)")
    clip_grad: float = arg(0.0, "gradient-norm clipping (0 = off)")
    seed: int = arg(0, "seed of data order, modality choice and head initialisation")
    out_dir: str = arg("out/finetune", "where ckpt.pt, log.jsonl and loss_curve.png go")
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
    compile: bool = arg(False, "torch.compile the network and its loss, one whole graph; "
                               "AdamW's fused kernel (util/runtime.py)")


FINETUNE_PRESETS = {
    "tiny": dict(epochs=6, batch_size=32, lr=1e-3, image_size=64, drop_path=0.0, lr_warmup_epochs=0.5),
    # Paper §4.1: 500 epochs, lr 3e-5 cosine, batch 2; MultiMAE's 640 crops, layer decay
    # 0.75 and drop path 0.1 for what the paper leaves unsaid (docs/method.md, D12).
    "base": dict(epochs=500, batch_size=2, lr=3e-5, image_size=640, drop_path=0.1, lr_warmup_epochs=1.0),
}


def validate(cfg: FinetuneConfig) -> None:
    check_common_flags(cfg)
    check_numbers(cfg, unit=("p_missing",), finite=("layer_decay", "drop_path"))
    if not 0.0 < cfg.layer_decay <= 1.0:
        raise UserError(f"--layer_decay must be in (0, 1], got {cfg.layer_decay}")
    if not 0.0 <= cfg.drop_path < 1.0:
        raise UserError(f"--drop_path must be in [0, 1), got {cfg.drop_path}")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy over labelled pixels (255 ignored), 0 for a batch with none. `count`: the
    labelled pixels of the batch the mean is over, when these rows are a part of it (default:
    those of `target`)."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=M.IGNORE_INDEX, reduction="sum")
    count = (target != M.IGNORE_INDEX).sum() if count is None else count
    return ce / count.clamp_min(1)      # no branch on the data: torch.compile traces one graph


def forward_loss(model, inputs: dict, present: torch.Tensor, target: torch.Tensor, count: torch.Tensor,
                 runtime: Runtime) -> torch.Tensor:
    """The network and its loss on a batch (what --compile compiles)."""
    with runtime.autocast():
        logits = model(inputs, present)
    return segmentation_loss(logits, target, count)


def train_step(model, optimizer, batch: dict, cfg: FinetuneConfig, generator, runtime: Runtime) -> dict:
    """One fine-tuning step on a batch (this process's rows of it under torchrun): which
    modalities each sample shows (drawn for the global batch), forward, cross-entropy over
    the global batch's labelled pixels, backward, one optimiser step (util/runtime.py:
    micro-batches, autocast, loss scaling, clipping). `model` is the Segmenter, or it
    wrapped in DDP."""
    net = runtime.network(model)
    inputs = modalities.prepare_inputs(batch, net.inputs)
    target = batch["semseg"]
    first = inputs[net.inputs[0]]
    p_missing = cfg.p_missing if cfg.inputs == "any" else 0.0     # a dedicated model sees all its inputs
    present = runtime.rows(sample_present(first.shape[0] * runtime.world, len(net.inputs), p_missing,
                                          generator, first.device))
    count = runtime.all_sum((target != M.IGNORE_INDEX).sum())

    def forward(model, rows):
        with record_function("forward"):
            loss = runtime.compiled(forward_loss)(model, rows["inputs"], rows["present"], rows["target"], count,
                                                  runtime)
        return loss, float(loss.detach())

    outs = runtime.learn(model, optimizer, forward, first.shape[0],
                         {"inputs": inputs, "present": present, "target": target})
    return {"loss": sum(outs)}


def load_pretrained(path: str) -> dict:
    """--pretrained: train.py's ckpt.pt, or one exported as .safetensors + .json; its config
    must name the model preset (whose training defaults fine-tuning takes)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no pre-training checkpoint there; run `python train.py` first, "
                        f"or pass --pretrained none for the baseline")
    ckpt = load_checkpoint(path, "pretrain")
    if ckpt["config"].get("config") not in M.PRESETS:
        raise UserError(f"{path}: its config names no model preset of this version "
                        f"({ckpt['config'].get('config')!r}; {', '.join(M.PRESETS)})")
    return ckpt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, ckpt = start_run(FinetuneConfig, argv, FINETUNE_PRESETS, RUN_CONTROL, "finetune")
    pre = None
    if cfg.init and ckpt is None:
        # --init replaces the default --pretrained; both named explicitly is ambiguous.
        if cfg.pretrained.lower() != "none" and any(a.split("=")[0] == "--pretrained" for a in argv):
            raise UserError("--init and --pretrained both give the encoder's weights; "
                            "pass one of them (or --pretrained none)")
        cfg = dataclasses.replace(cfg, pretrained="none")
    if ckpt is None and cfg.pretrained.lower() != "none":
        pre = load_pretrained(cfg.pretrained)
        preset = pre["config"]["config"]
        if preset != cfg.config:
            if any(a.split("=")[0] == "--config" for a in argv):
                raise UserError(f"--config {cfg.config} but {cfg.pretrained} is a {preset} model")
            # The model comes from the checkpoint: so do that preset's training defaults.
            cfg, _ = start_run(FinetuneConfig, ["--config", preset] + argv, FINETUNE_PRESETS, RUN_CONTROL,
                               "finetune")
    if cfg.inputs != "any" and any(a.split("=")[0] == "--p_missing" for a in argv):
        raise UserError(f"--p_missing chooses the inputs of --inputs any; --inputs {cfg.inputs} always sees "
                        f"{' and '.join(modalities.INPUT_CONDITIONS[cfg.inputs])}")
    validate(cfg)
    _, _, device = init_distributed(pick_device(cfg.device))
    dtype = autocast_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    dataset = training_set(cfg)
    if ckpt is not None:
        model_cfg = M.ModelConfig.from_dict(ckpt["model_config"])
    else:
        base = M.ModelConfig.from_dict(pre["model_config"]) if pre else M.PRESETS[cfg.config]
        model_cfg = dataclasses.replace(base, image_size=cfg.image_size, drop_path=cfg.drop_path,
                                        num_classes=data.num_classes(cfg.dataset))
        if cfg.inputs != "any":            # a dedicated model: only the adapters of its inputs
            wanted = modalities.INPUT_CONDITIONS[cfg.inputs]
            lacking = [m for m in wanted if m not in modalities.segmenter_inputs(base.modalities)]
            if lacking:
                raise UserError(f"--inputs {cfg.inputs}: {cfg.pretrained} was pre-trained without {', '.join(lacking)}")
            model_cfg = dataclasses.replace(model_cfg, modalities=wanted)
    net = M.Segmenter(model_cfg)
    if pre is not None:
        trunk = M.trunk_state_dict(pre["model"], net.inputs)
        missing, unexpected = net.load_state_dict(trunk, strict=False)
        assert not unexpected, unexpected
        assert all(k.startswith("output_adapters.semseg.") for k in missing), missing
        print(f"loaded the pre-trained encoder from {cfg.pretrained} ({len(trunk)} tensors; "
              f"new: the ConvNeXt head)")
    elif cfg.init and ckpt is None:
        init_encoder(net, cfg.init)
    else:
        print("no pre-training (--pretrained none): the baseline, encoder randomly initialised")
    net.to(device)
    scaler = grad_scaler(dtype, device)
    runtime = Runtime(device, dtype, scaler, cfg.clip_grad, accum_steps=cfg.accum_steps, compile=cfg.compile)
    optimizer = torch.optim.AdamW(param_groups(net, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr,
                                  **runtime.optimizer_options())
    check_out_dir(cfg)                 # last of the checks, before any work (never lose a run)
    loop = Loop(cfg, net, optimizer, dataset, generator, device,
                extra={"kind": "finetune", "model_config": dataclasses.asdict(model_cfg),
                       "dataset": cfg.dataset, "data": data.conventions(cfg.dataset, cfg.image_size, cfg.cues)},
                scaler=scaler)
    if ckpt is not None:
        loop.resume(ckpt)
    net.grad_ckpt = cfg.grad_ckpt
    # Every parameter gets a gradient in every step, even when no sample of a process shows
    # one of the modalities: its tokens still run through the encoder (as padding), weighted
    # by 0 (tests/test_distributed.py checks it). So DDP needs no find_unused_parameters.
    model = runtime.wrap(net)
    sees = f"p_missing={cfg.p_missing:.2f}" if cfg.inputs == "any" else f"a dedicated {cfg.inputs} model"
    print(f"fine-tuning on {cfg.dataset} ({len(dataset)} images) on {device}, {sees}; {ops.backend()}")

    net.train()
    loop.run(lambda batch, epoch: train_step(model, optimizer, batch, cfg, generator, runtime))
    return net


if __name__ == "__main__":
    run_cli(main)
