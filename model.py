"""model.py — the network: a MultiMAE-style multi-modal ViT, its MIM heads, its segmentation head.

One batch goes through it like this (paper §3.3, Figure 2; docs/method.md §2):

  inputs        modalities.prepare_inputs: rgb [B,3,H,W] (normalised), depth [B,1,H,W]
                (standardised), semseg [B,H/4,W/4]
  input adapters one per modality (a row of modalities.MODALITIES): patches -> tokens
                 [B, N, width] + fixed 2D sin-cos position
                 (or the table of loaded ViT weights; no modality embedding: the separate
                 projections already tell modalities apart)
  masking        masking.apply_masking keeps a few tokens of the surviving modalities
  encoder        ViT blocks on the visible tokens + one learned global token
  MIM heads      per modality (MultiMAE's output adapters): mask tokens are put back in
                 the hidden slots (MAE), queries = that modality's N slots, one
                 cross-attention to the visible tokens, an MLP -> the "output token
                 embeddings" the STTP token loss compares; then 2 self-attention blocks and
                 a linear layer -> pixels of every patch
  ConvNeXt head  fine-tuning only: encoder tokens of the present modalities -> class logits

`MultiViT` is the part shared by pre-training (`MaskMentor`) and fine-tuning (`Segmenter`);
parameter names follow MultiMAE (`input_adapters.rgb.proj`, `encoder.0.attn.qkv`,
`global_tokens`, `output_adapters.depth.decoder.kv`, ...) so its checkpoints map onto ours.
Which modalities there are, and each one's adapter and head, comes from the table in
modalities.py (`ModelConfig.modalities` picks rows of it). This file knows nothing of
teachers, losses or schedules (sttp.py), nor of processes (runtime.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import masking
import modalities
from modalities import IGNORE_INDEX, MODALITIES


@dataclass
class ModelConfig:
    image_size: int = 224        # pre-training resolution (fine-tuning takes any multiple of patch_size)
    patch_size: int = 16
    width: int = 768             # ViT-B
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 40        # semseg classes (input adapter, MIM head and segmentation head)
    semseg_emb_dim: int = 64     # MultiMAE's class embedding size (a "labels" modality's adapter)
    num_global_tokens: int = 1
    dec_width: int = 256         # MultiMAE's output adapters: width 256, 8 heads, 2 blocks
    dec_heads: int = 8
    dec_depth: int = 2
    norm_rgb_head: bool = True   # MultiMAE's extra head predicting per-patch-normalised rgb
    seg_dim: int = 384           # ConvNeXt head channels at 1/4 resolution (MultiMAE: 6144 / 16)
    seg_depth: int = 4           # ConvNeXt blocks
    drop_path: float = 0.0       # stochastic depth in the encoder (MultiMAE fine-tuning: 0.1)
    # Rows of modalities.MODALITIES, in token-sequence order: the pre-training inputs; the
    # segmenter takes those marked segmenter_input (rgb, depth).
    modalities: tuple = modalities.DEFAULT

    def __post_init__(self):
        self.modalities = modalities.check(self.modalities)   # a list from JSON becomes a tuple

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """A config saved in a checkpoint (dataclasses.asdict). Checkpoints written before the
        modality table kept the semseg stride here; it now lives in the table, unchanged."""
        d = dict(d)
        stride = d.pop("semseg_stride", MODALITIES["semseg"].stride)
        if stride != MODALITIES["semseg"].stride:
            raise ValueError(f"semseg_stride {stride}: this version has {MODALITIES['semseg'].stride} "
                             f"(modalities.MODALITIES)")
        return cls(**d)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        return height // self.patch_size, width // self.patch_size


PRESETS = {
    # Runs on 2 CPU cores: 64x64 images, 8x8 patches -> 64 tokens per modality. The MIM
    # heads are shrunk most (width 64, one block): with 4 heads of 64 queries each they
    # cost ~3x the encoder at MultiMAE's proportions (measured: 0.43 -> 0.15 s per step).
    "tiny": ModelConfig(image_size=64, patch_size=8, width=128, depth=4, num_heads=4,
                        dec_width=64, dec_heads=2, dec_depth=1, seg_dim=64, seg_depth=2),
    # ViT-B at 224/16 with MultiMAE's decoder sizes (docs/method.md §2).
    "base": ModelConfig(),
}


# -----------------------------------------------------------------------------
# Positions


def sincos_pos_embed(h: int, w: int, dim: int, device) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [1, h*w, dim] (MoCo-v3, as MultiMAE builds it):
    a quarter of the channels each for sin and cos of the row, then of the column.
    Computed for the actual grid rather than interpolated from 14x14: it is fixed, not
    learned, so any image size gets exact positions. (Computed anew each call, on the CPU
    as always so the values do not depend on the device: it is tiny, and a cache would keep
    the fake tensors of torch.compile / torch.onnx.export tracing.)"""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs width % 4 == 0, got {dim}")
    omega = 1.0 / (10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                                torch.arange(w, dtype=torch.float32), indexing="ij")
    r = rows.flatten()[:, None] * omega[None]
    c = cols.flatten()[:, None] * omega[None]
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)[None].to(device)


# -----------------------------------------------------------------------------
# Transformer pieces (timm / MultiMAE names: qkv, proj, fc1, fc2, norm1, norm2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_mask=None):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]   # True = may attend
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class CrossAttention(nn.Module):
    """Queries from one sequence, keys/values from another (MultiMAE's output adapters)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, key_mask=None):
        B, N, D = x.shape
        M, H = context.shape[1], self.num_heads
        q = self.q(x).view(B, N, H, D // H).transpose(1, 2)
        k, v = self.kv(context).view(B, M, 2, H, D // H).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Shard:
    """Which rows of the global batch a forward holds: all of them (this class), unless the
    batch is split over processes (runtime.py's subclass under torchrun). Random draws per
    sample are made for the whole global batch and each shard keeps its rows, so that P
    processes draw what one process would (stochastic depth below, the masking in sttp.py)."""
    world = 1                      # shards in the global batch

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This shard's rows of a tensor drawn for the global batch."""
        return x


WHOLE_BATCH = Shard()


def drop_path(x, p: float, training: bool, shard: Shard = WHOLE_BATCH):
    """Stochastic depth: drop a residual branch for whole samples (timm's DropPath), drawn
    for the global batch (see Shard)."""
    if p == 0.0 or not training:
        return x
    u = shard.rows(torch.rand(x.shape[0] * shard.world, *([1] * (x.dim() - 1)), device=x.device))
    return x * (u >= p).to(x.dtype) / (1 - p)


class Block(nn.Module):
    """Pre-norm ViT block; LayerNorm eps 1e-6 (MultiMAE)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, key_mask=None, shard: Shard = WHOLE_BATCH):
        x = x + drop_path(self.attn(self.norm1(x), key_mask), self.drop_path, self.training, shard)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training, shard)


# -----------------------------------------------------------------------------
# Input adapters: one per modality


class _InputAdapter(nn.Module):
    """What the input adapters share: where the positions come from.

    By default the fixed sin-cos embedding, computed for the actual grid. Once ViT weights
    bringing their own table are loaded (timm's learned `pos_embed`, MultiMAE's stored
    `pos_emb`; see "Loading ViT-B weights" below), that table [1, width, h, w] (MultiMAE's
    layout) is used instead, resized to the actual grid as MultiMAE does (bicubic for
    images, bilinear for semseg). It is a buffer: fixed (MultiMAE keeps pos_emb at
    requires_grad=False), moved by .to(), saved in the state dict; None by default, so a
    model without a loaded table has nothing extra in its state dict.
    """
    pos_mode = "bicubic"

    def __init__(self):
        super().__init__()
        self.register_buffer("pos_emb", None)

    def positions(self, h: int, w: int, dim: int, device) -> torch.Tensor:
        """[1, h*w, dim] position embedding for an h x w grid of tokens."""
        if self.pos_emb is None:
            return sincos_pos_embed(h, w, dim, device)
        table = self.pos_emb
        if table.shape[-2:] != (h, w):
            table = F.interpolate(table, size=(h, w), mode=self.pos_mode, align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A fresh model has no table: one in the state dict is created here before torch
        # copies it, so a checkpoint of a model initialised with --init reloads as saved.
        table = state_dict.get(prefix + "pos_emb")
        if table is not None and (self.pos_emb is None or self.pos_emb.shape != table.shape):
            w = self.proj.weight
            self.pos_emb = torch.empty(table.shape, dtype=w.dtype, device=w.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PatchedInputAdapter(_InputAdapter):
    """rgb / depth: a patch_size x patch_size convolution with stride patch_size (= a linear
    map of each patch) plus the position embedding."""

    def __init__(self, channels: int, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        t = self.proj(x)                                    # [B, width, h, w]
        h, w = t.shape[-2:]
        return t.flatten(2).transpose(1, 2) + self.positions(h, w, t.shape[1], t.device)


class SemSegInputAdapter(_InputAdapter):
    """semseg at 1/4 resolution: a learned embedding per class (64-d), then a
    (patch/4)x(patch/4) convolution, so it also gives one token per patch (MultiMAE).
    The ignore label 255 gets an extra embedding of its own."""
    pos_mode = "bilinear"    # MultiMAE's SemSegInputAdapter resizes its pos_emb bilinearly

    def __init__(self, num_classes: int, patch: int, stride: int, emb_dim: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.proj = nn.Conv2d(emb_dim, width, kernel_size=patch // stride, stride=patch // stride)

    def forward(self, labels):
        labels = labels.masked_fill(labels == IGNORE_INDEX, self.num_classes)
        t = self.proj(self.class_emb(labels).permute(0, 3, 1, 2))
        h, w = t.shape[-2:]
        return t.flatten(2).transpose(1, 2) + self.positions(h, w, t.shape[1], t.device)


def image_size(inputs: dict) -> tuple[int, int]:
    """(H, W) of the images behind prepared inputs (a map at 1/stride counts stride times)."""
    for m, spec in MODALITIES.items():
        if m in inputs:
            h, w = inputs[m].shape[-2:]
            return h * spec.stride, w * spec.stride
    raise ValueError(f"no modality among the inputs {sorted(inputs)}")


def input_adapter(cfg: ModelConfig, name: str) -> nn.Module:
    """The input adapter of a modality, by its row of the table (its kind and channels)."""
    spec = MODALITIES[name]
    if spec.kind == "image":
        return PatchedInputAdapter(spec.channels, cfg.patch_size, cfg.width)
    return SemSegInputAdapter(cfg.num_classes, cfg.patch_size, spec.stride, cfg.semseg_emb_dim, cfg.width)


# -----------------------------------------------------------------------------
# The shared trunk


class MultiViT(nn.Module):
    """Input adapters + encoder + global token: what pre-training hands to fine-tuning."""

    def __init__(self, cfg: ModelConfig, inputs: tuple):
        super().__init__()
        self.cfg = cfg
        self.inputs = inputs                 # names of the modalities it takes, in sequence order
        self.shard = WHOLE_BATCH             # runtime.py sets its own under torchrun
        # --grad_ckpt: keep only each encoder block's input for the backward and recompute
        # its activations there (torch.utils.checkpoint): less memory, one more forward.
        self.grad_ckpt = False
        self.input_adapters = nn.ModuleDict({m: input_adapter(cfg, m) for m in inputs})
        # One learned token appended after the patch tokens, with no position (MultiMAE).
        self.global_tokens = nn.Parameter(torch.zeros(1, cfg.num_global_tokens, cfg.width))
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.encoder = nn.ModuleList(Block(cfg.width, cfg.num_heads, cfg.mlp_ratio, dpr[i]) for i in range(cfg.depth))
        # No final LayerNorm after the blocks: MultiMAE has none.

    def tokenize(self, inputs: dict) -> dict:
        return {m: self.input_adapters[m](x) for m, x in inputs.items() if m in self.input_adapters}

    def encode(self, tokens: torch.Tensor, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, L, W] (+ pad Bool[B, L], True = ignore) -> [B, L + G, W]."""
        B = tokens.shape[0]
        x = torch.cat([tokens, self.global_tokens.expand(B, -1, -1)], dim=1)
        key_mask = None
        if pad is not None:
            key_mask = torch.cat([~pad, pad.new_ones(B, self.cfg.num_global_tokens)], dim=1)
        for block in self.encoder:
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                # The RNG state is replayed in the recomputation: stochastic depth drops the same.
                x = torch.utils.checkpoint.checkpoint(block, x, key_mask, self.shard, use_reentrant=False)
            else:
                x = block(x, key_mask, self.shard)
        return x

    def init_weights(self):
        """MultiMAE's initialisation: xavier-uniform linears (q, k, v treated as separate
        matrices), patch projections like linears, truncated-normal embeddings."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                fan_out = m.weight.shape[0] // (3 if name.endswith("qkv") else 2 if name.endswith(".kv") else 1)
                bound = math.sqrt(6.0 / (fan_out + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and name.endswith(".proj"):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("global_tokens", "mask_token")) or ".task_embeddings." in name:
                nn.init.trunc_normal_(p, std=0.02)


# -----------------------------------------------------------------------------
# Pre-training: MIM heads with cross-attention (MultiMAE's SpatialOutputAdapter)


class SpatialOutputAdapter(nn.Module):
    def __init__(self, cfg: ModelConfig, task: str, channels: int, stride: int):
        super().__init__()
        d, self.task, self.channels = cfg.dec_width, task, channels
        self.P = cfg.patch_size // stride                    # output pixels per patch side
        self.proj_context = nn.Linear(cfg.width, d)
        self.modalities = cfg.modalities
        self.task_embeddings = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, d)) for m in cfg.modalities})
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.query_norm = nn.LayerNorm(d, eps=1e-6)
        self.context_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder = CrossAttention(d, cfg.dec_heads)
        self.out_norm = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, 4 * d)
        self.decoder_transformer = nn.Sequential(*[Block(d, cfg.dec_heads) for _ in range(cfg.dec_depth)])
        self.out_proj = nn.Linear(d, channels * self.P * self.P)

    def forward(self, encoded, masked: masking.Masked, grid):
        """encoded [B, V+G, width] -> (prediction [B, C, h*P, w*P], token embeddings [B, N, d])."""
        B, L = masked.mask.shape
        V = masked.ids_keep.shape[1]
        K, (h, w) = len(self.modalities), grid
        N = L // K
        ctx = self.proj_context(encoded)
        visible, global_ = ctx[:, :V], ctx[:, V:]
        d = ctx.shape[-1]
        # MAE's unshuffle: mask tokens fill the hidden slots, everything back in place.
        full = torch.cat([visible, self.mask_token.expand(B, L - V, d)], dim=1)
        full = torch.gather(full, 1, masked.ids_restore.unsqueeze(-1).expand(B, L, d))
        if masked.pad is not None:   # "mae" scheme: slots of dropped modalities are hidden too
            full = torch.where(masked.mask.unsqueeze(-1), self.mask_token.to(full.dtype), full)
        # Every slot learns which modality and which position it is.
        pos = sincos_pos_embed(h, w, d, full.device)
        full = full + torch.cat([self.task_embeddings[m] + pos for m in self.modalities], dim=1)
        k = self.modalities.index(self.task)
        queries = full[:, k * N:(k + 1) * N]
        context = torch.cat([torch.gather(full, 1, masked.ids_keep.unsqueeze(-1).expand(B, V, d)), global_], dim=1)
        key_mask = None
        if masked.pad is not None:
            key_mask = torch.cat([~masked.pad, masked.pad.new_ones(B, global_.shape[1])], dim=1)
        # The paper's "cross-attention module": no residual around it (as MultiMAE), then an MLP.
        x = self.decoder(self.query_norm(queries), self.context_norm(context), key_mask)
        tokens = x + self.mlp(self.out_norm(x))
        # The paper's "MIM head": self-attention blocks, then pixels of every patch.
        y = self.out_proj(self.decoder_transformer(tokens))
        P, C = self.P, self.channels
        pred = y.view(B, h, w, C, P, P).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * P, w * P)
        return pred, tokens


class MaskMentor(MultiViT):
    """The pre-training network: trunk + one MIM head per modality, then MultiMAE's extra
    head on the per-patch-normalised map (norm_rgb) for the rows that ask for one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.modalities)
        heads = {}
        for m in cfg.modalities:              # a "labels" row predicts one logit per class
            spec = MODALITIES[m]
            heads[m] = (m, spec.channels or cfg.num_classes, spec.stride)
        for m in cfg.modalities:
            if MODALITIES[m].norm_head and cfg.norm_rgb_head:
                heads[f"norm_{m}"] = (m, MODALITIES[m].channels, 1)
        self.output_adapters = nn.ModuleDict({
            name: SpatialOutputAdapter(cfg, task, c, s) for name, (task, c, s) in heads.items()})
        self.init_weights()

    def num_tokens(self, height: int, width: int) -> int:
        """N, the tokens per modality of an image of this size."""
        h, w = self.cfg.grid(height, width)
        return h * w

    def forward(self, inputs: dict, plan: masking.MaskPlan):
        """inputs: modalities.prepare_inputs(batch) with every modality of cfg.modalities;
        plan: masking.plan_masking. Returns (predictions per head, output token embeddings
        per head, the Masked record)."""
        grid = self.cfg.grid(*image_size(inputs))
        tokens = self.tokenize(inputs)
        x = torch.cat([tokens[m] for m in self.inputs], dim=1)       # [B, K*N, width]
        masked = masking.apply_masking(x, plan)
        encoded = self.encode(masked.visible, masked.pad)
        preds, embeddings = {}, {}
        for name, head in self.output_adapters.items():
            preds[name], embeddings[name] = head(encoded, masked, grid)
        return preds, embeddings, masked


# -----------------------------------------------------------------------------
# Fine-tuning: the ConvNeXt segmentation head (MultiMAE's ConvNeXtAdapter)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, 4x MLP, residual (Liu et al. 2022)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """F.interpolate(x, size, mode="bilinear", align_corners=False) as two matmuls with the
    1-D interpolation weights (each output row mixes two input rows). Equal to rounding;
    used under torch.compile, where inductor turns F.interpolate's backward into a
    scatter-add that took ~9x eager's time on CPU (109 ms of a 230 ms tiny fine-tuning
    step), while a matmul's backward is two matmuls."""
    def weights(n_out: int, n_in: int) -> torch.Tensor:
        # Output pixel i samples the input at (i + 0.5) * n_in / n_out - 0.5 (pixel centres),
        # clamped at the first pixel; it mixes its two neighbours linearly.
        src = ((torch.arange(n_out, device=x.device, dtype=torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
        lo = src.floor().clamp_max(n_in - 1)
        hi = (lo + 1).clamp_max(n_in - 1)
        frac = (src - lo)[:, None]
        cols = torch.arange(n_in, device=x.device, dtype=torch.float32)
        return ((cols == lo[:, None]) * (1 - frac) + (cols == hi[:, None]) * frac).to(x.dtype)

    (H, W), (h, w) = size, x.shape[-2:]
    return weights(H, h) @ x @ weights(W, w).t()


class ConvNeXtAdapter(nn.Module):
    """Each token -> a (patch/4)x(patch/4) block of seg_dim features at 1/4 resolution
    (Linear 768 -> 6144 = 16 x 384 for ViT-B), ConvNeXt blocks, 1x1 conv to classes,
    bilinear upsampling to the image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.r = cfg.patch_size // 4                       # 1/4-resolution pixels per patch side
        self.dim = cfg.seg_dim
        self.proj_dec = nn.Linear(cfg.width, self.r * self.r * cfg.seg_dim)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(cfg.seg_dim) for _ in range(cfg.seg_depth)])
        self.final_layer = nn.Conv2d(cfg.seg_dim, cfg.num_classes, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens, grid, size):
        B, (h, w), r = tokens.shape[0], grid, self.r
        x = self.proj_dec(tokens).view(B, h, w, r, r, self.dim)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(B, self.dim, h * r, w * r)
        x = self.final_layer(self.blocks(x))
        if torch.compiler.is_compiling():
            return resize_bilinear(x, size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Segmenter(MultiViT):
    """The fine-tuned network: trunk (the adapters of the segmenter inputs: rgb and depth)
    + ConvNeXt head.

    Works with rgb only, depth only, or both. MultiMAE's head concatenates the tokens of
    fixed modalities; with modalities that may be missing we instead average, at each
    patch position, the encoder tokens of the modalities that are present (decision D8 of
    docs/method.md: it needs no new parameters and treats every subset alike).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, modalities.segmenter_inputs(cfg.modalities))
        self.init_weights()
        # Created after init_weights: the head keeps its own (MultiMAE) initialisation.
        self.output_adapters = nn.ModuleDict({"semseg": ConvNeXtAdapter(cfg)})

    def forward(self, inputs: dict, present: Optional[torch.Tensor] = None):
        """inputs: modalities.prepare_inputs() of some of self.inputs (rgb and/or depth).
        present: optional Bool[B, len(self.inputs)] choosing per sample which inputs the
        network may see — all tensors must then be given; absent ones become padding the
        encoder ignores. Returns logits [B, C, H, W]."""
        given = [m for m in self.inputs if m in inputs]
        if not given:
            raise ValueError(f"Segmenter needs one of {', '.join(self.inputs)}")
        H, W = inputs[given[0]].shape[-2:]
        grid = self.cfg.grid(H, W)
        N = grid[0] * grid[1]
        tokens = self.tokenize({m: inputs[m] for m in given})
        x = torch.cat([tokens[m] for m in given], dim=1)
        B, M = x.shape[0], len(given)
        if present is None:
            weight = x.new_ones(B, M)
            pad = None
        else:
            sub = present[:, [self.inputs.index(m) for m in given]]
            # A check on the values: eager only (a compiled graph cannot branch on data;
            # fine-tuning's draw never leaves a sample empty).
            if not torch.compiler.is_compiling() and not sub.any(dim=1).all():
                raise ValueError("every sample needs at least one present modality")
            weight = sub.to(x.dtype)
            pad = (~sub).repeat_interleave(N, dim=1)
        encoded = self.encode(x, pad)[:, :M * N].reshape(B, M, N, -1)
        fused = (encoded * weight[:, :, None, None]).sum(1) / weight.sum(1)[:, None, None]
        return self.output_adapters["semseg"](fused, grid, (H, W))


def trunk_state_dict(state: dict, inputs: tuple) -> dict:
    """The part of a pre-training state dict that fine-tuning keeps: the encoder, the
    global token and the input adapters of the segmenter's `inputs` (rgb, depth); the MIM
    heads and the semseg input adapter are discarded (paper §3.2)."""
    keep = ("encoder.", "global_tokens") + tuple(f"input_adapters.{m}." for m in inputs)
    return {k: v for k, v in state.items() if k.startswith(keep)}


# -----------------------------------------------------------------------------
# Loading ViT-B weights (paper §4.1: "We adopt ViT-B as the encoder, while other network
# parameters are all randomly initialized"). Pure functions: the scripts read the file.
#
# Two key layouts are recognised:
#   MultiMAE (and this project's own checkpoints): our names already, `encoder.N.*`,
#     `global_tokens`, `input_adapters.<m>.{proj,class_emb,pos_emb}`; `output_adapters.*`
#     (MIM heads / task heads) are not the encoder and are ignored.
#   timm / MAE ViT: `blocks.N.*` -> `encoder.N.*` (same sub-names), `patch_embed.proj` ->
#     the rgb adapter's `proj`, `cls_token` + its position -> the global token, `pos_embed`
#     -> the position table; as MultiMAE's tools/vit2multimae_converter.py does. The final
#     `norm`, `fc_norm`, `head` and MAE's decoder (`decoder_*`, `mask_token`) are ignored.

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


def load_encoder_weights(model: "MultiViT", state: dict) -> InitReport:
    """encoder_state_from_checkpoint, then load it into `model` (in place)."""
    mapped, report = encoder_state_from_checkpoint(state, model)
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys   # the mapping names only our keys
    return report
