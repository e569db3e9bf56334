"""Few-shot linear evaluation of a representation, as big_vision's `fewshot_lsr` evaluator.

    features : the model's pre-logits (`model.features`) of K training images per class (a seeded draw, nested
               across K) and of every test image; images squash-resized to (crop, crop), as the eval transform
    classifier: closed-form regularized least squares on standardized features plus a constant bias feature
               (100, so the bias is barely regularized), targets 2*onehot-1:
                   W = X^T (X X^T + l2 I)^-1 Y          (the dual form: n = K * classes is small)
    accuracy : argmax of X_test W against the test labels, for each K (default 1, 5, 10, 25)

`bitfast-train fewshot --weights W --data D` scores any checkpoint; `upstream --fewshot-data D --fewshot-every N`
logs it while pre-training (loop.py). Nothing here trains the model.
"""
import os

import numpy as np
import torch

from bitfast.train import config as C
from bitfast.train import data as D

L2_REG = 2.0 ** 10  # big_vision fewshot_lsr's default
BIAS_FEATURE = 100.0


def lsr_accuracy(x, y, x_test, y_test, num_classes, l2_reg=L2_REG):
    """Top-1 of the closed-form least-squares classifier fitted on (x, y), scored on (x_test, y_test)."""
    x, x_test = np.asarray(x, np.float64), np.asarray(x_test, np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-5
    pad = lambda a: np.concatenate([(a - mean) / std, np.full((len(a), 1), BIAS_FEATURE)], 1)  # noqa: E731
    x, x_test = pad(x), pad(x_test)
    targets = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0
    w = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(len(x)), targets)
    return float(((x_test @ w).argmax(1) == np.asarray(y_test)).mean())


@torch.no_grad()
def features(model, source, indices, crop, device, batch=64):
    """(len(indices), C) float32 pre-logits; unreadable images are dropped (their positions returned too)."""
    was_training = model.training
    model.eval()
    out, keep = [], []
    for j in range(0, len(indices), batch):
        xs = []
        for i in indices[j:j + batch]:
            try:
                xs.append(D.eval_transform(source.load(int(i)), crop))
                keep.append(int(i))
            except Exception:  # a bad image is left out of the few-shot sets, as in training
                continue
        if xs:
            x = torch.stack(xs).to(device).float().div_(127.5).sub_(1.0)
            out.append(model.features(x).float().cpu())
    model.train(was_training)
    dim = getattr(model, "num_features", 0)
    return (torch.cat(out).numpy() if out else np.zeros((0, dim), np.float32)), np.asarray(keep, np.int64)


class FewShot:
    """One downstream set: its K-shot draws and test images, scored on any model by `evaluate(model)`."""

    def __init__(self, spec, shots=(1, 5, 10, 25), crop=224, seed=0, l2_reg=L2_REG, max_test=None):
        train, test = D.open_data(spec)
        if np.asarray(train.labels).dtype == object:
            raise ValueError(f"--fewshot-data {spec}: needs single-label data")
        self.spec, self.train, self.test, self.crop, self.l2 = spec, train, test, crop, l2_reg
        self.shots, self.num_classes = sorted(shots), len(train.classes)
        counts = np.bincount(train.labels, minlength=self.num_classes)
        if counts.min() < self.shots[-1]:
            raise ValueError(f"--fewshot-shots {self.shots[-1]}: {spec} has a class with only {counts.min()} "
                             "training images")
        self.draw = {k: D.fewshot_indices(train.labels, k, seed) for k in self.shots}  # nested: one seeded order
        self.test_idx = np.arange(len(test)) if max_test is None else np.random.default_rng(seed).permutation(
            len(test))[:max_test]

    def evaluate(self, model, device="cpu"):
        """{K: top-1} for each K."""
        xtr, itr = features(model, self.train, self.draw[self.shots[-1]], self.crop, device)
        xte, ite = features(model, self.test, self.test_idx, self.crop, device)
        if not len(ite):
            raise ValueError(f"few-shot: none of the test images of {self.spec} could be read")
        where = {i: n for n, i in enumerate(itr)}
        out = {}
        for k in self.shots:
            rows = [where[i] for i in self.draw[k] if i in where]
            out[k] = lsr_accuracy(xtr[rows], self.train.labels[itr[rows]], xte, self.test.labels[ite],
                                  self.num_classes, self.l2)
        return out


def format_result(acc):
    return ", ".join(f"{k}-shot {v:.1%}" for k, v in acc.items())


def load_model(weights, model_name=None):
    """A model from a bitfast model.pt, a bitfast-train last.pt (its config names the model) or, with
    `model_name`, an official .npz / timm state_dict. Loading never runs code (weights_only)."""
    from bitfast import models
    from bitfast.train import checkpoint as ck
    if not os.path.isfile(weights):
        raise ValueError(f"--weights {weights}: no such file")
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception:
        obj = None  # an .npz, or not a torch file at all
    if isinstance(obj, dict) and obj.get("format") == ck.FORMAT:  # a training checkpoint
        cfg, rec = obj["config"], obj["recipe"]
        model = models.create(model_name or cfg["model"], num_classes=rec["num_classes"], norm=cfg["norm"],
                              conv=cfg["conv"])
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in obj["model"].items()})
        return model
    try:
        if model_name is None:
            return models.load(weights)
        return models.create(model_name, weights=weights)
    except Exception as e:
        raise ValueError(f"--weights {weights}: cannot load it ({e}); an .npz or timm file needs --model") from None


def add_parser(sub):
    p = sub.add_parser("fewshot", help="few-shot linear eval (closed-form least squares on pre-logits) of a checkpoint")
    p.add_argument("--weights", required=True, help="bitfast model.pt or last.pt; .npz / timm file with --model")
    p.add_argument("--model", help="zoo name, for .npz and timm files (bitfast files carry it)")
    p.add_argument("--data", required=True, help="ImageFolder root (train/ + test/ or val/) or a built-in name")
    p.add_argument("--shots", default="1,5,10,25", help="images per class (default 1,5,10,25)")
    p.add_argument("--resolution", type=int, default=224, help="images squash-resized to this (default 224)")
    p.add_argument("--seed", type=int, default=0, help="seed of the K-shot draw (default 0)")
    p.add_argument("--l2", type=float, default=L2_REG, help=f"ridge regularization (default {L2_REG:g})")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--out", help="also write the result as JSON here")
    p.set_defaults(protocol=main)


def main(args):
    shots = C.parse_shots(args.shots)
    if args.resolution < 1 or args.resolution > C.MAX_SIDE:
        raise ValueError(f"--resolution must be in [1, {C.MAX_SIDE}], got {args.resolution}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_model(args.weights, args.model).to(device)
    acc = FewShot(args.data, shots, args.resolution, args.seed, args.l2).evaluate(model, device)
    print(f"few-shot {args.data} at {args.resolution}px: {format_result(acc)}")
    if args.out:
        from bitfast.train.checkpoint import write_json
        write_json(args.out, {"weights": args.weights, "data": args.data, "resolution": args.resolution,
                              "seed": args.seed, "l2": args.l2, "top1": {str(k): v for k, v in acc.items()}})
    return 0
