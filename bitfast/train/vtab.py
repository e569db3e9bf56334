"""`bitfast-train vtab`: the VTAB-1k protocol of the paper (Section 3.2, Fig. 3, Tables 3 and 5).

Each task is a local ImageFolder ROOT/<task>/{train,test}/<class>/*, train/ holding the task's 1000 training
examples (VTAB-1k's train800val200) and test/ the official test split. Per task, with BiT-HyperRule:

    1. selection: a seeded 800/200 split of train/ (symlinks under OUT/<task>/split), train on 800, top-1 on 200;
    2. final    : train on all 1000, top-1 on test/   <- the number VTAB reports;
per-task flip/crop from TASKS (paper appendix B). The table gives per-task top-1, the mean of each group and
the mean over the tasks present (the VTAB-1k score when all 19 are there); missing tasks are listed.
Every run is a normal transfer run directory, so a killed suite resumes task by task.
"""
import os
from typing import NamedTuple

import numpy as np

from bitfast.train import protocol as P


class Task(NamedTuple):
    group: str
    source: str  # the TFDS dataset (and label) VTAB builds the task from
    flip: bool = True
    crop: bool = True


TASKS = {
    "caltech101": Task("natural", "caltech101"),
    "cifar100": Task("natural", "cifar100"),
    "dtd": Task("natural", "dtd"),
    "flowers102": Task("natural", "oxford_flowers102"),
    "pets": Task("natural", "oxford_iiit_pet"),
    "sun397": Task("natural", "sun397"),
    "svhn": Task("natural", "svhn_cropped"),
    "camelyon": Task("specialized", "patch_camelyon"),
    "eurosat": Task("specialized", "eurosat"),
    "resisc45": Task("specialized", "resisc45"),
    "retinopathy": Task("specialized", "diabetic_retinopathy_detection/btgraham-300"),
    "clevr_count": Task("structured", "clevr: count_all", crop=False),
    "clevr_dist": Task("structured", "clevr: closest_object_distance", crop=False),
    "dmlab": Task("structured", "dmlab", crop=False),
    "kitti_dist": Task("structured", "kitti: closest_vehicle_distance", crop=False),
    "dsprites_loc": Task("structured", "dsprites: label_x_position", flip=False, crop=False),
    "dsprites_ori": Task("structured", "dsprites: label_orientation", flip=False),
    "smallnorb_azi": Task("structured", "smallnorb: label_azimuth", flip=False),
    "smallnorb_elev": Task("structured", "smallnorb: label_elevation"),
}
GROUPS = ("natural", "specialized", "structured")
OWNED = {"data", "out", "eval_split", "no_flip", "no_crop", "examples_per_class", "exclude"}


def add_parser(sub):
    p = sub.add_parser("vtab", help="VTAB-1k: 19 tasks from local folders, 800/200 selection + final on 1000, "
                                    "per-task / group / overall top-1 tables")
    p.add_argument("--root", required=True, help="folder with one ImageFolder per task: ROOT/<task>/{train,test}")
    p.add_argument("--tasks", help=f"comma-separated subset (default all 19: {', '.join(TASKS)})")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 800/200 selection split (default 0)")
    p.add_argument("--final-only", action="store_true", help="skip the 800/200 selection runs")
    P.add_common(p)
    p.set_defaults(protocol=P.grouped(main))


def main(args):
    names = list(TASKS) if not args.tasks else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    if not os.path.isdir(args.root):
        raise FileNotFoundError(f"--root: {args.root} is not a directory")
    P.base_config(args, OWNED)  # bad flags fail here, before any training
    results, missing = {}, {}
    for n, name in enumerate(names, 1):
        task, tdir = TASKS[name], os.path.join(args.root, name)
        lacks = [d for d in ("train", "test") if not os.path.isdir(os.path.join(tdir, d))]
        if lacks:
            missing[name] = f"no {' or '.join(d + '/' for d in lacks)} under {tdir}"
            P.log(f"== vtab [{n}/{len(names)}] {name}: missing ({missing[name]})")
            continue
        kw = dict(no_flip=not task.flip, no_crop=not task.crop)
        row = dict(group=task.group, flip=task.flip, crop=task.crop, val_top1=None)
        if not args.final_only:
            split = P.selection_split(tdir, os.path.join(args.out, name, "split"), args.split_seed)
            P.log(f"== vtab [{n}/{len(names)}] {name}: selection run (train 80% -> val 20% of train/)")
            s = P.run(P.base_config(args, OWNED, data=split, eval_split="val", out=os.path.join(args.out, name,
                                                                                                 "select"), **kw))
            row["val_top1"], row["val_images"] = s["top1"], s["eval_images"]
        P.log(f"== vtab [{n}/{len(names)}] {name}: final run (all of train/ -> test/)")
        f = P.run(P.base_config(args, OWNED, data=tdir, eval_split="test", out=os.path.join(args.out, name, "final"),
                                **kw))
        row["test_top1"], row["test_images"] = f["top1"], f["eval_images"]
        results[name] = row
        report(args, names, results, missing)  # after every task: a crash leaves the table so far
    table = report(args, names, results, missing)
    P.log("\n" + table)
    return 0


def summarize(results, names):
    groups = {g: [r["test_top1"] for r in results.values() if r["group"] == g] for g in GROUPS}
    means = {g: float(np.mean(v)) if v else None for g, v in groups.items()}
    overall = float(np.mean([r["test_top1"] for r in results.values()])) if results else None
    return means, overall


def report(args, names, results, missing):
    means, overall = summarize(results, names)
    rows = [(name, r["group"], P.pct(r["val_top1"]), P.pct(r["test_top1"]), r["test_images"],
             "" if r["flip"] else "no", "" if r["crop"] else "no") for name, r in results.items()]
    md = [f"# VTAB-1k: {len(results)} of {len(names)} tasks", "",
          P.md_table(("task", "group", "val top-1 (800/200 split)", "test top-1", "test images", "flip", "crop"), rows),
          "", P.md_table(("group", "tasks", "mean test top-1"),
                         [(g, sum(r["group"] == g for r in results.values()), P.pct(means[g])) for g in GROUPS]),
          "", f"**mean over {len(results)} task(s): {P.pct(overall)}**"
          + ("" if len(results) == len(TASKS) else f" (the VTAB-1k score needs all {len(TASKS)})")]
    if missing:
        md += ["", "Missing tasks:", ""] + [f"- {k}: {v}" for k, v in missing.items()]
    data = dict(tasks=results, group_means=means, mean=overall, tasks_done=len(results), tasks_asked=len(names),
                missing=missing, root=args.root, split_seed=args.split_seed)
    text = "\n".join(md)
    P.write_tables(args.out, "vtab", data, text)
    return text
