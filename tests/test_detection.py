"""torchvision RetinaNet on a bitfast backbone: trains on synthetic coloured rectangles (loss falls), inference
returns torchvision's box format, GroupNorm option, bf16 autocast, bad arguments, and the README example."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytest.importorskip("torchvision")
from torchvision.models.detection import RetinaNet  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from bitfast import models  # noqa: E402
from bitfast import nn as bnn  # noqa: E402
from bitfast.detection import retinanet  # noqa: E402

SIZE, CLASSES = 64, 3  # classes: red, green, blue rectangles; label 0 is left unused, as in torchvision's COCO
COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])


def rectangles(n, g, size=SIZE):
    """n noise images (3, size, size) in [0, 1] with 1-2 solid rectangles each, and torchvision targets."""
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g) * 0.4
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            w, h = torch.randint(14, 30, (2,), generator=g).tolist()
            x0, y0 = int(torch.randint(0, size - w, (1,), generator=g)), int(torch.randint(0, size - h, (1,), generator=g))
            c = int(torch.randint(0, CLASSES, (1,), generator=g))
            img[:, y0:y0 + h, x0:x0 + w] = COLOURS[c, :, None, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(c + 1)
        images.append(img)
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels)))
    return images, targets


def small_anchors():
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    return AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)  # 64 px images


def tiny_retinanet(**kw):
    return retinanet("bit_tiny", num_classes=CLASSES + 1, fpn_channels=64, min_size=SIZE, max_size=SIZE,
                     anchor_generator=small_anchors(), **kw)


def mean_loss(model, batches):
    with torch.no_grad():  # train mode returns the losses; GN has no running stats, so this changes nothing
        return sum(sum(model(i, t).values()).item() for i, t in batches) / len(batches)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [rectangles(4, g) for _ in range(8)]
    model = tiny_retinanet(group_norm=True).train()
    body = model.backbone.body
    stem_before = body.stem.conv.weight.detach().clone()
    before = mean_loss(model, batches)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(60):
        images, targets = batches[step % len(batches)]
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    after = mean_loss(model, batches)
    return dict(model=model, batches=batches, before=before, after=after, stem_before=stem_before)


def test_retinanet_loss_falls_on_rectangles(trained):
    model = trained["model"]
    print(f"mean loss over the 32 training images: {trained['before']:.3f} -> {trained['after']:.3f}")
    assert trained["after"] < 0.6 * trained["before"]
    body = model.backbone.body
    assert body.fused_ws and body.head is None  # trained through the multi-tensor WS path, no classifier
    assert not torch.equal(body.stem.conv.weight, trained["stem_before"])  # the backbone learned too
    gn = [m for m in model.backbone.fpn.modules() if isinstance(m, nn.GroupNorm)]
    assert gn and all(isinstance(m, bnn.GroupNorm) for m in gn)
    assert any(isinstance(m, nn.GroupNorm) for m in model.head.modules())


def test_inference_returns_torchvision_boxes(trained):
    model = trained["model"].eval()
    images, targets = trained["batches"][0]
    odd = torch.rand(3, 50, 70)  # another size: boxes come back in this image's own pixels
    with torch.no_grad():
        out = model(images + [odd])
    assert isinstance(out, list) and len(out) == 5
    for det, img in zip(out, images + [odd]):
        assert set(det) == {"boxes", "scores", "labels"}
        boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        k = boxes.shape[0]
        assert boxes.shape == (k, 4) and boxes.dtype == torch.float32 and scores.shape == (k,)
        assert labels.shape == (k,) and labels.dtype == torch.int64 and ((labels >= 0) & (labels <= CLASSES)).all()
        h, w = img.shape[1:]
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()  # x1, y1, x2, y2
        eps = 1e-3  # torchvision clips in the resized image, then scales back by a rounded size ratio
        assert (boxes >= 0).all() and (boxes[:, 2] <= w + eps).all() and (boxes[:, 3] <= h + eps).all()
        assert ((scores >= model.score_thresh) & (scores <= 1)).all() and (scores[:-1] >= scores[1:]).all()
    hits = 0
    with torch.no_grad():  # the top detection of most training images is a rectangle of the right colour
        for images, targets in trained["batches"]:
            for det, tgt in zip(model(images), targets):
                iou = box_iou(det["boxes"][:1], tgt["boxes"])  # (1 or 0, boxes)
                hits += int(((iou > 0.5) & (tgt["labels"] == det["labels"][:1, None])).any())
    model.train()
    assert hits >= 16, f"top detection matched a rectangle in {hits} of 32 training images"


def test_options_bf16_channels_last_and_errors():
    torch.manual_seed(0)
    plain = tiny_retinanet()
    assert isinstance(plain, RetinaNet) and plain.backbone.out_channels == 64
    assert not any(isinstance(m, nn.GroupNorm) for part in (plain.backbone.fpn, plain.head) for m in part.modules())
    images, targets = rectangles(2, torch.Generator().manual_seed(2))
    torch.testing.assert_close(plain.transform.normalize(images[0]), images[0] * 2 - 1)  # BiT's [-1, 1]
    fp32 = plain(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = plain(images, targets)
    for k in fp32:
        assert bf16[k].dtype == torch.float32 and torch.isfinite(bf16[k])
        assert abs(bf16[k].item() - fp32[k].item()) < 0.1 * fp32[k].item(), k
    cl = tiny_retinanet(group_norm=True).to(memory_format=torch.channels_last)
    not_cl = []  # torchvision batches NCHW; channels_last weights must carry the format through every layer
    for name, mod in cl.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.GroupNorm)):
            mod.register_forward_hook(lambda m, i, out, name=name: None if out.is_contiguous(
                memory_format=torch.channels_last) else not_cl.append(name))
    cl(images, targets)
    assert not not_cl, not_cl
    with pytest.raises(ValueError, match="backbone"):
        retinanet(models.create("bit_tiny"), num_classes=2)  # a classifier, not features_only
    with pytest.raises(ValueError, match="weights"):
        retinanet(models.create("bit_tiny", features_only=True), num_classes=2, weights="x.npz")
    with pytest.raises(ValueError, match="gn_groups"):
        retinanet("bit_tiny", num_classes=2, fpn_channels=48, group_norm=True, gn_groups=32)
    with pytest.raises(ValueError, match="out_indices"):
        retinanet("bit_tiny", num_classes=2, out_indices=(2, 3, 7))


def test_readme_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    m = re.search(r"<!-- detection-example -->\s*```python\n(.*?)```\s*<!-- /detection-example -->", readme, re.S)
    assert m, "README.md lost its <!-- detection-example --> block"
    scope = {}
    exec(compile(m[1], "README.md[detection-example]", "exec"), scope)
    assert [tuple(f.shape) for f in scope["feats"]] == [(1, 256, 32, 32), (1, 512, 16, 16), (1, 1024, 8, 8),
                                                        (1, 2048, 4, 4)]
    assert set(scope["losses"]) == {"classification", "bbox_regression"}
    assert set(scope["detections"][0]) == {"boxes", "scores", "labels"}
