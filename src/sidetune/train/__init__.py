"""Training and evaluation of classifiers: ``fit`` (Accelerate loop), resumable checkpoints, metrics, CLI commands.

from sidetune.train import TrainConfig, fit
result = fit(TrainConfig(backbone="vit_small_patch14_dinov2", method="losa", data="data/cifar10-1k",
                         weights="vit_s.safetensors", img_size=224, epochs=10, output="runs/losa"))
print(result.summary["metrics"]["test"]["top1"])
"""

from .checkpoint import CheckpointError, TrainerState, find_checkpoint
from .config import TrainConfig, parse_options, parse_value
from .inference import evaluate_adapter, predict_images
from .loop import TrainResult, WarmupCosine, evaluate, fit
from .metrics import ClassificationMeter, read_log
from .plots import plot_curves

__all__ = [
    "CheckpointError",
    "ClassificationMeter",
    "TrainConfig",
    "TrainResult",
    "TrainerState",
    "WarmupCosine",
    "evaluate",
    "evaluate_adapter",
    "find_checkpoint",
    "fit",
    "parse_options",
    "parse_value",
    "plot_curves",
    "predict_images",
    "read_log",
]
