"""BiT as a detection backbone: torchvision's RetinaNet and FPN on a features-only bitfast ResNet-v2.

    from bitfast.detection import retinanet
    model = retinanet("BiT-M-R50x1", num_classes=91, weights="BiT-M-R50x1.npz", group_norm=True)
    losses = model(images, targets)        # train: images list of (3, H, W) in [0, 1]; targets as torchvision's
    detections = model.eval()(images)      # [{"boxes": (K, 4) x1y1x2y2, "scores": (K,), "labels": (K,)}]

Everything detection-specific (anchors, matching, focal loss, box coding, NMS, resizing and batching) is
torchvision's; this file only wires a bitfast backbone into it. Needs torchvision (`pip install bitfast[vision]`).
"""
from collections import OrderedDict
from functools import partial

import torch.nn as nn

try:
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7
except ImportError as e:  # torchvision is an optional dependency of bitfast
    raise ImportError(f"bitfast.detection needs torchvision (pip install torchvision): {e}") from None

from bitfast import models
from bitfast import nn as bnn

# BiT sees pixels in [-1, 1]; torchvision detectors take images in [0, 1] and normalize with these.
BIT_MEAN, BIT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class BackboneWithFPN(nn.Module):
    """A features-only ResNetV2 followed by torchvision's FPN with P6/P7 from C5 (RetinaNet paper, torchvision's
    retinanet v2). torchvision's own BackboneWithFPN cannot take the body: its IntermediateLayerGetter calls
    top-level children in turn, which would skip per-stage outputs and the fused WS pass."""

    def __init__(self, body, out_channels=256, norm_layer=None):
        super().__init__()
        chans = body.feature_info.channels()
        self.body = body
        self.fpn = FeaturePyramidNetwork(chans, out_channels, extra_blocks=LastLevelP6P7(chans[-1], out_channels),
                                         norm_layer=norm_layer)
        self.out_channels = out_channels  # what torchvision's detectors read

    def forward(self, x):  # (N, 3, H, W) -> {"<index>": (N, out_channels, H/s, W/s), ..., "p6", "p7"}
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in zip(self.body.out_indices, feats)))


def retinanet(backbone, num_classes, weights=None, out_indices=(2, 3, 4), fpn_channels=256, group_norm=False,
              gn_groups=32, **kw):
    """torchvision RetinaNet on a BiT backbone: a zoo name (built with `features_only=True`, `out_indices` and
    `weights`, an official .npz / timm / native file) or a ready features-only `ResNetV2`.

    out_indices (2, 3, 4) = C3..C5 (strides 8, 16, 32); with P6/P7 these are the five levels torchvision's default
    anchors expect (other indices need a matching `anchor_generator`). group_norm=True puts GroupNorm (`gn_groups`
    groups, bitfast's kernel) in the FPN and in the head's conv towers, as the GN detection literature does. Other
    keyword arguments go to RetinaNet (min_size, max_size, anchor_generator, score_thresh, ...); image_mean/std
    default to BiT's [-1, 1] input scaling.
    """
    if isinstance(backbone, str):
        backbone = models.create(backbone, features_only=True, out_indices=out_indices, weights=weights)
    elif not (isinstance(backbone, models.ResNetV2) and backbone.out_indices is not None):
        what = "a classification ResNetV2" if isinstance(backbone, models.ResNetV2) else type(backbone).__name__
        raise ValueError(f"backbone must be a zoo name or a ResNetV2 made with features_only=True, got {what}")
    elif weights is not None:
        raise ValueError("weights: pass a zoo name as backbone, or load the weights into the ResNetV2 first")
    if group_norm and fpn_channels % gn_groups:
        raise ValueError(f"gn_groups={gn_groups} must divide fpn_channels={fpn_channels}")
    norm = partial(bnn.GroupNorm, gn_groups) if group_norm else None
    kw.setdefault("image_mean", list(BIT_MEAN))
    kw.setdefault("image_std", list(BIT_STD))
    model = RetinaNet(BackboneWithFPN(backbone, fpn_channels, norm), num_classes, **kw)
    if group_norm and "head" not in kw:  # torchvision's head has no norm unless given one (retinanet v2 style)
        model.head = RetinaNetHead(fpn_channels, model.anchor_generator.num_anchors_per_location()[0], num_classes,
                                   norm_layer=norm)
    return model
