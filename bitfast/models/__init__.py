"""BiT ResNet-v2 models (GN+WS and the BN / plain-conv ablation variants) and checkpoint IO.

    model = bitfast.models.create("BiT-M-R50x1", num_classes=10, weights="BiT-M-R50x1.npz")
    logits = model(x)             # (N, 10), x in [-1, 1]
    feats = model.features(x)     # (N, 2048) pre-logits
    backbone = bitfast.models.create("BiT-M-R50x1", features_only=True, weights="BiT-M-R50x1.npz")
    maps = backbone(x)            # [(N, 256, H/4, W/4), ..., (N, 2048, H/32, W/32)]; backbone.feature_info
"""
from bitfast.models.checkpoint import (LoadReport, adapt_stem, from_timm_state_dict, load, load_npz, load_weights,
                                       npz_names, save, save_npz, to_timm_state_dict)
from bitfast.models.resnetv2 import (CONVS, FEATURE_STRIDES, NORMS, ZOO, Arch, FeatureInfo, ResNetV2, create,
                                     list_models)

__all__ = ["create", "list_models", "load_npz", "save_npz", "from_timm_state_dict", "to_timm_state_dict", "save",
           "load", "load_weights", "npz_names", "LoadReport", "adapt_stem", "ResNetV2", "Arch", "ZOO", "NORMS", "CONVS",
           "FeatureInfo", "FEATURE_STRIDES"]
