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

# Names load on first use (PEP 562), so that `import sidetune` (and `sidetune --version`) does not import torch.
_EXPORTS = {
    "FrozenBackbone": "backbones",
    "TapRequest": "backbones",
    "Taps": "backbones",
    "list_backbones": "backbones",
    "ConfigError": "errors",
    "FingerprintMismatchError": "errors",
    "SidetuneError": "errors",
    "WeightsError": "errors",
    "create": "factory",
    "load": "factory",
    "Features": "features",
    "get_method": "methods",
    "list_methods": "methods",
    "register_method": "methods",
    "SidetuneModel": "model",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "ConfigError",
    "Features",
    "FingerprintMismatchError",
    "FrozenBackbone",
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
