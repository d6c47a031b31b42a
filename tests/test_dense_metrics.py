"""Tests for sidetune.tasks: segmentation mIoU and COCO box / mask mAP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from sidetune.data import BCCD_CLASSES, VOCDetectionDataset, to_coco
from sidetune.errors import ConfigError
from sidetune.heads import IGNORE_INDEX
from sidetune.tasks import (
    CocoEvaluator,
    SegmentationMetrics,
    coco_evaluate,
    coco_ground_truth,
    confusion_matrix,
    mean_iou,
    to_coco_results,
)


# -- segmentation ---------------------------------------------------------------------------------------------
def test_mean_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = confusion_matrix(preds[None], target[None], 4)
    assert cm.sum() == 6  # ignored pixels are not counted, whatever was predicted there
    miou, iou = mean_iou(preds[None], target[None], 4)
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2; class 3: absent
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 2 / 3, 1 / 2]))
    assert math.isnan(iou[3]) and miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_segmentation_metrics_match_torchmetrics_and_accumulate():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 16, 16), generator=g)
    target[:, :2] = IGNORE_INDEX
    logits = torch.randn(4, 5, 16, 16, generator=g)
    ours = SegmentationMetrics(5, class_names=list("abcde"))
    for i in range(4):  # batch by batch == all at once
        ours.update(logits[i : i + 1], target[i : i + 1])
    result = ours.compute()
    reference = MulticlassJaccardIndex(5, average=None, ignore_index=IGNORE_INDEX)(logits.argmax(1), target)
    torch.testing.assert_close(torch.tensor(list(result["IoU"].values())), reference)
    assert result["mIoU"] == pytest.approx(float(reference.mean()))
    valid = target != IGNORE_INDEX
    assert result["aAcc"] == pytest.approx(float((logits.argmax(1) == target)[valid].float().mean()))
    ours.reset()
    assert math.isnan(ours.compute()["mIoU"])
    with pytest.raises(ConfigError, match="labels outside"):
        ours.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 7))


# -- detection ------------------------------------------------------------------------------------------------
def synthetic_targets():
    """Two images, three objects of two classes, with instance masks."""
    targets = []
    for image_id, objects in ((1, [(1, (4, 4, 20, 24)), (2, (30, 10, 60, 40))]), (2, [(1, (10, 10, 50, 30))])):
        masks = torch.zeros(len(objects), 48, 64, dtype=torch.uint8)
        for j, (_, (x1, y1, x2, y2)) in enumerate(objects):
            masks[j, y1:y2, x1:x2] = 1
            masks[j, y1 : y1 + 3, x1 : x1 + 3] = 0  # not a box: box and mask IoU differ
        targets.append(
            {
                "image_id": image_id,
                "labels": torch.tensor([c for c, _ in objects]),
                "boxes": torch.tensor([b for _, b in objects], dtype=torch.float32),
                "masks": masks,
            }
        )
    return targets


def perfect(targets):
    return [
        {
            "boxes": t["boxes"],
            "labels": t["labels"],
            "scores": torch.ones(len(t["labels"])),
            "masks": t["masks"][:, None].float(),  # Mask R-CNN layout: (N, 1, H, W) probabilities
        }
        for t in targets
    ]


def test_perfect_predictions_score_one_and_empty_predictions_zero():
    targets = synthetic_targets()
    gt = coco_ground_truth(targets, ["a", "b"])
    ids = [t["image_id"] for t in targets]
    results = to_coco_results(perfect(targets), ids, iou_types=("bbox", "segm"))
    metrics = coco_evaluate(gt, results)
    assert metrics["bbox_mAP"] == pytest.approx(1.0) and metrics["segm_mAP"] == pytest.approx(1.0)
    assert metrics["bbox_mAP_50"] == pytest.approx(1.0) and metrics["segm_AR_100"] == pytest.approx(1.0)
    assert math.isnan(metrics["bbox_mAP_large"])  # no ground truth that large: nan, not COCOeval's -1
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0),
              "masks": torch.zeros(0, 1, 48, 64)} for _ in targets]  # fmt: skip
    metrics = coco_evaluate(gt, to_coco_results(empty, ids, iou_types=("bbox", "segm")))
    assert metrics["bbox_mAP"] == 0.0 and metrics["segm_mAP"] == 0.0


def test_partial_predictions_and_the_evaluator():
    targets = synthetic_targets()
    gt = coco_ground_truth(targets, ["a", "b"])
    outputs = perfect(targets)
    wrong = dict(outputs[1], labels=torch.tensor([2]))  # the right box with the wrong class
    evaluator = CocoEvaluator(gt, ("bbox", "segm"))
    evaluator.update(outputs[:1], targets[:1])
    evaluator.update([wrong], [2])
    metrics = evaluator.compute()
    assert 0.0 < metrics["bbox_mAP"] < 1.0 and 0.0 < metrics["segm_mAP"] < 1.0
    # only the images seen are evaluated
    only_first = CocoEvaluator(gt)
    only_first.update(outputs[:1], targets[:1])
    assert only_first.compute()["bbox_mAP"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="not in the ground truth"):
        only_first.update(outputs[:1], [99])


def test_label_to_category_maps_back_to_dataset_ids():
    targets = synthetic_targets()[:1]
    outputs = perfect(targets)
    results = to_coco_results(outputs, [1], label_to_category=[7, 3])
    assert sorted({r["category_id"] for r in results["bbox"]}) == [3, 7]
    assert to_coco_results(outputs, [1], label_to_category={1: 5, 2: 6})["bbox"][0]["category_id"] == 5
    with pytest.raises(ConfigError, match="masks"):
        to_coco_results([{k: v for k, v in outputs[0].items() if k != "masks"}], [1], iou_types=("segm",))
    with pytest.raises(ConfigError, match="IoU type"):
        to_coco_results(outputs, [1], iou_types=("keypoints",))


def test_voc_dataset_ground_truth_scores_its_own_boxes(tmp_path: Path):
    root = tmp_path
    (root / "JPEGImages").mkdir()
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for name, box in (("a", (5, 5, 30, 30)), ("b", (20, 10, 60, 40))):
        Image.new("RGB", (64, 48)).save(root / "JPEGImages" / f"{name}.jpg")
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><size><width>64</width><height>48</height></size><object><name>RBC</name><bndbox>"
            f"<xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox>"
            "</object></annotation>"
        )
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\nb\n")
    ds = VOCDetectionDataset(root, "val", classes=BCCD_CLASSES)
    evaluator = CocoEvaluator(to_coco(ds))
    for i in range(len(ds)):
        _, target = ds[i]
        boxes = target["boxes"].as_subclass(torch.Tensor)
        evaluator.update([{"boxes": boxes, "labels": target["labels"], "scores": torch.ones(len(boxes))}], [target])
    assert evaluator.compute()["bbox_mAP"] == pytest.approx(1.0)
