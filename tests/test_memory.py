"""One GPU, any memory: --grad_ckpt recomputes instead of storing, --accum_steps splits a
batch; neither changes what is learned (the objectives under --accum_steps, step by step:
tests/test_accum.py)."""
import pytest
import torch

import finetune
import train
from conftest import key_bias_free

FT = ["--pretrained", "none", "--subset", "32", "--batch_size", "16", "--epochs", "1", "--drop_path", "0.2"]
PRE = ["--subset", "32", "--batch_size", "16", "--epochs", "2", "--warmup_epochs", "1", "--vis_every", "0"]


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train", "finetune"])
def test_gradient_checkpointing_learns_the_same_weights(tmp_path, script):
    """Stochastic depth included (finetune): the recomputation replays the RNG state."""
    main, args = (train.main, PRE) if script == "train" else (finetune.main, FT)
    main(args + ["--out_dir", str(tmp_path / "plain")])
    main(args + ["--out_dir", str(tmp_path / "ckpt"), "--grad_ckpt"])
    assert_same_weights(weights(tmp_path / "plain" / "ckpt.pt"), weights(tmp_path / "ckpt" / "ckpt.pt"),
                        atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train", "finetune"])
def test_accumulation_with_checkpointing_learns_the_same_weights(tmp_path, script):
    """4 micro-batches of 4 images with recomputation = batches of 16: the micro-batches'
    stochastic-depth rows and the recomputation's RNG replay compose (AdamW: see
    conftest.key_bias_free)."""
    main, args = (train.main, PRE) if script == "train" else (finetune.main, FT)
    main(args + ["--out_dir", str(tmp_path / "plain")])
    main(args + ["--out_dir", str(tmp_path / "accum"), "--accum_steps", "4", "--grad_ckpt"])
    a, b = weights(tmp_path / "plain" / "ckpt.pt"), weights(tmp_path / "accum" / "ckpt.pt")
    assert_same_weights({k: key_bias_free(k, v) for k, v in a.items()},
                        {k: key_bias_free(k, v) for k, v in b.items()}, atol=1e-5, rtol=1e-4)
