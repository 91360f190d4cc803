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
`global_tokens`, `output_adapters.depth.decoder.kv`, ...) so its checkpoints, and with a
renaming timm's and MAE's ViT-B, load into ours (util/vit_weights.py maps the keys).
Which modalities there are, and each one's adapter and head, comes from the table in
modalities.py (`ModelConfig.modalities` picks rows of it). This file knows nothing of
teachers, losses or schedules (sttp.py), nor of how a training step is run (util/).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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


class DropPath(nn.Module):
    """Stochastic depth (timm's DropPath): in training, the residual branch is dropped for
    whole samples with probability p and the kept ones are scaled by 1 / (1 - p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """One uniform number per sample of the batch x, shaped to broadcast over it."""
        return torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        return x * (self.draw(x) >= self.p).to(x.dtype) / (1 - self.p)


class Block(nn.Module):
    """Pre-norm ViT block; LayerNorm eps 1e-6 (MultiMAE)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, key_mask=None):
        x = x + self.drop_path(self.attn(self.norm1(x), key_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# -----------------------------------------------------------------------------
# Input adapters: one per modality


class _InputAdapter(nn.Module):
    """What the input adapters share: where the positions come from.

    By default the fixed sin-cos embedding, computed for the actual grid. Once ViT weights
    bringing their own table are loaded (timm's learned `pos_embed`, MultiMAE's stored
    `pos_emb`; util/vit_weights.py), that table [1, width, h, w] (MultiMAE's
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
                x = torch.utils.checkpoint.checkpoint(block, x, key_mask, use_reentrant=False)
            else:
                x = block(x, key_mask)
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
        return self.upsample(self.final_layer(self.blocks(x)), size)

    def upsample(self, x: torch.Tensor, size) -> torch.Tensor:
        """The 1/4-resolution logits -> the image's size, bilinearly (MultiMAE)."""
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
        network may see (at least one each) — all tensors must then be given; absent ones
        become padding the encoder ignores. Returns logits [B, C, H, W]."""
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
