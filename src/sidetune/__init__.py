"""sidetune: adapt frozen vision backbones with side networks (E3VA, LoSA) and the baselines they beat.

The public API::

    import sidetune
    model = sidetune.create(backbone="vit_small_patch14_dinov2", method="losa", num_classes=10,
                            weights="path/to/weights.safetensors", img_size=224)
    logits = model(images)
    model.save_adapter("runs/losa")
    model = sidetune.load("runs/losa")
"""

__version__ = "0.1.0"

from .backbones import FrozenBackbone, TapRequest, Taps, list_backbones
from .errors import ConfigError, FingerprintMismatchError, SidetuneError, WeightsError
from .factory import create, load
from .features import Features
from .methods import get_method, list_methods, register_method
from .model import SidetuneModel
from .serve import MultiTask

__all__ = [
    "ConfigError",
    "Features",
    "FingerprintMismatchError",
    "FrozenBackbone",
    "MultiTask",
    "SidetuneError",
    "SidetuneModel",
    "TapRequest",
    "Taps",
    "WeightsError",
    "__version__",
    "create",
    "get_method",
    "list_backbones",
    "list_methods",
    "load",
    "register_method",
]
