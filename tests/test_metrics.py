"""evaluate.py's metrics against confusion matrices worked out by hand, and its padding."""
import math

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import model as M

import modalities
from evaluate import SETTINGS, confusion_matrix, predict, scores


def test_confusion_matrix_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = confusion_matrix(pred, target, 3)
    # rows = truth, columns = prediction; the 255 pixel is left out
    assert cm.tolist() == [[1, 1, 0],
                           [0, 2, 1],
                           [1, 0, 1]]


def test_scores_by_hand():
    cm = torch.tensor([[1, 1, 0],
                       [0, 2, 1],
                       [1, 0, 1]])
    s = scores(cm)
    iou = [1 / (2 + 2 - 1), 2 / (3 + 3 - 2), 1 / (2 + 2 - 1)]   # tp / (gt + pred - tp)
    acc = [1 / 2, 2 / 3, 1 / 2]
    assert s["per_class_iou"] == pytest.approx([100 * v for v in iou])
    assert s["miou"] == pytest.approx(100 * sum(iou) / 3)
    assert s["macc"] == pytest.approx(100 * sum(acc) / 3)


def test_absent_class_is_skipped_not_zero():
    # class 2 never appears in truth or prediction: no IoU, no accuracy
    cm = torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
    s = scores(cm)
    assert math.isnan(s["per_class_iou"][2])
    assert s["miou"] == pytest.approx(100 * (3 / 4 + 4 / 5) / 2)
    # a class predicted but absent from the truth counts in mIoU (IoU 0) but has no accuracy
    cm = torch.tensor([[3, 0, 1], [0, 4, 0], [0, 0, 0]])
    s = scores(cm)
    assert s["per_class_iou"][2] == 0.0
    assert s["miou"] == pytest.approx(100 * (3 / 4 + 1 + 0) / 3)
    assert s["macc"] == pytest.approx(100 * (3 / 4 + 1) / 2)


def test_accumulating_is_one_matrix_not_a_mean_of_images():
    t1, p1 = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0])
    t2, p2 = torch.tensor([1]), torch.tensor([1])
    cm = confusion_matrix(p1, t1, 2) + confusion_matrix(p2, t2, 2)
    assert cm.tolist() == [[3, 0], [1, 1]]
    assert scores(cm)["miou"] == pytest.approx(100 * (3 / 4 + 1 / 2) / 2)


def test_labels_out_of_range_are_an_error():
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 5]), 3)


def test_predict_pads_to_the_patch_grid_and_crops_back():
    net = M.Segmenter(replace(M.PRESETS["tiny"], num_classes=10)).eval()
    rgb, depth = torch.randn(2, 3, 13, 21), torch.rand(2, 1, 13, 21) + 0.5
    # An image larger than the fine-tuning crop (here 8) is padded to the patch grid only
    # (padding up to the crop: tests/test_evaluate.py).
    out = predict(net, {"rgb": rgb, "depth": depth}, list(SETTINGS), crop=8)
    assert set(out) == {"rgbd", "rgb", "depth"}
    assert all(p.shape == (2, 13, 21) for p in out.values())
    # = the network on a 16x24 canvas (rgb padded with the mean, depth with "missing"),
    # cropped back: the padded depth pixels don't enter the depth standardisation.
    inputs = modalities.prepare_inputs({"rgb": F.pad(rgb, (0, 3, 0, 3)), "depth": F.pad(depth, (0, 3, 0, 3))})
    assert torch.equal(out["rgbd"], net(inputs).argmax(1)[:, :13, :21])
    assert torch.equal(out["depth"], net({"depth": inputs["depth"]}).argmax(1)[:, :13, :21])
