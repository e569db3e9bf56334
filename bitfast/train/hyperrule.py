"""BiT-HyperRule (transfer) and the upstream schedule, as plain functions of the dataset and the step.

Follows the official google-research/big_transfer `bit_hyperrule.py` (GUIDE §4):

    resolution : (160 resize, 128 crop) if H*W < 96*96 else (512, 480)   [paper: (448, 384) for large images]
    supports   : [warmup, d1, d2, d3, end] = [100, 200, 300, 400, 500]              if N < 20k
                                             [500, 3000, 6000, 9000, 10000]          if N < 500k
                                             [500, 6000, 12000, 18000, 20000]        otherwise
    lr(step)   : base * step / warmup while step < warmup; then base / 10^k, k = #{d in supports[1:] : d < step};
                 None (stop) once step >= end
    mixup      : alpha 0.1 if N >= 20k else 0

Each `resolve_*` returns (value, reason) so `--dry-run` can print which rule chose a value.
"""
import math

SMALL_AREA = 96 * 96
RES_SMALL = (160, 128)
RES_LARGE_CODE = (512, 480)  # big_transfer code
RES_LARGE_PAPER = (448, 384)  # paper, Section 3.3
SCHEDULES = (  # (dataset size below, supports)
    (20_000, (100, 200, 300, 400, 500)),
    (500_000, (500, 3000, 6000, 9000, 10_000)),
    (math.inf, (500, 6000, 12_000, 18_000, 20_000)),
)
MIXUP_MIN_SIZE = 20_000
MIXUP_ALPHA = 0.1
BASE_LR = 0.003
BATCH = 512


def resolution(image_hw, paper=False):
    """(resize, crop) from the original image (H, W)."""
    h, w = image_hw
    if h * w < SMALL_AREA:
        return RES_SMALL, f"image area {h}x{w} < 96x96 -> (160, 128)"
    res = RES_LARGE_PAPER if paper else RES_LARGE_CODE
    src = "paper" if paper else "official code; --paper-res gives (448, 384)"
    return res, f"image area {h}x{w} >= 96x96 -> {res} ({src})"


def schedule(dataset_size):
    """Supports [warmup, d1, d2, d3, end] for a training set of `dataset_size` examples."""
    if dataset_size < 1:
        raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
    for limit, supports in SCHEDULES:
        if dataset_size < limit:
            bound = f"< {limit:,}" if limit != math.inf else f">= {SCHEDULES[-2][0]:,}"
            return list(supports), f"{dataset_size:,} examples {bound} -> {list(supports)}"


def scale_supports(supports, steps):
    """Stretch [warmup, d1, d2, d3, end] so that end == steps (keeps the shape; for --steps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    end = supports[-1]
    out = [max(1, round(s * steps / end)) for s in supports[:-1]] + [int(steps)]
    for i in range(1, len(out)):  # keep strictly increasing where the run is long enough
        out[i] = max(out[i], min(out[i - 1] + 1, steps))
    return out


def mixup_alpha(dataset_size):
    if dataset_size >= MIXUP_MIN_SIZE:
        return MIXUP_ALPHA, f"{dataset_size:,} examples >= 20,000 -> MixUp alpha 0.1"
    return 0.0, f"{dataset_size:,} examples < 20,000 -> no MixUp"


def lr_at(step, supports, base_lr):
    """Learning rate for optimizer step `step` (0-based), or None once training should stop."""
    warmup, end = supports[0], supports[-1]
    if step >= end:
        return None
    if step < warmup:
        return base_lr * step / warmup
    return base_lr * 0.1 ** sum(1 for d in supports[1:] if d < step)


# Upstream schedules (paper §3.3): (epochs, epochs after which the lr drops by 10x).
UPSTREAM_SCHEDULES = {
    "bit-m": (90, (30, 60, 80)),  # BiT-S and BiT-M (ILSVRC-2012, ImageNet-21k)
    "bit-l": (40, (10, 23, 30, 37)),  # BiT-L (JFT-300M)
}


def upstream_supports(steps_per_epoch, epochs=None, warmup=5000, schedule="bit-m", cap="decay"):
    """Upstream step schedule [warmup, decays..., end] for one of UPSTREAM_SCHEDULES.

    `epochs` (default: the schedule's own) stretches the decay epochs proportionally. Warmup (5000 steps in the
    paper) is capped only where it would reach the first decay (cap="decay"), or at a tenth of the run
    (cap="tenth", bitfast before issue 14: 2808 steps for BiT-S on ILSVRC-2012 at batch 4096).
    """
    if schedule not in UPSTREAM_SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(UPSTREAM_SCHEDULES)}, got {schedule!r}")
    ref, decay_epochs = UPSTREAM_SCHEDULES[schedule]
    epochs = ref if epochs is None else epochs
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    total = max(1, round(epochs * steps_per_epoch))
    decays = [max(1, round(e * epochs / ref * steps_per_epoch)) for e in decay_epochs]
    if cap not in ("decay", "tenth"):
        raise ValueError(f"warmup cap must be 'decay' or 'tenth', got {cap!r}")
    warm = min(int(warmup), max(1, total // 10) if cap == "tenth" else decays[0])
    return [warm] + decays + [total]


def upstream_lr(batch):
    return 0.03 * batch / 256
