"""`bitfast-train dedup`: near-duplicates of test images in an upstream set (paper Section 4.5, Table 6).

Two signals per image pair (query = a test set, reference = the upstream training images):

    cosine   = <e_q, e_r> with e = the model's pre-logits, minus the mean query embedding, L2-normalized
    hamming  = differing bits of the 64-bit perceptual hashes (imagehash.phash: DCT of a 32x32 gray thumbnail)

A pair is a near-duplicate when cosine >= --threshold or hamming <= --hash-threshold. The search is exact:
the query embeddings and hashes stay on the device; the reference streams through in chunks of --chunk images,
each scored against every query by two matmuls (the hash bits as +-1 vectors: hamming = (64 - <h_q, h_r>) / 2),
and only each query's --top-k best references per signal are kept. So memory is O(queries + chunk), not
O(reference), and millions of reference images only cost time. The state after every chunk is saved, so a
killed run resumes at its last chunk. Outputs in --out: pairs.csv, contact_sheet.png (the closest pairs),
exclude.txt (the duplicated query images, for `transfer --exclude`), dedup.json.
"""
import csv
import hashlib
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from bitfast.train import checkpoint as ck
from bitfast.train import protocol as P
from bitfast.train.data import IMAGE_EXTENSIONS

HASH_BITS = 64


def add_parser(sub):
    p = sub.add_parser("dedup", help="near-duplicates of --query (test) images in --reference (upstream) images: "
                                     "pairs.csv, contact_sheet.png, exclude.txt for transfer --exclude")
    a = p.add_argument
    a("--reference", required=True, help="folder of upstream images (searched recursively; any layout)")
    a("--query", required=True, help="folder of test images (e.g. DATA/test)")
    a("--out", required=True, help="output folder")
    a("--model", default="BiT-M-R50x1", help="zoo model for the embeddings (default BiT-M-R50x1)")
    a("--weights", help="its pre-trained weights; without them the embeddings come from random weights")
    a("--threshold", type=float, default=0.9, help="cosine of centred pre-logits at or above which a pair is a "
                                                   "duplicate (default 0.9)")
    a("--hash-threshold", type=int, default=6, help="perceptual-hash Hamming distance at or below which a pair is "
                                                    "a duplicate (default 6 of 64 bits; -1: embeddings only)")
    a("--resolution", type=int, default=128, help="images are resized to this square for the model (default 128)")
    a("--top-k", type=int, default=5, help="closest references kept per query and signal (default 5)")
    a("--chunk", type=int, default=65536, help="reference images per chunk (default 65536)")
    a("--batch", type=int, default=256, help="images per model batch (default 256)")
    a("--sheet", type=int, default=32, help="pairs on the contact sheet (default 32)")
    a("--device", default="auto", help="auto (default: cuda when present), cpu, cuda")
    a("--workers", type=int, default=2, help="image decoding processes (default 2)")
    p.set_defaults(protocol=main)


def list_images(root, what):
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what}: {root} is not a directory")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"{what}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return paths


class Images(torch.utils.data.Dataset):
    """-> (uint8 (3, R, R), hash bits uint8 (64,), ok). The hash is taken on the original image."""

    def __init__(self, paths, res):
        self.paths, self.res = paths, res

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import imagehash
        try:
            with Image.open(self.paths[i]) as im:
                img = im.convert("RGB")
        except Exception:
            return torch.zeros(3, self.res, self.res, dtype=torch.uint8), torch.zeros(HASH_BITS, dtype=torch.uint8), False
        bits = imagehash.phash(img).hash.reshape(-1).astype(np.uint8)
        x = np.asarray(img.resize((self.res, self.res), Image.BILINEAR), np.uint8)
        return torch.from_numpy(x.copy()).permute(2, 0, 1), torch.from_numpy(bits), True


@torch.no_grad()
def embed(model, paths, args, device, what):
    """(pre-logits (N, D) fp32, hash signs (N, 64) fp32 in {-1, 1}, ok (N,) bool) on `device`."""
    loader = torch.utils.data.DataLoader(Images(paths, args.resolution), batch_size=args.batch,
                                         num_workers=args.workers)
    feats, signs, oks, t0, done = [], [], [], time.time(), 0
    for x, bits, ok in loader:
        x = x.to(device).float().div_(127.5).sub_(1.0)
        feats.append(model.features(x).float())
        signs.append(bits.to(device).float().mul_(2).sub_(1))
        oks.append(ok.to(device))
        done += len(ok)
        if time.time() - t0 > 30 or done == len(paths):
            P.log(f"  {what}: {done:,}/{len(paths):,} images embedded")
            t0 = time.time()
    return torch.cat(feats), torch.cat(signs), torch.cat(oks)


def merge_topk(best, scores, other, offset, k, largest):
    """Keep the k best (score, other signal, reference index) per query over the old best and a new chunk."""
    kk = min(k, scores.shape[1])
    s, i = scores.topk(kk, dim=1, largest=largest)
    cand = (s, other.gather(1, i), i + offset)
    if best is not None:
        cand = tuple(torch.cat([a, b], 1) for a, b in zip(best, cand))
    s, j = cand[0].topk(min(k, cand[0].shape[1]), dim=1, largest=largest)
    return s, cand[1].gather(1, j), cand[2].gather(1, j)


def search(args, model, device, queries, refs):
    q, qh, qok = embed(model, queries, args, device, "query")
    mean = q[qok].mean(0, keepdim=True) if qok.any() else 0
    q = torch.nn.functional.normalize(q - mean, dim=1)
    state_path = os.path.join(args.out, "search_state.pt")
    key = hashlib.sha256(json.dumps([queries, refs, args.model, args.weights, args.resolution, args.top_k,
                                     args.chunk]).encode()).hexdigest()[:16]
    start, by_cos, by_ham, bad = 0, None, None, int((~qok).sum())
    if os.path.exists(state_path):
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st["key"] == key:
            start, bad = st["next"], st["bad"]
            by_cos = tuple(t.to(device) for t in st["by_cos"]) if st["by_cos"] else None
            by_ham = tuple(t.to(device) for t in st["by_ham"]) if st["by_ham"] else None
            P.log(f"  resuming the reference search at image {start:,}")
    for lo in range(start, len(refs), args.chunk):
        part = refs[lo:lo + args.chunk]
        r, rh, rok = embed(model, part, args, device, f"reference {lo // args.chunk + 1}/"
                                                      f"{-(-len(refs) // args.chunk)}")
        bad += int((~rok).sum())
        r = torch.nn.functional.normalize(r - mean, dim=1)
        cos = q @ r.T  # (Nq, chunk)
        ham = (HASH_BITS - qh @ rh.T) / 2
        cos[:, ~rok], ham[:, ~rok] = -2.0, HASH_BITS + 1  # unreadable references never match
        by_cos = merge_topk(by_cos, cos, ham, lo, args.top_k, largest=True)
        by_ham = merge_topk(by_ham, ham, cos, lo, args.top_k, largest=False)
        ck.save_atomic(dict(key=key, next=lo + len(part), bad=bad, by_cos=[t.cpu() for t in by_cos],
                            by_ham=[t.cpu() for t in by_ham]), state_path)
    return by_cos, by_ham, qok, bad


def pairs_from(by_cos, by_ham, qok, queries, refs, args):
    """Pairs passing either threshold, best cosine first; the same file on both sides is not a duplicate."""
    found = {}
    for cos, ham, idx in (by_cos, (by_ham[1], by_ham[0], by_ham[2])):
        cos, ham, idx = cos.cpu().numpy(), ham.cpu().numpy(), idx.cpu().numpy()
        for qi, j in zip(*np.nonzero((cos >= args.threshold) | (ham <= args.hash_threshold))):
            if not qok[qi]:
                continue
            qp, rp = queries[qi], refs[idx[qi, j]]
            if os.path.realpath(qp) != os.path.realpath(rp):
                found[(qp, rp)] = (float(cos[qi, j]), int(round(ham[qi, j])))
    return sorted(((q, r, c, h) for (q, r), (c, h) in found.items()), key=lambda t: (-t[2], t[3], t[0], t[1]))


def contact_sheet(pairs, path, n, side=96):
    """The n closest pairs as rows of [query | reference], scores under each row."""
    from PIL import ImageDraw
    rows = pairs[:n] or [None]
    sheet = Image.new("RGB", (2 * side + 30, len(rows) * (side + 16) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for k, pair in enumerate(rows):
        y = 4 + k * (side + 16)
        if pair is None:
            draw.text((10, y), "no duplicates found", fill="black")
            continue
        for c, p in enumerate(pair[:2]):
            with Image.open(p) as im:
                sheet.paste(im.convert("RGB").resize((side, side)), (10 + c * (side + 10), y))
        draw.text((10, y + side + 2), f"cos {pair[2]:.3f}  hamming {pair[3]}", fill="black")
    sheet.save(path)


def main(args):
    from bitfast import models
    from bitfast.train import dist
    for k in ("resolution", "top_k", "chunk", "batch"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if not -1 <= args.threshold <= 1.0001 or args.hash_threshold > HASH_BITS:
        raise ValueError("--threshold must be a cosine in [-1, 1] and --hash-threshold at most 64")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("dedup: run it as one process (not under torchrun); it uses one device")
    queries, refs = list_images(args.query, "--query"), list_images(args.reference, "--reference")
    device = dist.pick_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    if not args.weights:
        P.log("dedup: warning: no --weights, so the embeddings come from random weights (the hash still works)")
    torch.manual_seed(0)  # random weights (no --weights) are then the same in every run
    model = models.create(args.model, weights=args.weights).to(device).eval()
    P.log(f"dedup: {len(queries):,} query images against {len(refs):,} reference images ({args.model}, "
          f"{device}, chunks of {args.chunk:,})")
    t0 = time.time()
    by_cos, by_ham, qok, bad = search(args, model, device, queries, refs)
    pairs = pairs_from(by_cos, by_ham, qok.cpu().numpy(), queries, refs, args)
    with open(os.path.join(args.out, "pairs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("query", "reference", "cosine", "hamming"))
        w.writerows((q, r, f"{c:.4f}", h) for q, r, c, h in pairs)
    dups = sorted({os.path.realpath(q) for q, *_ in pairs})
    with open(os.path.join(args.out, "exclude.txt"), "w") as f:
        f.write("".join(p + "\n" for p in dups))
    contact_sheet(pairs, os.path.join(args.out, "contact_sheet.png"), args.sheet)
    summary = dict(queries=len(queries), references=len(refs), pairs=len(pairs), duplicated_queries=len(dups),
                   unreadable=bad, threshold=args.threshold, hash_threshold=args.hash_threshold, model=args.model,
                   weights=args.weights, resolution=args.resolution, wall_s=time.time() - t0)
    with open(os.path.join(args.out, "dedup.json"), "w") as f:
        json.dump(summary, f, indent=1)
    P.log(f"dedup: {len(dups):,} of {len(queries):,} query images have near-duplicates ({len(pairs):,} pairs: "
          f"cosine >= {args.threshold:g} or hamming <= {args.hash_threshold}); {bad} unreadable skipped\n"
          f"outputs in {args.out}: pairs.csv, contact_sheet.png, exclude.txt (for transfer --exclude), dedup.json")
    return 0
