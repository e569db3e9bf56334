"""Checkpoint IO for bitfast ResNet-v2: official BiT `.npz`, timm / big_transfer state_dicts, native files.

Official npz layout (GUIDE §4), all float32, conv kernels HWIO:
    resnet/root_block/standardized_conv2d/kernel                  <-> stem.conv.weight (OIHW)
    resnet/block{i+1}/unit{j+1:02d}/{a,b,c}/group_norm/{gamma,beta} <-> stages.i.blocks.j.norm{1,2,3}.{weight,bias}
    resnet/block{i+1}/unit{j+1:02d}/{a,b,c}/standardized_conv2d/kernel <-> stages.i.blocks.j.conv{1,2,3}.weight
    resnet/block{i+1}/unit01/a/proj/standardized_conv2d/kernel     <-> stages.i.blocks.0.downsample.conv.weight
    resnet/group_norm/{gamma,beta}                                 <-> norm.{weight,bias}
    resnet/head/conv2d/{kernel,bias}                               <-> head.fc.{weight,bias}
The ablation variants use `conv2d` for plain convs and `batch_norm/{gamma,beta,moving_mean,moving_variance}`
for BN, so every variant round-trips through save_npz/load_npz.
"""
import logging
import re
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from bitfast import nn as bnn

log = logging.getLogger("bitfast.models")

_PARAM = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


class LoadReport(NamedTuple):
    missing: list  # keys the model needs that the file lacks
    unexpected: list  # keys in the file that the model does not use
    mismatched: list  # "key: file shape vs model shape"
    head_reset: bool  # True when the head class count differed and the head was zero-initialized
    stem_adapted: bool = False  # True when a 3-channel stem was adapted to the model's in_chans


def adapt_stem(w, in_chans):
    """A (O, 3, kh, kw) RGB stem kernel -> (O, in_chans, kh, kw). One channel: the sum over RGB, so a gray image
    sees what the RGB filter saw of (g, g, g). More channels: RGB repeated, scaled by 3 / in_chans. Exact for a
    plain conv; with a weight-standardized stem the result matches only up to a scale per filter (WS removes
    each filter's scale), so fine-tune after loading."""
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"adapt_stem needs a (O, 3, kh, kw) kernel, got {tuple(w.shape)}")
    if in_chans == 1:
        return w.sum(1, keepdim=True)
    return w.repeat(1, (in_chans + 2) // 3, 1, 1)[:, :in_chans] * (3.0 / in_chans)


def _scope(module_name):
    """Module name -> npz scope, e.g. stages.1.blocks.0.downsample.conv -> block2/unit01/a/proj."""
    if module_name == "stem.conv":
        return "root_block"
    if module_name in ("norm", "head.fc"):
        return "head" if module_name == "head.fc" else ""
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(norm|conv)(\d)", module_name)
    if m:
        return f"block{int(m[1]) + 1}/unit{int(m[2]) + 1:02d}/{'abc'[int(m[4]) - 1]}"
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.downsample\.conv", module_name)
    if m:
        return f"block{int(m[1]) + 1}/unit{int(m[2]) + 1:02d}/a/proj"
    raise ValueError(f"module {module_name!r} has no place in the BiT npz layout")


def npz_names(model):
    """{state_dict key: npz key (without the 'resnet/' prefix)} for every tensor the npz stores."""
    names = {}
    for mname, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            kind = "conv2d" if mname == "head.fc" or not isinstance(m, bnn.StdConv2d) else "standardized_conv2d"
            params = {"weight": "kernel", "bias": "bias"} if m.bias is not None else {"weight": "kernel"}
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
            kind = "group_norm" if isinstance(m, nn.GroupNorm) else "batch_norm"
            params = {k: _PARAM[k] for k, _ in m.state_dict().items() if k in _PARAM}
        else:
            continue
        scope = _scope(mname)
        for p, leaf in params.items():
            names[f"{mname}.{p}"] = "/".join(s for s in (scope, kind, leaf) if s)
    return names


def _hwio_to_oihw(a):
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a


def read_npz(path):
    """All arrays of an .npz, with allow_pickle=False; anything unreadable is a ValueError naming `path`."""
    try:
        f = np.load(path, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:  # BadZipFile, pickled data, text, ... come from numpy/zipfile internals
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if not hasattr(f, "files"):
        raise ValueError(f"{path}: holds a single .npy array, not an .npz archive of BiT weights")
    try:
        with f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"{path}: truncated, corrupt or pickled .npz member ({type(e).__name__}: {e})") from None


def _fmt(keys, limit=12):
    keys = list(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_state(model, sd, source, strict, show=None):
    """Copy `sd` (bitfast keys, torch layout) into `model`; handles a head with another class count.
    `show` maps bitfast keys to the names the user's file uses, for messages."""
    show = show or {}
    own = model.state_dict()
    skip = tuple(getattr(model, "ignored_checkpoint_keys", {}))  # e.g. the head of a features-only model
    sd = {k: v for k, v in sd.items() if not k.startswith(skip)}
    head_reset = False
    hw, hb = sd.get("head.fc.weight"), sd.get("head.fc.bias")
    if hw is not None and hw.ndim == 4 and hw.shape[1:] == own["head.fc.weight"].shape[1:] \
            and hw.shape[0] != own["head.fc.weight"].shape[0] and (hb is None or hb.shape == hw.shape[:1]):
        log.warning("%s: head has %d classes, model has %d: head.fc zero-initialized instead of loaded",
                    source, hw.shape[0], own["head.fc.weight"].shape[0])
        sd = {k: v for k, v in sd.items() if not k.startswith("head.fc.")}
        own = {k: v for k, v in own.items() if not k.startswith("head.fc.")}
        head_reset = True
    sw, own_sw = sd.get("stem.conv.weight"), own.get("stem.conv.weight")
    stem_adapted = (sw is not None and own_sw is not None and sw.ndim == 4 and sw.shape[1] == 3
                    and own_sw.shape[1] != 3 and sw.shape[:1] + sw.shape[2:] == own_sw.shape[:1] + own_sw.shape[2:])
    if stem_adapted:
        log.warning("%s: RGB stem adapted to in_chans=%d (see bitfast.models.adapt_stem)", source, own_sw.shape[1])
        sd = {**sd, "stem.conv.weight": adapt_stem(sw.float(), own_sw.shape[1]).to(sw.dtype)}
    missing = [show.get(k, k) for k in own if k not in sd and not k.endswith("num_batches_tracked")]  # npz lacks it
    unexpected = [show.get(k, k) for k in sd if k not in own]
    mismatched = [f"{show.get(k, k)}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and v.shape != own[k].shape]
    report = LoadReport(missing, unexpected, mismatched, head_reset, stem_adapted)
    problems = [f"{what} ({len(ks)}): {_fmt(ks)}" for what, ks in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)) if ks]
    if problems and strict:
        raise ValueError(f"{source}: does not fit this model; " + "; ".join(problems))
    if problems:
        log.warning("%s: loaded with problems; %s", source, "; ".join(problems))
    if head_reset:
        model._init_head(zero=True)
    with torch.no_grad():
        for k, t in own.items():
            if k in sd and sd[k].shape == t.shape:
                t.copy_(sd[k])
    return report


def load_npz(model, path, strict=True, prefix="resnet/"):
    """Load an official BiT .npz (HWIO kernels, `resnet/blockN/unitMM/...` names) into `model`.
    strict=True raises a ValueError naming every missing, unexpected or mis-shaped key (nothing is copied);
    strict=False loads what fits and returns the LoadReport. A head with another class count is zero-initialized."""
    arrays = read_npz(path)
    if not any(k.startswith(prefix) for k in arrays):
        raise ValueError(f"{path}: no '{prefix}' keys; not a BiT ResNet-v2 npz (keys: {_fmt(sorted(arrays), 5)})")
    skip = tuple(prefix + v for v in getattr(model, "ignored_checkpoint_keys", {}).values())
    arrays = {k: a for k, a in arrays.items() if not k.startswith(skip)}
    names = npz_names(model)
    to_state = {prefix + v: k for k, v in names.items()}
    sd, unexpected = {}, []
    for key, a in arrays.items():
        if key not in to_state:
            unexpected.append(key)
        elif a.dtype.kind != "f":
            raise ValueError(f"{path}: {key} has dtype {a.dtype}, expected floating point")
        else:
            sd[to_state[key]] = torch.from_numpy(np.ascontiguousarray(_hwio_to_oihw(a)))
    show = {k: prefix + v for k, v in names.items()}
    for key in unexpected:  # route through _load_state so the report/strict logic is shared
        sd[key] = torch.empty(0)
        show[key] = key
    return _load_state(model, sd, path, strict, show)


def save_npz(model, path, prefix="resnet/"):
    """Write `model` in the official BiT layout (float32, HWIO). Writes exactly `path` (no '.npz' appended)."""
    sd = model.state_dict()
    arrays = {}
    for k, name in npz_names(model).items():
        t = sd[k].detach().to("cpu", torch.float32).numpy()
        arrays[prefix + name] = t.transpose(2, 3, 1, 0) if t.ndim == 4 else t  # OIHW -> HWIO
    with open(path, "wb") as f:
        np.savez(f, **arrays)


# big_transfer's bit_pytorch names -> bitfast/timm names
_BIT_PYTORCH = [
    (r"root\.conv\.", "stem.conv."),
    (r"body\.block(\d+)\.unit(\d+)\.gn(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.norm{m[3]}."),
    (r"body\.block(\d+)\.unit(\d+)\.conv(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.conv{m[3]}."),
    (r"body\.block(\d+)\.unit(\d+)\.downsample\.",
     lambda m: f"stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.downsample.conv."),
    (r"head\.gn\.", "norm."),
    (r"head\.conv\.", "head.fc."),
]


def from_timm_state_dict(sd):
    """timm `resnetv2_*_bit` state_dict (or big_transfer bit_pytorch, or either wrapped in DDP's 'module.')
    -> bitfast state_dict. timm keys are bitfast keys; a Linear head (2-D weight) becomes the 1x1 conv."""
    if not isinstance(sd, dict):
        raise ValueError(f"sd must be a dict of tensors, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"sd[{k!r}] must be a tensor, got {type(v).__name__}")
        k = k[len("module."):] if k.startswith("module.") else k
        for pat, rep in _BIT_PYTORCH:
            k = re.sub("^" + pat, rep, k)
        if k == "head.fc.weight" and v.ndim == 2:
            v = v[:, :, None, None]
        out[k] = v
    if "stem.conv.weight" not in out:
        raise ValueError(f"sd does not look like a timm resnetv2 / BiT state_dict (no stem.conv.weight; "
                         f"keys: {_fmt(list(sd), 5)})")
    return out


def to_timm_state_dict(model):
    """bitfast model (or its state_dict) -> timm `resnetv2_*_bit` state_dict (same keys; tensors shared)."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v for k, v in sd.items()}


_FORMAT = "bitfast.resnetv2"


def save(model, path):
    """Native checkpoint: torch.save of {'format', 'config', 'state_dict'}; `load` rebuilds the model."""
    torch.save({"format": _FORMAT, "version": 1, "config": dict(model.config), "state_dict": model.state_dict()},
               path)


def _sniff(path):
    """Why `path` cannot be a torch.save file, from its first bytes (None if it may be one): torch.save writes
    a zip archive (or, before torch 1.6, a pickle, which starts with 0x80); anything else would otherwise be
    reported by torch.load as unsupported pickled data, which it is not."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        return f"not a weights file (it starts with bytes {head.hex()}, not a zip archive or a pickle)"
    return None


def _torch_load(path, map_location):
    why = _sniff(path)
    if why:
        raise ValueError(f"{path}: {why}; expected an official BiT .npz, a timm state_dict or a bitfast model.pt")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:300]})") from None


def load(path, map_location="cpu"):
    """Rebuild a model written by `save` (weights_only=True: no code runs from the file)."""
    from bitfast.models.resnetv2 import ResNetV2

    obj = _torch_load(path, map_location)
    if not (isinstance(obj, dict) and obj.get("format") == _FORMAT):
        raise ValueError(f"{path}: not a bitfast native checkpoint (use load_npz / from_timm_state_dict)")
    model = ResNetV2(**obj["config"])
    _load_state(model, obj["state_dict"], path, strict=True)
    return model


def load_weights(model, path, strict=True):
    """Load any supported file into an existing model: .npz (official), native, or a timm/bit_pytorch
    state_dict saved with torch.save (optionally under a 'state_dict' or 'model' key)."""
    if str(path).endswith(".npz"):
        return load_npz(model, path, strict=strict)
    obj = _torch_load(path, "cpu")
    if isinstance(obj, dict) and obj.get("format") == _FORMAT:
        arch = ("depths", "width", "in_chans", "norm", "conv", "groups")
        diff = [k for k in arch if str(obj["config"].get(k)) != str(model.config[k])]
        if diff:
            raise ValueError(f"{path}: architecture differs from the model in {diff}")
        return _load_state(model, obj["state_dict"], path, strict)
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj.get("state_dict", obj.get("model", obj))
    return _load_state(model, from_timm_state_dict(obj), path, strict)
