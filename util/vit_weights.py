"""util/vit_weights.py — third-party ViT-B weights under this project's names (--init).

The paper starts from a trained encoder (§4.1: "We adopt ViT-B as the encoder, while other
network parameters are all randomly initialized"). model.py names its parameters as
MultiMAE does, so MultiMAE's checkpoints (and this project's own) load key for key; a timm
or MAE ViT needs its keys renamed. Pure functions on state dicts: util/checkpoints.py reads
the file (safely) and calls `load_encoder_weights`.

Two key layouts are recognised:
  MultiMAE (and this project's own checkpoints): our names already, `encoder.N.*`,
    `global_tokens`, `input_adapters.<m>.{proj,class_emb,pos_emb}`; `output_adapters.*`
    (MIM heads / task heads) are not the encoder and are ignored.
  timm / MAE ViT: `blocks.N.*` -> `encoder.N.*` (same sub-names), `patch_embed.proj` ->
    the rgb adapter's `proj`, `cls_token` + its position -> the global token, `pos_embed`
    -> the position table; as MultiMAE's tools/vit2multimae_converter.py does. The final
    `norm`, `fc_norm`, `head` and MAE's decoder (`decoder_*`, `mask_token`) are ignored.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model import MaskMentor, MultiViT


# Checkpoint keys of a timm/MAE ViT that are not loaded, and why.
_VIT_IGNORED = ((("norm.", "fc_norm."), "final LayerNorm; MultiMAE has none after the blocks"),
                (("head.", "head_dist.", "dist_token"), "classifier"),
                (("decoder_", "mask_token"), "MAE's decoder"))


@dataclass
class InitReport:
    """What encoder_state_from_checkpoint did; `summary()` gives a few printable lines."""
    source: str                                      # "MultiMAE" or "timm/MAE ViT"
    loaded: list = field(default_factory=list)       # our keys given checkpoint values
    missing: list = field(default_factory=list)      # our keys left as they are (random)
    ignored: dict = field(default_factory=dict)      # checkpoint key -> why it was not used
    notes: list = field(default_factory=list)

    def summary(self) -> list:
        lines = [f"{self.source} checkpoint: {len(self.loaded)} tensors loaded ({_key_groups(self.loaded)})"]
        if self.missing:
            lines.append(f"not in it, randomly initialised: {_key_groups(self.missing)}")
        reasons = {}
        for key, why in self.ignored.items():
            reasons.setdefault(why, []).append(key)
        lines += [f"ignored ({why}): {_key_groups(keys)}" for why, keys in reasons.items()]
        return lines + self.notes


def _key_groups(keys, most: int = 8) -> str:
    """'encoder (144), input_adapters.rgb (3)': key counts per module, not 200 lines."""
    counts = {}
    for k in keys:
        parts = k.split(".")
        group = ".".join(parts[:2]) if parts[0].endswith("_adapters") and len(parts) > 2 else parts[0]
        counts[group] = counts.get(group, 0) + 1
    items = [f"{g} ({n})" for g, n in counts.items()]
    return ", ".join(items[:most]) + (f", ... ({len(items) - most} more)" if len(items) > most else "")


def _unwrap(state) -> dict:
    """The tensors of a state dict, whether bare or wrapped in "model" / "state_dict"
    (MultiMAE, MAE and our scripts save {"model": ...}), without DDP's "module." prefix."""
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"not a state dict (a {type(state).__name__})")
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _from_vit(state: dict, report: InitReport):
    """timm/MAE names -> ours. Returns (tensors under our names, {"*": the table for every adapter})."""
    if any(k.startswith("norm_pre.") for k in state):   # e.g. CLIP: a norm our encoder lacks
        raise ValueError("this ViT has a LayerNorm before its blocks (norm_pre, e.g. CLIP); MultiMAE's has none")
    out, tables = {}, {}
    for k, v in state.items():
        if k.startswith("blocks."):
            out["encoder." + k[len("blocks."):]] = v
        elif k.startswith("patch_embed.proj."):
            out["input_adapters.rgb.proj." + k.split(".")[-1]] = v
        elif k in ("cls_token", "pos_embed"):
            pass                                         # below: they go together
        else:
            report.ignored[k] = next((why for prefixes, why in _VIT_IGNORED if k.startswith(prefixes)),
                                     "not part of a plain ViT encoder")
    cls, pos = state.get("cls_token"), state.get("pos_embed")
    cls_pos = None
    if pos is not None:
        n = pos.shape[1] if pos.dim() == 3 else 0
        # timm: the cls token's entry comes first, then the h*w patch positions
        has_cls = cls is not None and n > 1 and math.isqrt(n - 1) ** 2 == n - 1
        side = math.isqrt(n - 1 if has_cls else n)
        if n < 1 or side * side != (n - 1 if has_cls else n):
            raise ValueError(f"pos_embed {tuple(pos.shape)} is not a square grid of patch positions (+ cls)")
        if has_cls:
            cls_pos, pos = pos[:, :1], pos[:, 1:]
        # [1, h*w, D] row-major -> MultiMAE's [1, D, h, w]
        tables["*"] = pos.transpose(1, 2).reshape(1, pos.shape[2], side, side)
    if cls is not None:
        # timm adds pos_embed[:, 0] to the cls token; our global token carries no position,
        # so the sum is the equivalent token (MultiMAE's converter does the same). Attention
        # is permutation-equivariant: that it sits last here and first in timm is harmless.
        out["global_tokens"] = cls + cls_pos if cls_pos is not None else cls
    return out, tables


def _from_multimae(state: dict, report: InitReport, decoders: bool):
    """MultiMAE names are ours: split off the position tables, and keep the output adapters
    (MultiMAE's pre-training decoders: ours key for key, but for the fixed sin-cos pos_emb
    they store and we compute) when `decoders`, i.e. when loading into a pre-training
    network; a fine-tuning network has none."""
    out, tables = {}, {}
    for k, v in state.items():
        parts = k.split(".")
        if k.startswith("input_adapters.") and parts[-1] == "pos_emb":
            tables[parts[1]] = v
        elif k.startswith(("encoder.", "global_tokens", "input_adapters.")):
            out[k] = v
        elif k.startswith("output_adapters.") and decoders:
            if parts[-1] == "pos_emb":
                report.ignored[k] = "the decoders' fixed sin-cos positions: computed here"
            else:
                out[k] = v
        else:
            report.ignored[k] = "output adapters / heads: not the encoder" \
                if k.startswith("output_adapters.") else "not part of the encoder"
    return out, tables


def encoder_state_from_checkpoint(state: dict, model: "MultiViT"):
    """A MultiMAE / MAE / timm ViT checkpoint (state dict, possibly wrapped) -> (a state
    dict of `model`'s encoder keys for `model.load_state_dict(..., strict=False)`, an
    InitReport). Raises ValueError (one line) when the checkpoint's ViT does not fit."""
    state = _unwrap(state)
    cfg, own = model.cfg, model.state_dict()
    if any(k.startswith(("blocks.", "patch_embed.")) for k in state):
        report = InitReport("timm/MAE ViT")
        src, tables = _from_vit(state, report)
    elif any(k.startswith(("encoder.", "input_adapters.", "global_tokens")) for k in state):
        report = InitReport("MultiMAE")
        src, tables = _from_multimae(state, report, decoders=isinstance(model, MaskMentor))
    else:
        raise ValueError("no ViT encoder in it (neither MultiMAE's encoder.N.* nor timm/MAE's blocks.N.* keys)")

    # The architecture first, so that a ViT-L or a /14 model gets one plain sentence.
    odd = [k for k in src if k.startswith("encoder.") and not re.match(r"encoder\.\d+\.", k)]
    if odd:
        raise ValueError(f"{odd[0]}: not a block of MultiMAE's encoder (expected encoder.N.*, N the block "
                         f"number; {len(odd)} such keys)")
    blocks = {int(k.split(".")[1]) for k in src if k.startswith("encoder.")}
    width = next((v.shape[0] for k, v in src.items() if k.endswith("norm1.weight")), None)
    proj = src.get("input_adapters.rgb.proj.weight", src.get("input_adapters.depth.proj.weight"))
    patch = None if proj is None else tuple(proj.shape[-2:])
    if (len(blocks), width) != (cfg.depth, cfg.width) or patch not in (None, (cfg.patch_size,) * 2):
        raise ValueError(f"the checkpoint's ViT ({len(blocks)} blocks, width {width}, patch "
                         f"{'?' if patch is None else patch[0]}) does not fit this encoder ({cfg.depth} "
                         f"blocks, width {cfg.width}, patch {cfg.patch_size}); ViT-B/16 is 12 x 768, patch 16")

    mapped = {}
    for k, v in src.items():
        if k not in own:
            if k.startswith("encoder."):     # e.g. layer scale (ls1.gamma): not MultiMAE's block
                raise ValueError(f"{k}: the checkpoint's blocks have parameters MultiMAE's ViT blocks lack")
            report.ignored[k] = "no such input in this model" if k.startswith("input_adapters.") \
                else "not part of this encoder"
        elif v.shape == own[k].shape:
            mapped[k] = v
        elif k.endswith("class_emb.weight") and v.shape[0] + 1 == own[k].shape[0]:
            # The same classes without our extra 'ignore' row: MultiMAE's fine-tuning pads it with zeros.
            mapped[k] = F.pad(v, (0, 0, 0, 1))
        elif k.endswith("class_emb.weight"):
            # Another label set (MultiMAE: COCO's 133 classes): its embeddings mean nothing here.
            report.ignored[k] = f"semseg class embedding of {v.shape[0]} rows, this model has {own[k].shape[0]}"
        elif k.startswith("output_adapters.") and k.endswith(("out_proj.weight", "out_proj.bias")):
            # The semseg decoder's last layer predicts the checkpoint's classes (COCO's 133).
            report.ignored[k] = f"decoder output for {v.shape[0]} values per patch, this model has {own[k].shape[0]}"
        else:
            raise ValueError(f"{k}: shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model")

    # Position tables: each adapter takes its own (MultiMAE stores one per adapter, all
    # the same sin-cos values), else the shared one (timm's pos_embed, or rgb's). Every
    # modality then has the positions the pre-trained encoder knows. (MultiMAE's converter
    # gives timm's table to rgb only; sharing it is this project's choice.)
    shared = tables.get("*", tables.get("rgb", next(iter(tables.values()), None)))
    for m, adapter in model.input_adapters.items():
        table = tables.get(m, shared)
        if table is None:
            continue
        if table.dim() != 4 or table.shape[:2] != (1, cfg.width):
            raise ValueError(f"position table {tuple(table.shape)}: expected [1, {cfg.width}, h, w]")
        mapped[f"input_adapters.{m}.pos_emb"] = table
    for m in tables:
        if m != "*" and m not in model.input_adapters:
            report.ignored[f"input_adapters.{m}.pos_emb"] = "no such input in this model"
    if shared is not None:
        h, w = cfg.grid(cfg.image_size, cfg.image_size)
        resized = "" if shared.shape[-2:] == (h, w) else f", resized to {h}x{w} at {cfg.image_size}px"
        report.notes.append(f"position table {shared.shape[2]}x{shared.shape[3]} from the checkpoint replaces "
                            f"the sin-cos one for {', '.join(model.input_adapters)}{resized}")

    # Strict about the encoder: a checkpoint that lacks a block tensor or the global token
    # would leave part of the pre-trained encoder random without anyone noticing. (Input
    # adapters may be missing: an rgb ViT has none for depth.)
    lacking = [k for k in own if k.startswith(("encoder.", "global_tokens")) and k not in mapped]
    if lacking:
        raise ValueError(f"the checkpoint lacks {len(lacking)} encoder tensor(s), e.g. {lacking[0]}: "
                         f"a truncated or partial checkpoint")
    report.loaded = list(mapped)
    report.missing = [k for k in own if k not in mapped]
    return mapped, report


def load_encoder_weights(model: "MultiViT", state: dict, check=lambda mapped: None) -> InitReport:
    """encoder_state_from_checkpoint, then load it into `model` (in place); `check(mapped)`
    sees the tensors that will be loaded first (util/checkpoints.py: dtypes, finiteness)."""
    mapped, report = encoder_state_from_checkpoint(state, model)
    check(mapped)
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys   # the mapping names only our keys
    return report