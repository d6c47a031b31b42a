"""The classification and detection collapse warnings (issue 16.3) from metrics their own evaluators compute: a
class never predicted, a classifier no better than the majority class, a detection class with box AP 0. Each
warning is checked present when the predictions call for it, alone when only it applies, and absent for a model
that does its job, so removing a warning (or raising it always) fails here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sidetune.tasks import make_task
from sidetune.tasks.classification import ClassificationEvaluator
from sidetune.tasks.detection import coco_evaluate, coco_ground_truth, to_coco_results

CLASSES = ["a", "b", "c"]


class Predicts(torch.nn.Module):
    """A 'model' whose top-1 prediction for each image of the batch is given."""

    def __init__(self, predictions: list[int]) -> None:
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.tensor(predictions), len(CLASSES)).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


def classification_metrics(task: str, labels: list[int], predictions: list[int]) -> dict:
    """The metrics the task's own evaluator computes for these predictions (video: clips, no clip refused)."""
    split = SimpleNamespace(skipped=[])
    evaluator = make_task(task).evaluator(None, split, CLASSES) if task == "video" else None
    evaluator = evaluator or ClassificationEvaluator(len(CLASSES))
    evaluator.update(Predicts(predictions), (torch.zeros(len(labels), 3, 2, 2), torch.tensor(labels)))
    return evaluator.compute([evaluator.state()])


@pytest.mark.parametrize("task", ["classification", "video"])
def test_a_classifier_predicting_one_class_triggers_both_warnings(task):
    labels = [0, 0, 0, 1, 2]  # the majority class 'a' is 60% of the split
    metrics = classification_metrics(task, labels, [0, 0, 0, 0, 0])
    assert metrics["top1"] == pytest.approx(0.6)
    warnings = make_task(task).collapse_warnings(metrics, CLASSES)
    assert warnings == [
        "2 class(es) never predicted: b, c",
        "top-1 60.0% is no better than always predicting the majority class 'a' (60.0%): the model has not learnt "
        "to tell the classes apart",
    ]
    text = make_task(task).format_metrics(metrics, CLASSES)
    assert "per class, worst first (recall): b 0.000, c 0.000, a 1.000" in text
    assert text.count("\n  warning: ") == 2


def test_each_classification_warning_alone():
    task = make_task("classification")
    # every class predicted, yet 1 of 5 right: worse than always answering 'a' (60%)
    metrics = classification_metrics("classification", [0, 0, 0, 1, 2], [0, 1, 2, 0, 0])
    (warning,) = task.collapse_warnings(metrics, CLASSES)
    assert warning.startswith("top-1 20.0% is no better than always predicting the majority class 'a' (60.0%)")
    # 3 of 4 right (above the majority's 50%), but class 'c' is never predicted
    metrics = classification_metrics("classification", [0, 1, 1, 2], [0, 1, 1, 1])
    assert task.collapse_warnings(metrics, CLASSES) == ["1 class(es) never predicted: c"]
    # a class absent from the split is not 'never predicted'
    metrics = classification_metrics("classification", [0, 1, 1], [0, 1, 1])
    assert task.collapse_warnings(metrics, CLASSES) == []


def test_a_classifier_that_does_its_job_is_not_warned_about():
    metrics = classification_metrics("classification", [0, 0, 0, 1, 2], [0, 0, 1, 1, 2])
    assert make_task("classification").collapse_warnings(metrics, CLASSES) == []
    assert "warning" not in make_task("classification").format_metrics(metrics, CLASSES)


BOXES = {
    "cell": torch.tensor([[2.0, 2.0, 20.0, 20.0]]),
    "platelet": torch.tensor([[30.0, 30.0, 40.0, 44.0]]),
}


def detection_metrics(detections: list[tuple[list[float], int]]) -> dict:
    """COCOeval of one 64x64 image with a 'cell' (label 1) and a 'platelet' (label 2) against ``detections``."""
    target = {
        "image_id": 1,
        "boxes": torch.cat([BOXES["cell"], BOXES["platelet"]]),
        "labels": torch.tensor([1, 2]),
        "size": (64, 64),
    }
    gt = coco_ground_truth([target], ["cell", "platelet"])
    output = {
        "boxes": torch.tensor([box for box, _ in detections], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([label for _, label in detections], dtype=torch.long),
        "scores": torch.full((len(detections),), 0.9),
    }
    return coco_evaluate(gt, to_coco_results([output], [1]))


def test_a_detection_class_with_box_ap_0_is_warned_about():
    task = make_task("detection")
    cell, platelet = BOXES["cell"][0].tolist(), BOXES["platelet"][0].tolist()
    metrics = detection_metrics([(cell, 1), (platelet, 1)])  # the platelet is found, but called a cell
    assert metrics["bbox_AP_per_class"]["platelet"] == 0.0 and metrics["bbox_AP_per_class"]["cell"] > 0.5
    assert task.collapse_warnings(metrics, ["cell", "platelet"]) == ["1 class(es) with box AP 0: platelet"]
    assert "warning: 1 class(es) with box AP 0: platelet" in task.format_metrics(metrics, ["cell", "platelet"])
    nothing = detection_metrics([([50.0, 50.0, 60.0, 60.0], 1)])  # one box, on no object
    assert task.collapse_warnings(nothing, ["cell", "platelet"]) == [
        "box AP is 0 for every class: the detector finds nothing; train longer or raise --lr"
    ]
    found = detection_metrics([(cell, 1), (platelet, 2)])
    assert found["bbox_AP_per_class"] == {"cell": pytest.approx(1.0), "platelet": pytest.approx(1.0)}
    assert task.collapse_warnings(found, ["cell", "platelet"]) == []
