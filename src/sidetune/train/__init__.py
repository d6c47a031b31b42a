"""Training, evaluation and prediction for every task: one loop (``fit``), resumable checkpoints, the CLI commands.

from sidetune.train import TrainConfig, fit
result = fit(TrainConfig(backbone="vit_small_patch14_dinov2", method="losa", data="data/cifar10-1k",
                         weights="vit_s.safetensors", img_size=224, epochs=10, output="runs/losa"))
print(result.summary["metrics"]["test"]["top1"])

The same ``fit`` trains segmentation and detection (``task="segmentation"``...); what differs between tasks lives
in :mod:`sidetune.tasks`.
"""

from .checkpoint import CheckpointError, TrainerState, find_checkpoint
from .config import TrainConfig, parse_options, parse_value
from .inference import evaluate_adapter, load_for_inference, predict, predict_images
from .loop import TrainResult, evaluate_split, fit
from .metrics import ClassificationMeter, read_log
from .plots import plot_curves
from .rundir import TrainingError
from .setup import WarmupCosine

__all__ = [
    "CheckpointError",
    "ClassificationMeter",
    "TrainConfig",
    "TrainResult",
    "TrainerState",
    "TrainingError",
    "WarmupCosine",
    "evaluate_adapter",
    "evaluate_split",
    "find_checkpoint",
    "fit",
    "load_for_inference",
    "parse_options",
    "parse_value",
    "plot_curves",
    "predict",
    "predict_images",
    "read_log",
]
