"""util/vis.py — pictures: what the model sees, reconstructs and predicts (the paper's Figures 3 and 4).

    colours       depth_colours (a rainbow for metres, black = missing), label_colours (the
                  dataset's palette, black = void)
    layout        grid: panels with column and row titles; with_legend: a class legend below
    Figure 3      segmentation_figure: rgb | depth | ground truth | prediction with rgb+depth |
                  rgb only | depth only, for one image (evaluate.py --save_vis)
    Figure 4      reconstruct + reconstruction_figure: per modality the masked input, the
                  reconstruction and the target, for complete input and for rgb-only and
                  depth-only input (train.py writes one every --vis_every epochs)

Everything here returns images (numpy uint8 or PIL); the scripts decide where they go. Drawn
with PIL, no plotting library.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import masking
import model as M
import modalities

# -----------------------------------------------------------------------------
# Colours

# A rainbow from dark blue (near) through green and yellow to dark red (far), given as
# anchor colours and interpolated linearly to 256 entries. Its lightness rises then falls,
# so missing depth (black) never looks like a valid distance.
_RAINBOW = np.array([(48, 18, 59), (65, 69, 171), (70, 117, 237), (57, 162, 252), (27, 207, 212),
                     (36, 236, 166), (97, 252, 108), (164, 252, 59), (209, 232, 52), (243, 198, 58),
                     (254, 155, 45), (243, 99, 21), (217, 56, 6), (177, 26, 1), (122, 4, 3)], dtype=np.float64)
DEPTH_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_RAINBOW)), _RAINBOW[:, c])
                      for c in range(3)], axis=1).round().astype(np.uint8)
MISSING = (0, 0, 0)          # depth holes and void labels
HIDDEN = (200, 200, 200)     # patches the encoder did not see (Figure 4)


def depth_range(depth: np.ndarray, valid: Optional[np.ndarray] = None) -> tuple[float, float]:
    """The 2nd and 98th percentiles of the valid pixels: a few outliers don't wash out the map."""
    valid = (depth > 0) & np.isfinite(depth) if valid is None else valid
    if not valid.any():
        return 0.0, 1.0
    lo, hi = np.percentile(depth[valid], [2, 98])
    return float(lo), float(max(hi, lo + 1e-6))


def depth_colours(depth, valid=None, lo: Optional[float] = None, hi: Optional[float] = None) -> np.ndarray:
    """float [H, W] (metres, or standardised depth with `valid`) → uint8 [H, W, 3].

    Values are mapped linearly from [lo, hi] (default: depth_range) onto the rainbow,
    clipped at both ends; invalid pixels (default: depth <= 0, non-finite) are black.
    """
    depth = _map(depth).astype(np.float64)
    if valid is None:
        valid = (depth > 0) & np.isfinite(depth)
    else:
        valid = _map(valid).astype(bool) & np.isfinite(depth)
    if lo is None or hi is None:
        lo, hi = depth_range(depth, valid)
    t = np.clip((np.nan_to_num(depth) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    out = DEPTH_LUT[(t * 255).round().astype(np.int64)]
    out[~valid] = MISSING
    return out


def label_colours(label, palette: np.ndarray) -> np.ndarray:
    """int [H, W] class ids (IGNORE_INDEX = void) → uint8 [H, W, 3] with the dataset's palette."""
    label = _map(label).astype(np.int64)
    void = label == data.IGNORE_INDEX
    if ((label < 0) | (label >= len(palette)))[~void].any():
        raise ValueError(f"label ids must be in [0, {len(palette)}) or {data.IGNORE_INDEX}")
    out = palette[np.where(void, 0, label)]
    out[void] = MISSING
    return out


def _map(x) -> np.ndarray:
    """A tensor or array [H, W] or [1, H, W] as a numpy [H, W]."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    return x.reshape(x.shape[-2:])


def rgb_image(rgb) -> np.ndarray:
    """Normalised float [3, H, W] → uint8 [H, W, 3]."""
    return data.denormalize_rgb(torch.as_tensor(rgb))


def paint_hidden(img: np.ndarray, hidden_pixels) -> np.ndarray:
    """Grey out the hidden pixels (Bool[H, W], from hidden_pixels() of the patch mask)."""
    out = img.copy()
    out[_map(hidden_pixels)] = HIDDEN
    return out


def hidden_pixels(hidden_patches: torch.Tensor, size) -> torch.Tensor:
    """Bool[h, w] per patch → Bool[H, W] per pixel."""
    h, w = hidden_patches.shape
    H, W = size
    return hidden_patches.repeat_interleave(H // h, 0).repeat_interleave(W // w, 1)


# -----------------------------------------------------------------------------
# Layout


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)      # a scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _resize(img: np.ndarray, height: int) -> Image.Image:
    """Nearest-neighbour, so labels keep their exact colours and patches stay square."""
    H, W = img.shape[:2]
    return Image.fromarray(img).resize((max(1, round(W * height / H)), height), Image.NEAREST)


def legend(class_ids: Sequence[int], names: Sequence[str], palette: np.ndarray, width: int,
           font_size: int = 14) -> Image.Image:
    """Swatch + name for each class, in rows as wide as `width`."""
    font = _font(font_size)
    cell_w = 16 + max([int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(names[c], font=font))
                       for c in class_ids] + [40]) + 14
    per_row = max(1, width // cell_w)
    rows = max(1, -(-len(class_ids) // per_row))
    line = font_size + 8
    img = Image.new("RGB", (width, rows * line + 6), "white")
    d = ImageDraw.Draw(img)
    for i, c in enumerate(class_ids):
        x, y = 6 + (i % per_row) * cell_w, 4 + (i // per_row) * line
        d.rectangle([x, y + 2, x + 12, y + 2 + font_size - 2], fill=tuple(int(v) for v in palette[c]),
                    outline="black")
        d.text((x + 16, y), names[c], fill="black", font=font)
    return img


def grid(rows: Sequence[Sequence[np.ndarray]], col_titles: Sequence[str], row_titles: Sequence[str] = (),
         cell_height: int = 192, font_size: int = 14) -> Image.Image:
    """Panels (uint8 [H, W, 3]) in rows, each resized to cell_height, with a title above
    each column and one left of each row."""
    font = _font(font_size)
    cells = [[_resize(p, cell_height) for p in row] for row in rows]
    col_w = [max(row[j].width for row in cells) for j in range(len(cells[0]))]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max([int(measure.textlength(t, font=font)) + 16 for t in row_titles] + [0])
    top, gap = font_size + 10, 4
    canvas = Image.new("RGB", (left + sum(col_w) + gap * (len(col_w) + 1),
                               top + len(cells) * (cell_height + gap) + gap), "white")
    d = ImageDraw.Draw(canvas)
    for i, row in enumerate([None] + cells):       # row 0: the column titles
        y = top + (i - 1) * (cell_height + gap)
        if 0 < i <= len(row_titles):
            d.text((8, y + cell_height / 2), row_titles[i - 1], fill="black", font=font, anchor="lm")
        x = left + gap
        for j, w in enumerate(col_w):
            if row is None:
                d.text((x + w / 2, top - 4), col_titles[j], fill="black", font=font, anchor="ms")
            else:
                canvas.paste(row[j], (x, y))
            x += w + gap
    return canvas


def with_legend(figure: Image.Image, class_ids: Sequence[int], names: Sequence[str],
                palette: np.ndarray) -> Image.Image:
    """The figure with a legend of `class_ids` below it."""
    key = legend(class_ids, names, palette, figure.width)
    out = Image.new("RGB", (figure.width, figure.height + key.height), "white")
    out.paste(figure, (0, 0))
    out.paste(key, (0, figure.height))
    return out


def _cell_height(H: int) -> int:
    """Small images are blown up by a whole factor (crisp pixels), large ones brought to 240."""
    return H * max(1, 192 // H) if H < 192 else min(H, 240)


# -----------------------------------------------------------------------------
# Figure 3: one image, its ground truth and the predictions of the three input conditions

SETTING_TITLES = {"rgbd": "pred rgb+depth", "rgb": "pred rgb only", "depth": "pred depth only"}


def segmentation_figure(sample: dict, preds: dict, names: Sequence[str], palette: np.ndarray) -> Image.Image:
    """sample: a data sample dict (rgb, depth metres, semseg); preds: {"rgbd"|"rgb"|"depth":
    Long[H, W]}. The legend lists every class present in the ground truth or a prediction."""
    lo, hi = depth_range(_map(sample["depth"]))
    panels = [rgb_image(sample["rgb"]), depth_colours(sample["depth"], lo=lo, hi=hi),
              label_colours(sample["semseg"], palette)]
    titles = ["rgb", f"depth {lo:.1f}-{hi:.1f} m", "ground truth"]
    present = set(np.unique(_map(sample["semseg"])).tolist())
    for setting, pred in preds.items():
        panels.append(label_colours(pred, palette))
        titles.append(SETTING_TITLES[setting])
        present |= set(np.unique(_map(pred)).tolist())
    classes = sorted(c for c in present if c != data.IGNORE_INDEX)
    return with_legend(grid([panels], titles, cell_height=_cell_height(panels[0].shape[0])), classes, names, palette)


# -----------------------------------------------------------------------------
# Figure 4: what the pre-trained network reconstructs from complete and from partial input

# Input conditions of the figure: which modalities the encoder may see (None: all it has).
RECON_CONDITIONS = {"complete input": None, "rgb only": ("rgb",), "depth only": ("depth",)}


@torch.no_grad()
def reconstruct(net: M.MaskMentor, batch: dict, keep: Optional[Sequence[str]], mcfg: masking.MaskingConfig,
                generator: torch.Generator):
    """One masked forward pass in eval mode with the kept modalities fixed (Algorithm 1's
    outcome chosen instead of drawn) and patch masking as in pre-training (`mcfg`).
    Returns (inputs, predictions, hidden Bool[B, K, h, w]). Uses only `generator`, so
    drawing a picture never changes a training run's random stream."""
    inputs = modalities.prepare_inputs(batch, net.inputs)
    first = inputs[net.inputs[0]]
    B, device = first.shape[0], first.device
    h, w = net.cfg.grid(*M.image_size(inputs))
    K = len(net.inputs)
    kept = torch.tensor([keep is None or m in keep for m in net.inputs], device=device).expand(B, K)
    plan = masking.plan_masking(B, K, h * w, mcfg, False, generator, device, keep=kept)
    was_training = net.training
    net.eval()
    preds, _, masked = net(inputs, plan)
    net.train(was_training)
    return inputs, preds, masked.mask.view(B, K, h, w)


def _recon_panels(m: str, inputs: dict, preds: dict, hidden: torch.Tensor, palette: np.ndarray):
    """(masked input, reconstruction, target) of modality m for the first image, drawn by
    its kind: rgb as colours, one-channel maps (depth, standardised as the model sees it;
    holes black) on the target's range, labels with the palette. Also the classes shown."""
    spec = modalities.MODALITIES[m]
    target = inputs[m][0]
    pix = hidden_pixels(hidden, target.shape[-2:])
    if spec.kind == "labels":
        mixed = torch.where(pix, preds[m][0].argmax(0), target)
        panels = [paint_hidden(label_colours(target, palette), pix), label_colours(mixed, palette),
                  label_colours(target, palette)]
        return panels, set(torch.unique(mixed).tolist()) | set(torch.unique(target).tolist())
    mixed = torch.where(pix, preds[m][0].float(), target)
    if target.shape[0] == 3:
        return [paint_hidden(rgb_image(target), pix), rgb_image(mixed), rgb_image(target)], set()
    target, mixed = target[0], mixed[0]
    valid = inputs[f"{m}_valid"][0, 0] if f"{m}_valid" in inputs else torch.ones_like(target, dtype=torch.bool)
    lo, hi = depth_range(target.cpu().numpy(), valid.cpu().numpy())
    return [paint_hidden(depth_colours(target, valid, lo, hi), pix),
            depth_colours(mixed, torch.ones_like(valid), lo, hi), depth_colours(target, valid, lo, hi)], set()


def reconstruction_figure(net: M.MaskMentor, batch: dict, mcfg: masking.MaskingConfig, seed: int,
                          palette: np.ndarray, names: Sequence[str]) -> Image.Image:
    """For each image of `batch` and each of RECON_CONDITIONS the network can take, one
    row: per modality the masked input (grey = hidden), the reconstruction (the prediction
    in hidden patches, the input in visible ones, as MAE shows it) and the target."""
    device = batch["rgb"].device
    generator = torch.Generator(device=device).manual_seed(seed)
    conditions = {title: keep or net.inputs for title, keep in RECON_CONDITIONS.items()
                  if all(m in net.inputs for m in keep or ())}
    rows, row_titles, classes = [], [], set()
    for i in range(batch["rgb"].shape[0]):
        one = {k: v[i:i + 1] for k, v in batch.items() if torch.is_tensor(v)}
        for title, keep in conditions.items():
            inputs, preds, hidden = reconstruct(net, one, keep, mcfg, generator)
            row = []
            for k, m in enumerate(net.inputs):
                panels, shown = _recon_panels(m, inputs, preds, hidden[0, k], palette)
                row += panels
                classes |= shown
            rows.append(row)
            row_titles.append(f"#{i} {title}")
    titles = [f"{m} {t}" for m in net.inputs for t in ("input", "recon", "target")]
    H = batch["rgb"].shape[-2]
    cell = _cell_height(H) // 2 if H < 192 else 160
    classes.discard(data.IGNORE_INDEX)
    return with_legend(grid(rows, titles, row_titles, cell_height=cell), sorted(classes), names, palette)
