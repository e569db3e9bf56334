"""Pre-activation ResNet-v2 (BiT) with GroupNorm + Weight Standardization, and its ablation variants.

The architecture follows the official BiT code (google-research/big_transfer), see GUIDE §4:

    stem   : StdConv 7x7/2 pad 3 -> ConstantPad2d(1, 0) -> MaxPool(3, 2)     (zero pad, not -inf)
    stage i: blocks of PreActBottleneck, cmid = 64w*2^i, cout = 256w*2^i; the first block of stages 1..3 has
             stride 2 (on the 3x3 conv) and every first block has a 1x1 projection of the *pre-activated* input
    final  : GN -> ReLU -> global avg pool -> 1x1 conv with bias (zero-initialized for transfer)

Module names equal timm's `resnetv2_*_bit` (stem.conv, stages.I.blocks.J.{norm1,conv1,...,downsample.conv},
norm, head.fc), so timm state_dicts load without renaming.

`norm` in {"gn", "bn"} and `conv` in {"ws", "plain"} give the four models of the paper's ablation
(Tables 4/5) with identical topology and parameter count.

`out_indices` (`create(name, features_only=True)`) makes a detection backbone; see `ResNetV2.forward_intermediates`.
"""
import fnmatch
import numbers
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitfast import nn as bnn
from bitfast.ops import std_conv2d_autocast_dtype
from bitfast.ops.weight_standardize_many import standardize_conv_weights


class Arch(NamedTuple):
    depths: tuple  # blocks per stage
    width: float  # width factor w: stage i has cmid = 64w*2^i, cout = 256w*2^i
    groups: int = 32  # GroupNorm groups (BiT: 32)


# Parameter counts are for a 1000-class head (any norm/conv variant: BN and GN both have weight+bias);
# tests/test_models.py checks every one on the meta device.
#   name                           depths          w      groups  params
#   R50x1   (BiT-{S,M}-R50x1)      (3, 4, 6, 3)    1      32       25,549,352  (25.55M)
#   R50x3                          (3, 4, 6, 3)    3      32      217,319,080  (217.32M)
#   R101x1                         (3, 4, 23, 3)   1      32       44,541,480  (44.54M)
#   R101x3                         (3, 4, 23, 3)   3      32      387,934,888  (387.93M)
#   R152x2                         (3, 8, 36, 3)   2      32      236,335,208  (236.34M)
#   R152x4                         (3, 8, 36, 3)   4      32      936,533,224  (936.53M)
#   bit_tiny  (R14 x 1/4)          (1, 1, 1, 1)    0.25   8         1,017,464  (1.02M; 509,594 with 10 classes)
#   bit_small (R26 x 1/2)          (2, 2, 2, 2)    0.5    32        4,517,768  (4.52M)
#   bit_r26x1 (R26 x 1)            (2, 2, 2, 2)    1      32       15,987,496  (15.99M)
_BIT = {
    "50x1": Arch((3, 4, 6, 3), 1),
    "50x3": Arch((3, 4, 6, 3), 3),
    "101x1": Arch((3, 4, 23, 3), 1),
    "101x3": Arch((3, 4, 23, 3), 3),
    "152x2": Arch((3, 8, 36, 3), 2),
    "152x4": Arch((3, 8, 36, 3), 4),
}
ZOO = {
    **{f"BiT-{s}-R{k}": a for s in "SM" for k, a in _BIT.items()},  # official checkpoint names
    **{f"resnetv2_{k}_bit": a for k, a in _BIT.items()},  # timm names
    **{f"resnetv2_{k}": a for k, a in _BIT.items()},
    "bit_tiny": Arch((1, 1, 1, 1), 0.25, groups=8),  # CPU tests/demos: 16..512 channels
    "bit_small": Arch((2, 2, 2, 2), 0.5),
    "bit_r26x1": Arch((2, 2, 2, 2), 1),
}

NORMS = ("gn", "bn")
CONVS = ("ws", "plain")
# Feature indices follow timm: 0 = stem conv (stride 2), 1..4 = stages (strides 4, 8, 16, 32).
FEATURE_STRIDES = (2, 4, 8, 16, 32)


class FeatureInfo(list):
    """One dict(num_chs, reduction, module) per returned feature map, as timm's `feature_info`."""

    def channels(self):
        return [f["num_chs"] for f in self]

    def reduction(self):
        return [f["reduction"] for f in self]


def _check_out_indices(out_indices):
    idx = tuple(out_indices) if isinstance(out_indices, (tuple, list)) else (out_indices,)
    ok = len(idx) > 0 and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in idx) \
        and all(0 <= i < len(FEATURE_STRIDES) for i in idx) and list(idx) == sorted(set(idx))
    if not ok:
        raise ValueError(f"out_indices must be increasing ints in 0..{len(FEATURE_STRIDES) - 1} "
                         f"(0 = stem, 1..4 = stages), got {out_indices!r}")
    return tuple(int(i) for i in idx)


def list_models(pattern="*"):
    """Names accepted by `create`, in table order; `pattern` is a shell-style filter (e.g. "BiT-M-*")."""
    return [n for n in ZOO if fnmatch.fnmatchcase(n, pattern)]


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d then ReLU: the "bn" ablation, same keys and position as GroupNormAct."""

    def __init__(self, num_channels, act="relu"):
        super().__init__(num_channels)
        self.act = act

    def forward(self, x):
        x = super().forward(x)
        return F.relu(x, inplace=True) if self.act == "relu" else x


class DownsampleConv(nn.Module):
    """1x1 projection on the pre-activated input (a module so the key is `downsample.conv.weight`, as timm)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def _conv(conv, x, std_weight):
    return conv(x) if std_weight is None else conv(x, std_weight)


class PreActBottleneck(nn.Module):
    """x -> [norm1+relu] -> conv1 1x1 -> [norm2+relu] -> conv2 3x3/s -> [norm3+relu] -> conv3 1x1, + shortcut."""

    def __init__(self, cin, cout, cmid, stride, make_conv, make_norm):
        super().__init__()
        # BiT projects whenever the shape changes; in the zoo that is exactly the first block of each stage.
        self.downsample = DownsampleConv(make_conv(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        self.norm1 = make_norm(cin)
        self.conv1 = make_conv(cin, cmid, 1, 1)
        self.norm2 = make_norm(cmid)
        self.conv2 = make_conv(cmid, cmid, 3, stride)  # stride on the 3x3 (BiT), not on conv1
        self.norm3 = make_norm(cmid)
        self.conv3 = make_conv(cmid, cout, 1, 1)

    def convs(self):
        """The block's convs in std_convs() order (downsample first, when there is one)."""
        return ([self.downsample.conv] if self.downsample is not None else []) + [self.conv1, self.conv2, self.conv3]

    def forward(self, x, std_weights=None):  # (N, cin, H, W) -> (N, cout, H/s, W/s)
        # std_weights: standardized weights of convs(), precomputed by the model in one batched WS call.
        wd, w1, w2, w3 = [None] * 4 if std_weights is None else (
            std_weights if self.downsample is not None else [None, *std_weights])
        xp = self.norm1(x)
        shortcut = x if self.downsample is None else _conv(self.downsample.conv, xp, wd)
        y = _conv(self.conv1, xp, w1)
        y = _conv(self.conv2, self.norm2(y), w2)
        y = _conv(self.conv3, self.norm3(y), w3)
        return y + shortcut


class Stage(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class Head(nn.Module):
    """1x1 conv on the pooled features (the official head); key `head.fc.{weight,bias}` as timm."""

    def __init__(self, cin, num_classes):
        super().__init__()
        self.fc = nn.Conv2d(cin, num_classes, 1, bias=True)

    def forward(self, f):  # (N, C) -> (N, num_classes)
        return self.fc(f[:, :, None, None]).flatten(1)


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class ResNetV2(nn.Module):
    """BiT ResNet-v2. `config` holds the constructor arguments (plain Python values) for native checkpoints.

    `out_indices` (timm's numbering: 0 = stem conv, 1..4 = stages) makes a features-only backbone: no head, no
    stages after the last index, and `forward` returns the feature maps (see `forward_intermediates`).
    """

    def __init__(self, depths, width, num_classes=1000, in_chans=3, norm="gn", conv="ws", groups=32,
                 ws_eps=1e-10, zero_head=True, out_indices=None):
        super().__init__()
        _check("norm", norm, NORMS)
        _check("conv", conv, CONVS)
        depths = tuple(int(d) for d in depths)
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"depths must be 4 positive ints, got {depths}")
        if width <= 0 or (64 * width) != int(64 * width):
            raise ValueError(f"width must make 64*width a positive integer, got {width}")
        for arg, v in (("num_classes", num_classes), ("in_chans", in_chans), ("groups", groups)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        c0 = int(64 * width)
        if norm == "gn" and c0 % groups:
            raise ValueError(f"groups={groups} must divide every channel count; width={width} gives {c0} channels")
        self.out_indices = None if out_indices is None else _check_out_indices(out_indices)
        self.config = dict(depths=depths, width=width, num_classes=int(num_classes), in_chans=int(in_chans),
                           norm=norm, conv=conv, groups=int(groups), ws_eps=float(ws_eps), zero_head=bool(zero_head))
        if self.out_indices is not None:
            self.config["out_indices"] = self.out_indices

        def make_conv(cin, cout, k, stride):
            if conv == "ws":
                return bnn.StdConv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False, eps=ws_eps)
            return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)

        def make_norm(c):
            return bnn.GroupNormAct(groups, c, eps=1e-5, act="relu") if norm == "gn" else BatchNormAct2d(c)

        self.stem = nn.Sequential(OrderedDict(
            conv=make_conv(in_chans, c0, 7, 2),  # 7x7/2, pad 3
            pad=nn.ConstantPad2d(1, 0.0),
            pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=0),
        ))
        # A backbone builds only the stages it returns: unused ones would get no gradient (DDP rejects that).
        n_stages = 4 if self.out_indices is None else self.out_indices[-1]
        cin, stages, info = c0, [], [dict(num_chs=c0, reduction=2, module="stem.conv")]
        for i, d in enumerate(depths[:n_stages]):
            cmid, cout = c0 * 2**i, 4 * c0 * 2**i
            blocks = [PreActBottleneck(cin if j == 0 else cout, cout, cmid, 2 if (i > 0 and j == 0) else 1,
                                       make_conv, make_norm) for j in range(d)]
            stages.append(Stage(blocks))
            info.append(dict(num_chs=cout, reduction=FEATURE_STRIDES[i + 1], module=f"stages.{i}"))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.norm = make_norm(cin) if n_stages == 4 else None
        self.head = Head(cin, num_classes) if self.out_indices is None else None
        if n_stages == 4:
            info[4]["module"] = "norm"  # the last feature map is taken after the final GN+ReLU
        self.feature_info = FeatureInfo(info if self.out_indices is None else [info[i] for i in self.out_indices])
        # State-dict key prefixes -> npz scopes this model lacks on purpose; checkpoint loaders skip them in a file.
        self.ignored_checkpoint_keys = {} if self.out_indices is None else {"head.fc.": "head/"}
        if n_stages < 4:
            self.ignored_checkpoint_keys.update({f"stages.{i}.": f"block{i + 1}/" for i in range(n_stages, 4)})
            self.ignored_checkpoint_keys["norm."] = "group_norm/" if norm == "gn" else "batch_norm/"
        # Standardize all conv weights in one weight_standardize_many launch per step (training / with grad);
        # without grad in eval mode each StdConv2d's cached weight is cheaper still.
        self.fused_ws = conv == "ws"
        self._num_std_convs = len(self.std_convs())
        self._init_weights(zero_head)

    @torch.no_grad()
    def _init_weights(self, zero_head):
        head = None if self.head is None else self.head.fc
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not head:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if head is not None:
            self._init_head(zero_head)

    @torch.no_grad()
    def _init_head(self, zero):
        if zero:
            nn.init.zeros_(self.head.fc.weight)
        else:
            nn.init.normal_(self.head.fc.weight, std=0.01)
        nn.init.zeros_(self.head.fc.bias)

    def reset_head(self, num_classes, zero=True):
        """New head for `num_classes` (zero-initialized by default, as BiT transfer does)."""
        if self.out_indices is not None:
            raise ValueError("reset_head: a features-only model (out_indices set) has no head")
        w = self.head.fc.weight
        self.head = Head(self.num_features, num_classes).to(device=w.device, dtype=w.dtype)
        self._init_head(zero)
        self.config["num_classes"] = int(num_classes)

    def std_convs(self):
        """All weight-standardized convs, in module order (for a batched WS pass, e.g. weight_standardize_many)."""
        return [m for m in self.modules() if isinstance(m, bnn.StdConv2d)]

    def _fused_weights(self, x):
        """Standardized weights of std_convs() from one batched WS call, as an iterator; None for per-conv WS."""
        convs = self.std_convs()
        # Fused path only while every conv is still a StdConv2d (callers may swap modules, e.g. benchmarks).
        if self.fused_ws and len(convs) == self._num_std_convs and (self.training or torch.is_grad_enabled()):
            return iter(standardize_conv_weights(convs, out_dtype=std_conv2d_autocast_dtype(x.device.type)))
        return None

    def forward_intermediates(self, x, out_indices=None):
        """Feature maps for `out_indices` (default: the model's, else all it has), as a list in index order.

        (N, in_chans, H, W) -> [(N, C_i, ~H/s_i, ~W/s_i)], s = 2 (stem conv), 4, 8, 16, 32 (stages 1..4); channels
        and strides are in `feature_info`. Normalization: BiT is pre-activation, so a stage's output is a raw
        residual sum that only the next block's GN+ReLU normalizes. We follow timm's ResNet-v2
        (`forward_intermediates(norm=True)`): the stem and stages 1..3 are returned un-normalized, stage 4 after the
        final GN+ReLU (what the classifier pools). timm's `features_only` wrapper (FeatureListNet at `stages.3`)
        leaves even the last map raw; older timm versions took every map after the next block's GN+ReLU.
        """
        if x.dim() != 4 or x.shape[1] != self.config["in_chans"]:
            raise ValueError(f"x must be (N, {self.config['in_chans']}, H, W), got {tuple(x.shape)}")
        if out_indices is None:
            out_indices = self.out_indices or tuple(range(len(self.stages) + 1))
        want = _check_out_indices(out_indices)
        if want[-1] > len(self.stages):
            raise ValueError(f"out_indices {want} reach past the {len(self.stages)} stages this model has")
        ws = self._fused_weights(x)

        def nxt(n):  # the next n standardized weights, or None (each conv standardizes its own)
            return None if ws is None else [next(ws) for _ in range(n)]

        x = _conv(self.stem.conv, x, None if ws is None else next(ws))  # (N, c0, H/2, W/2)
        feats = [x] if 0 in want else []
        x = self.stem.pool(self.stem.pad(x))  # (N, c0, H/4, W/4)
        for i, stage in enumerate(self.stages, 1):
            if i > want[-1]:
                break
            for block in stage.blocks:
                x = block(x, nxt(4 if block.downsample is not None else 3))
            if i in want:
                feats.append(self.norm(x) if i == 4 else x)
        return feats

    def forward_features(self, x):  # (N, in_chans, H, W) -> (N, C, H/32, W/32), after the final GN+ReLU
        return self.forward_intermediates(x, (4,))[0]

    def features(self, x):  # (N, in_chans, H, W) -> (N, C) pre-logits
        return self.forward_features(x).mean((2, 3))

    def forward(self, x):  # -> (N, num_classes) logits; a features-only model: the list of forward_intermediates
        if self.out_indices is not None:
            return self.forward_intermediates(x)
        return self.head(self.features(x))


def create(name, num_classes=1000, weights=None, norm="gn", conv="ws", zero_head=True, features_only=False,
           out_indices=(1, 2, 3, 4), **kw):
    """Build a zoo model by name (see `list_models()`); extra keyword arguments go to `ResNetV2`
    (in_chans, groups, ws_eps). `weights` is an optional path: an official BiT `.npz`, a native
    `bitfast.models.save` file, or a timm state_dict saved with torch.save. A head whose class count
    differs from the file is replaced by a zero-initialized one (with a logged message).

    features_only=True builds a backbone without head whose forward returns the feature maps of `out_indices`
    (0 = stem conv at stride 2, 1..4 = stages at strides 4, 8, 16, 32; see `ResNetV2.forward_intermediates`);
    `model.feature_info.channels()` gives their channel counts. A file's head (and any stage after the last
    index) is ignored when loading.
    """
    if name not in ZOO:
        raise ValueError(f"name must be one of list_models(), got {name!r}")
    arch = ZOO[name]
    kw.setdefault("groups", arch.groups)
    model = ResNetV2(arch.depths, arch.width, num_classes=num_classes, norm=norm, conv=conv,
                     zero_head=zero_head, out_indices=out_indices if features_only else None, **kw)
    if weights is not None:
        from bitfast.models.checkpoint import load_weights
        load_weights(model, weights)
    return model
