"""bitfast-train: BiT-HyperRule transfer and upstream pre-training on torch.distributed.

    from bitfast.train import make_config, train
    summary = train(make_config("transfer", model="BiT-M-R50x1", weights="BiT-M-R50x1.npz",
                                data="~/flowers", out="runs/flowers"))
"""
from bitfast.train.config import PRESETS, Recipe, TrainConfig, apply_overrides, describe, make_config, resolve
from bitfast.train.loop import NonFiniteLoss, train

__all__ = ["TrainConfig", "Recipe", "PRESETS", "make_config", "apply_overrides", "resolve", "describe", "train",
           "NonFiniteLoss"]
