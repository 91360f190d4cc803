"""evaluate.py's metrics against confusion matrices worked out by hand."""
import math

import pytest
import torch

from evaluate import confusion_matrix, pad_to_multiple, scores


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


def test_pad_to_multiple_pads_with_ignore():
    b = {"rgb": torch.ones(1, 3, 5, 7), "depth": torch.ones(1, 1, 5, 7), "semseg": torch.zeros(1, 5, 7, dtype=torch.long)}
    p = pad_to_multiple(b, 4)
    assert p["rgb"].shape == (1, 3, 8, 8) and p["semseg"].shape == (1, 8, 8)
    assert (p["semseg"][:, 5:] == 255).all() and (p["semseg"][:, :, 7:] == 255).all()
    assert (p["depth"][:, :, 5:] == 0).all()
    assert torch.equal(p["semseg"][:, :5, :7], b["semseg"])
