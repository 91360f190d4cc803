"""--init: ViT-B weights (MultiMAE, MAE, timm) into our encoder (model.py, "Loading ViT-B
weights"; checkpoints.py reads the file). The key test: a timm ViT and our encoder loaded
from its state dict compute the same tokens. Then MAE's and MultiMAE's files as their
save_model writes them (args a Namespace, numpy scalars: checkpoints.ALLOW_LIST), refusals,
grid resizing, and the loaded position table surviving a checkpoint round trip."""
import argparse
import dataclasses
import io
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from util import checkpoints
import modalities
import model as M
from util import vit_weights
from util.cli import UserError
from conftest import tiny



def load_file(net, path):
    """What `--init path` does (train.py, finetune.py)."""
    return checkpoints.init_encoder(net, str(path))


def timm_vit(timm, cfg: M.ModelConfig, **kw):
    """A timm VisionTransformer of cfg's shape (ViT-B: timm's own vit_base_patch16_224),
    every weight perturbed so that nothing is 0 or 1 by construction (timm starts
    cls_token at ~0 and biases at 0)."""
    if cfg == dataclasses.replace(M.PRESETS["base"], num_classes=cfg.num_classes) and not kw:
        vit = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    else:
        from timm.models.vision_transformer import VisionTransformer
        vit = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
                                depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                                qkv_bias=True, num_classes=10, **kw).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        vit.cls_token.normal_(0, 0.5, generator=g)
        vit.pos_embed.normal_(0, 0.5, generator=g)
    return vit


def vit_state(cfg: M.ModelConfig, grid=None, patch=None, width=None, depth=None, only=None) -> dict:
    """A random timm/MAE-named ViT state dict (no timm needed), shapes overridable; `only`:
    just these tensors of each block (a ViT-L in full would be 1.2 GB)."""
    D, p, L = width or cfg.width, patch or cfg.patch_size, depth or cfg.depth
    h = grid or cfg.image_size // cfg.patch_size
    s = {"cls_token": torch.randn(1, 1, D), "pos_embed": torch.randn(1, 1 + h * h, D),
         "patch_embed.proj.weight": torch.randn(D, 3, p, p), "patch_embed.proj.bias": torch.randn(D),
         "norm.weight": torch.ones(D), "norm.bias": torch.zeros(D)}
    shapes = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
              "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
              "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D),
              "mlp.fc2.bias": (D,)}
    for i in range(L):
        s.update({f"blocks.{i}.{k}": torch.randn(shape) * 0.02 for k, shape in shapes.items()
                  if only is None or k in only})
    return s


def save_model_file(state: dict, args: argparse.Namespace) -> dict:
    """What MAE's util/misc.py and MultiMAE's utils/checkpoint.py save_model write:
    {"model", "optimizer", "epoch", "scaler", "args"}, the optimiser an AdamW that made a
    step, the scaler torch's GradScaler state, args the script's argparse.Namespace."""
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=float(args.lr), betas=(0.9, 0.95))
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    return {"model": state, "optimizer": optimizer.state_dict(), "epoch": 1599,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 812},
            "args": args}


def mae_args() -> argparse.Namespace:
    """MAE's main_pretrain.py command line (defaults of its flags, ViT-B), with what main()
    and init_distributed_mode() add (lr, rank, gpu, distributed, dist_backend)."""
    return argparse.Namespace(
        batch_size=64, epochs=1600, accum_iter=1, model="mae_vit_base_patch16", input_size=224, mask_ratio=0.75,
        norm_pix_loss=True, weight_decay=0.05, lr=0.0024, blr=1.5e-4, min_lr=0.0, warmup_epochs=40,
        data_path="/datasets01/imagenet_full_size/061417/", output_dir="./output_dir", log_dir="./output_dir",
        device="cuda", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True, world_size=64, local_rank=-1,
        dist_on_itp=False, dist_url="env://", rank=0, gpu=0, distributed=True, dist_backend="nccl")


def multimae_args() -> argparse.Namespace:
    """MultiMAE's run_pretraining_multimae.py command line (a few of its flags), with what
    main() adds (the domain lists). Numpy scalars turn up in such files when a value was
    computed with numpy: lr is one here."""
    return argparse.Namespace(
        batch_size=256, epochs=1600, in_domains=["rgb", "depth", "semseg"], out_domains=["rgb", "depth", "semseg"],
        all_domains=["depth", "rgb", "semseg"], standardize_depth=True, extra_norm_pix_loss=True,
        model="pretrain_multimae_base", num_encoded_tokens=98, num_global_tokens=1, patch_size=16, input_size=224,
        alphas=1.0, decoder_dim=256, decoder_depth=2, opt_betas=[0.9, 0.95], clip_grad=None, blr=1e-4,
        lr=np.float64(1e-4) * 2048 / 256, warmup_epochs=40, output_dir="output/pretrain", seed=0)


def timm_tokens(vit, x):
    """timm's encoder without its final norm: patch_embed -> _pos_embed (cls first) -> blocks."""
    return vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))


@pytest.mark.parametrize("preset", ["tiny", pytest.param("base", marks=pytest.mark.slow)])
def test_timm_vit_and_our_encoder_compute_the_same_tokens(preset, tmp_path):
    import timm                 # requirements.txt: a test dependency, on CI too
    cfg = dataclasses.replace(M.PRESETS[preset], num_classes=7)
    vit = timm_vit(timm, cfg)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    net = M.Segmenter(cfg).eval()
    report = load_file(net, path)

    assert report.source == "timm/MAE ViT"
    assert {"norm.weight", "norm.bias", "head.weight", "head.bias"} <= set(report.ignored)
    assert "global_tokens" in report.loaded and "input_adapters.depth.pos_emb" in report.loaded
    assert not any(k.startswith(("encoder.", "input_adapters.rgb.")) for k in report.missing)
    assert set(report.missing) >= {"input_adapters.depth.proj.weight", "input_adapters.depth.proj.bias"}
    assert all(k.startswith(("input_adapters.depth.", "output_adapters.")) for k in report.missing)
    assert not any("pos_emb" in n for n, _ in net.named_parameters())     # a fixed table, not trained

    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    N = (cfg.image_size // cfg.patch_size) ** 2
    with torch.no_grad():
        ref = timm_tokens(vit, x)                                  # [B, 1 + N, D], cls first
        ours = net.encode(net.tokenize({"rgb": x})["rgb"])         # [B, N + 1, D], global token last
        torch.testing.assert_close(ours[:, :N], ref[:, 1:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours[:, N], ref[:, 0], atol=1e-4, rtol=1e-4)
        # depth's adapter uses the same loaded positions
        d = torch.randn(2, 1, cfg.image_size, cfg.image_size)
        a = net.input_adapters["depth"]
        torch.testing.assert_close(a(d), a.proj(d).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:])
        if preset == "base":   # the 224 table at 320x320: resized, tokens computed
            big = torch.randn(1, 3, 320, 320)
            assert net.encode(net.tokenize({"rgb": big})["rgb"]).shape == (1, 401, 768)
            assert net({"rgb": big}).shape == (1, 7, 320, 320)


def test_timm_vit_with_layer_scale_is_refused():
    import timm                 # requirements.txt: a test dependency, on CI too
    vit = timm_vit(timm, tiny(), init_values=1e-5)                 # blocks.N.ls1.gamma
    with pytest.raises(ValueError, match="ls1.gamma"):
        vit_weights.load_encoder_weights(M.Segmenter(tiny()), vit.state_dict())


def test_mae_checkpoint_loads_and_reports_its_decoder_ignored(tmp_path):
    cfg = tiny()
    state = vit_state(cfg)
    state["pos_embed"][:, 0] = 0                                   # MAE: the cls position is zeros
    D, d = cfg.width, 64
    state.update({"mask_token": torch.zeros(1, 1, d), "decoder_embed.weight": torch.randn(d, D),
                  "decoder_embed.bias": torch.zeros(d), "decoder_pos_embed": torch.randn(1, 65, d),
                  "decoder_norm.weight": torch.ones(d), "decoder_norm.bias": torch.zeros(d),
                  "decoder_pred.weight": torch.randn(192, d), "decoder_pred.bias": torch.zeros(192)})
    for i in range(8):
        state.update({f"decoder_blocks.{i}.{k}": torch.randn(d) for k in ("norm1.weight", "norm2.bias")})
    path = tmp_path / "mae.pth"
    torch.save(save_model_file(state, mae_args()), path)
    net = M.MaskMentor(cfg)
    report = load_file(net, path)

    decoder = [k for k in state if k.startswith(("decoder_", "mask_token"))]
    assert all(report.ignored[k] == "MAE's decoder" for k in decoder)
    assert report.ignored["norm.weight"].startswith("final LayerNorm")
    lines = report.summary()
    assert len(lines) <= 8 and any("MAE's decoder" in line for line in lines)     # summarised
    assert sum("decoder_blocks" in line for line in lines) == 1
    torch.testing.assert_close(net.encoder[3].mlp.fc2.weight, state["blocks.3.mlp.fc2.weight"])
    torch.testing.assert_close(net.global_tokens, state["cls_token"])
    # rgb-only weights: depth and semseg projections and the MIM heads stay random
    assert {"input_adapters.depth.proj.weight", "input_adapters.semseg.class_emb.weight"} <= set(report.missing)
    assert any(k.startswith("output_adapters.rgb.") for k in report.missing)
    for m in modalities.DEFAULT:                                         # every adapter: the loaded table
        torch.testing.assert_close(net.input_adapters[m].pos_emb.flatten(2).transpose(1, 2),
                                   state["pos_embed"][:, 1:])


def multimae_state(cfg, class_rows=133):
    """A MultiMAE-layout checkpoint made from our own MaskMentor: COCO's 133-class
    embedding and a stored pos_emb [1, D, h, w] per adapter (different ones here, to see
    that each adapter takes its own)."""
    torch.manual_seed(1)
    state = M.MaskMentor(cfg).state_dict()
    h = cfg.image_size // cfg.patch_size
    state["input_adapters.semseg.class_emb.weight"] = torch.randn(class_rows, cfg.semseg_emb_dim)
    for m in modalities.DEFAULT:
        state[f"input_adapters.{m}.pos_emb"] = torch.randn(1, cfg.width, h, h)
    # MultiMAE's decoders: ours key for key, plus their stored sin-cos table, and the semseg
    # decoder predicting COCO's classes.
    for head in ("rgb", "depth", "semseg", "norm_rgb"):
        state[f"output_adapters.{head}.pos_emb"] = torch.randn(1, h, h, cfg.dec_width)
    p = cfg.patch_size // 4
    state["output_adapters.semseg.out_proj.weight"] = torch.randn(class_rows * p * p, cfg.dec_width)
    state["output_adapters.semseg.out_proj.bias"] = torch.randn(class_rows * p * p)
    return state


def test_multimae_checkpoint_loads_the_encoder_and_its_position_tables(tmp_path):
    cfg = tiny()
    state = multimae_state(cfg)
    path = tmp_path / "multimae.pth"
    torch.save(save_model_file(state, multimae_args()), path)
    torch.manual_seed(2)
    net = M.MaskMentor(cfg).eval()
    report = load_file(net, path)

    assert report.source == "MultiMAE"
    assert "rows" in report.ignored["input_adapters.semseg.class_emb.weight"]   # 133 classes != 7 + 1
    assert "input_adapters.semseg.class_emb.weight" in report.missing
    # a pre-training network takes MultiMAE's decoders too, but their stored positions and
    # an output layer for other classes
    for k in state:
        if k.startswith("output_adapters."):
            skipped = k.endswith("pos_emb") or k.startswith("output_adapters.semseg.out_proj")
            assert (k in report.ignored) == skipped, k
    assert "output_adapters.semseg.out_proj.weight" in report.missing
    assert not any(k.startswith(("encoder.", "global_tokens", "input_adapters.rgb.")) for k in report.missing)
    own = net.state_dict()
    for k, v in state.items():
        if k in report.loaded:
            torch.testing.assert_close(own[k], v)
    assert sum(k.startswith("output_adapters.") for k in report.loaded) > 100
    # a fine-tuning network has no decoders: ignored
    seg_report = vit_weights.load_encoder_weights(M.Segmenter(cfg), state)
    assert all(k in seg_report.ignored for k in state if k.startswith("output_adapters."))
    x = {"rgb": torch.randn(2, 3, 64, 64), "depth": torch.randn(2, 1, 64, 64),
         "semseg": torch.randint(0, 7, (2, 16, 16))}
    with torch.no_grad():
        for m, a in net.input_adapters.items():
            proj = a.proj(x[m]) if m != "semseg" else a.proj(a.class_emb(x[m]).permute(0, 3, 1, 2))
            table = state[f"input_adapters.{m}.pos_emb"]
            expected = proj.flatten(2).transpose(1, 2) + table.flatten(2).transpose(1, 2)
            torch.testing.assert_close(a(x[m]), expected)

    # The same classes without our 'ignore' row are padded (MultiMAE's fine-tuning does so);
    # the fine-tuning model has no semseg input: its table is ignored.
    state = multimae_state(cfg, class_rows=7)
    report = vit_weights.load_encoder_weights(M.MaskMentor(cfg), state)
    assert "input_adapters.semseg.class_emb.weight" in report.loaded
    report = vit_weights.load_encoder_weights(M.Segmenter(cfg), state)
    assert report.ignored["input_adapters.semseg.pos_emb"] == "no such input in this model"


@pytest.fixture(scope="module")
def vit_b():
    return M.Segmenter(M.PRESETS["base"])


@pytest.mark.parametrize("kw", [dict(width=1024, depth=24), dict(patch=14), dict(width=384), dict(depth=6)],
                         ids=["ViT-L", "patch14", "ViT-S", "6-blocks"])
def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(kw, vit_b, tmp_path):
    state = vit_state(M.PRESETS["base"], only=("norm1.weight", "norm1.bias"), **kw)
    net = vit_b
    with pytest.raises(ValueError) as e:
        vit_weights.encoder_state_from_checkpoint(state, net)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit" in msg and "ViT-B/16" in msg, msg
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as e:
        checkpoints.init_encoder(net, str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_224_table_is_resized_for_another_grid():
    """A 14x14 table (224/16) on a 20x20 grid (320/16): bicubic, as MultiMAE's adapters do;
    shown here on the tiny model (8x8 table, 12x12 grid); ViT-B at 320 is in the slow test."""
    cfg = tiny()
    state = vit_state(cfg)
    net = M.Segmenter(dataclasses.replace(cfg, image_size=96)).eval()
    report = vit_weights.load_encoder_weights(net, state)
    assert any("resized to 12x12" in line for line in report.summary())
    table = state["pos_embed"][:, 1:].transpose(1, 2).reshape(1, cfg.width, 8, 8)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        a = net.input_adapters["rgb"]
        expected = a.proj(x).flatten(2).transpose(1, 2) + \
            F.interpolate(table, size=(12, 12), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        torch.testing.assert_close(a(x), expected)
        assert net({"rgb": x, "depth": torch.randn(1, 1, 96, 96)}).shape == (1, 7, 96, 96)
        assert net({"rgb": torch.randn(1, 3, 64, 64)}).shape == (1, 7, 64, 64)   # the table's own grid


def test_the_position_table_survives_save_and_load(tmp_path):
    cfg = tiny()
    assert not any("pos_emb" in k for k in M.MaskMentor(cfg).state_dict())   # nothing extra by default
    pre = M.MaskMentor(cfg)
    vit_weights.load_encoder_weights(pre, vit_state(cfg))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": pre.state_dict()}, path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert "input_adapters.depth.pos_emb" in saved

    again = M.MaskMentor(cfg)                        # train.py --resume / the kd teacher: strict
    again.load_state_dict(saved)
    for m in modalities.DEFAULT:
        torch.testing.assert_close(again.input_adapters[m].pos_emb, pre.input_adapters[m].pos_emb)
    seg = M.Segmenter(cfg).eval()                    # finetune.py --pretrained: the trunk, non-strict
    result = seg.load_state_dict(M.trunk_state_dict(saved, seg.inputs), strict=False)
    assert not result.unexpected_keys
    torch.testing.assert_close(seg.input_adapters["rgb"].pos_emb, pre.input_adapters["rgb"].pos_emb)
    fresh = M.Segmenter(cfg).eval()                  # evaluate.py: a fine-tuned checkpoint, strict
    fresh.load_state_dict(seg.state_dict())
    x = {"rgb": torch.randn(1, 3, 64, 64), "depth": torch.randn(1, 1, 64, 64)}
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), seg(x))


def test_not_a_vit_is_refused():
    with pytest.raises(ValueError, match="no ViT encoder"):
        vit_weights.encoder_state_from_checkpoint({"state_dict": {"conv1.weight": torch.zeros(1)}}, M.Segmenter(tiny()))


def test_init_encoder_turns_bad_files_into_one_line(tmp_path):
    net = M.Segmenter(tiny())
    with pytest.raises(UserError, match="no such file"):
        checkpoints.init_encoder(net, str(tmp_path / "missing.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint") as e:
        checkpoints.init_encoder(net, str(tmp_path / "bad.pth"))
    assert "\n" not in str(e.value)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable .safetensors file") as e:
        checkpoints.init_encoder(net, str(tmp_path / "bad.safetensors"))
    assert "\n" not in str(e.value)


def as_numpy1_wrote_it(path):
    """The file with its numpy scalars named as numpy 1.x pickled them (numpy.core, not
    numpy._core): MAE's and MultiMAE's files were written before numpy 2."""
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in entries:
            if name.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data or b"numpy.core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            z.writestr(name, data)
    path.write_bytes(out.getvalue())


def test_numpy_scalars_of_either_numpy_load_and_a_pickled_model_is_refused(tmp_path):
    cfg = tiny()
    args = mae_args()
    args.lr, args.epochs, args.norm_pix_loss = np.float32(0.0024), np.int64(1600), np.bool_(True)
    path = tmp_path / "mae.pth"
    torch.save(save_model_file(vit_state(cfg), args), path)
    as_numpy1_wrote_it(path)
    net = M.Segmenter(cfg)
    assert load_file(net, path).source == "timm/MAE ViT"
    loaded = checkpoints._torch_load(str(path), "x")["args"]
    assert (loaded.lr, loaded.epochs, loaded.norm_pix_loss) == (np.float32(0.0024), 1600, True)
    # A whole model pickled (torch.save(model)) would create its class: refused, named.
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pth")
    with pytest.raises(UserError) as e:
        checkpoints.init_encoder(net, str(tmp_path / "whole.pth"))
    assert "\n" not in str(e.value) and "refused" in str(e.value) and "torch.nn.modules.linear.Linear" in str(e.value)


def test_an_incomplete_or_foreign_encoder_is_refused_in_one_line():
    cfg = tiny()
    state = multimae_state(cfg)
    del state["encoder.2.mlp.fc1.weight"]
    with pytest.raises(ValueError, match="lacks 1 encoder tensor.*encoder.2.mlp.fc1.weight"):
        vit_weights.load_encoder_weights(M.MaskMentor(cfg), state)
    state = multimae_state(cfg)
    del state["global_tokens"]
    with pytest.raises(ValueError, match="global_tokens"):
        vit_weights.load_encoder_weights(M.Segmenter(cfg), state)
    renamed = {k.replace("encoder.", "encoder.layers."): v for k, v in multimae_state(cfg).items()}
    with pytest.raises(ValueError, match="encoder.layers.0.*not a block of MultiMAE's encoder"):
        vit_weights.load_encoder_weights(M.Segmenter(cfg), renamed)


def test_a_pre_training_checkpoint_of_this_project_initialises_everything(tmp_path):
    """train.py --init of a train.py ckpt.pt (the regime study's foundation): it is
    MultiMAE-shaped, so the encoder, every input adapter and the MIM heads load, all of
    them, value for value; a Segmenter takes its encoder and the adapters of its inputs."""
    import train
    train.main(["--subset", "16", "--batch_size", "8", "--epochs", "1", "--vis_every", "0", "--stop_after", "1",
                "--mode", "mim", "--out_dir", str(tmp_path / "a")])
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"), "pretrain")
    cfg = M.ModelConfig.from_dict(ckpt["model_config"])
    torch.manual_seed(1)
    net = M.MaskMentor(cfg)
    report = checkpoints.init_encoder(net, str(tmp_path / "a" / "ckpt.pt"))
    assert not report.missing and any(k.startswith("output_adapters.") for k in report.loaded)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in ckpt["model"].items())
    seg = M.Segmenter(dataclasses.replace(cfg, modalities=("depth",)))
    checkpoints.init_encoder(seg, str(tmp_path / "a" / "ckpt.pt"))
    own = seg.state_dict()
    assert all(torch.equal(ckpt["model"][k], own[k]) for k in own if k.startswith(("encoder.", "input_adapters.")))
