"""Decoding and resizing for the input pipeline: the `decode` config field (`--decode`), README "Input throughput".

    pil   Pillow decodes (libjpeg-turbo) and resizes (its bilinear filter, widened when it shrinks): the path
          before issue 14.
    fast  (default) JPEGs decoded by torchvision.io.decode_jpeg (the same libjpeg-turbo as Pillow, same pixels,
          less overhead; without torchvision, or CMYK: Pillow); the resizes, crops and flips run on the uint8
          (3, H, W) tensor with torch's antialiased bilinear interpolate, whose uint8 channels-last kernel (AVX2)
          implements Pillow's filter. Same crop geometry, the same random draws; pixels within 1 level of `pil`,
          except at the edges of an Inception crop box (below; bounds in tests/test_train_decode.py).
          bench/test_data.py measures the paths side by side.
    gpu   JPEGs are decoded on the GPU (torchvision.io.decode_jpeg on CUDA: nvjpeg) and resized there; the image
          leaves the worker as a CPU uint8 tensor, as on the other paths. Off unless asked for; needs CUDA (and
          DataLoader workers are then spawned, not forked). Other formats, CMYK JPEGs: decoded by Pillow.

data.py writes each transform once against `ops(img)`: PilOps for a PIL image, TensorOps for a uint8 tensor.
Inception crops: Pillow resizes the box with filter taps reaching past its edges; the tensor path resizes the
cropped box, so the output rows and columns within about one source pixel of the box's edges can differ by more
(tested bound). In-memory arrays (Fashion-MNIST) have nothing to decode and keep Pillow in every mode.
"""
import functools
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MODES = ("pil", "fast", "gpu")


class PilOps:
    @staticmethod
    def size(img):
        return img.size

    @staticmethod
    def resize(img, w, h, box=None):
        return img.resize((w, h), Image.BILINEAR, box=box)

    @staticmethod
    def crop(img, left, top, w, h):
        return img.crop((left, top, left + w, top + h))

    @staticmethod
    def flip(img):
        return img.transpose(Image.FLIP_LEFT_RIGHT)

    @staticmethod
    def to_chw(img):
        return torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


class TensorOps:
    """The same operations on a uint8 (3, H, W) tensor (any strides; channels-last views resize fastest)."""

    @staticmethod
    def size(img):
        return img.shape[2], img.shape[1]

    @staticmethod
    def resize(img, w, h, box=None):
        if box is not None:
            img = img[:, box[1]:box[3], box[0]:box[2]]
        x = img.unsqueeze(0)
        if x.is_cuda:  # no uint8 kernel on CUDA: float, rounded back
            y = F.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            return y[0].round_().clamp_(0, 255).to(torch.uint8)
        # channels-last storage: torch's vectorized uint8 kernel (a cropped view is copied into it first)
        x = x.contiguous(memory_format=torch.channels_last)
        return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]

    @staticmethod
    def crop(img, left, top, w, h):
        return img[:, top:top + h, left:left + w]

    @staticmethod
    def flip(img):
        return img.flip(-1)

    @staticmethod
    def to_chw(img):
        return img.contiguous().cpu()


def ops(img):
    return TensorOps if isinstance(img, torch.Tensor) else PilOps


def check(mode):
    """ValueError unless `mode` can run here."""
    if mode not in MODES:
        raise ValueError(f"decode: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "gpu" and not torch.cuda.is_available():
        raise ValueError("--decode gpu needs a CUDA device (torch.cuda.is_available() is False); "
                         "use --decode fast (the default) or pil")
    if mode == "gpu":
        try:
            import torchvision.io  # noqa: F401
        except ImportError:
            raise ValueError("--decode gpu needs torchvision (pip install bitfast[vision])") from None


def to_tensor(img):
    """An RGB PIL image -> uint8 (3, H, W), a channels-last view of one copy of the pixels."""
    return torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1)


@functools.cache  # looked up once per process
def _decode_jpeg():
    """torchvision.io.decode_jpeg, or None without torchvision (or once a release drops it: deprecated in 0.29)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
            from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    def run(raw, device):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               device=device)
    return run


def from_bytes(raw, mode="fast"):
    """Encoded image bytes -> RGB PIL image (mode pil) or uint8 (3, H, W) tensor (fast: CPU, gpu: CUDA for JPEGs).
    Unreadable bytes raise ValueError (the loop skips and counts the sample)."""
    from bitfast.train import data as D
    try:
        with D._open(io.BytesIO(raw)) as im:  # header only, until to_rgb or decode_jpeg
            if mode != "pil" and im.format == "JPEG" and im.mode in ("RGB", "L"):  # not CMYK: Pillow's conversion
                jpeg = _decode_jpeg()
                if jpeg:
                    D.check_pixels(im)
                    return jpeg(raw, "cuda" if mode == "gpu" else "cpu")
            img = D.to_rgb(im)
    except (OSError, SyntaxError, RuntimeError) as e:  # PIL names the BytesIO object: a fixed message instead
        raise ValueError(f"cannot decode the image bytes ({type(e).__name__})") from None
    return img if mode == "pil" else to_tensor(img)


def load(source, i, mode):
    """Item i of a data source decoded for `mode`: the encoded bytes `source.raw(i)` (folders, shards) are decoded
    here; a source with none (raw gives None: in-memory arrays, nothing to decode) gives its PIL image in every
    mode."""
    raw = source.raw(i) if mode != "pil" and hasattr(source, "raw") else None
    return source.load(i) if raw is None else from_bytes(raw, mode)
