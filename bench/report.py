"""Render bench/REPORT.md (and bench/report.png when matplotlib is installed) from benchmark result files.

    python -m bench.report [RESULTS ...] [--out bench/REPORT.md] [--png bench/report.png]

RESULTS are folders (every *.json inside) or files; default bench/results. Both formats are read: bitfast's
schema (bench/_timing.py docstring) and pytest-benchmark's --benchmark-json (stats, extra_info). For every
device the newest file is reported: the headline (GN+WS with bitfast against BN+plain and against the
timm-style composite, with the targets and the gap), GN+WS speed relative to BN+plain per setting, memory,
scaling, and kernel bandwidth as a fraction of the measured device copy.
"""
import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
R50, BASE, MAIN, COMPOSITE = "resnetv2_50x1_bit", "bn-plain-nn", "gn-ws-bitfast", "gn-ws-composite"
TARGET_BN, GOAL_BN, TARGET_COMPOSITE = 0.9, 1.0, 1.5
MODEL_SUITES = {"models", "scaling", "ddp", "max_batch"}


# ------------------------------------------------------------------------------------------------ loading
def _from_pytest_benchmark(doc, path):
    recs = []
    for b in doc.get("benchmarks", []):
        st, extra = b.get("stats", {}), b.get("extra_info", {}) or {}
        rec = {"suite": b.get("group") or Path(b.get("fullname", "bench")).stem.split("::")[0],
               "name": b.get("name", "?"), "params": b.get("params") or {}}
        for k, key in (("median", "median_ms"), ("q1", "q1_ms"), ("q3", "q3_ms"), ("min", "min_ms"),
                       ("max", "max_ms")):
            if k in st:
                rec[key] = st[k] * 1e3
        rec["n"] = st.get("rounds")
        rec.update(extra)
        recs.append(rec)
    mi = doc.get("machine_info", {})
    env = {"device": mi.get("gpu") or mi.get("cpu", {}).get("brand_raw") or path.stem.split("_")[0],
           "date": doc.get("datetime", ""), "python": mi.get("python_version"), "format": "pytest-benchmark"}
    return env, recs


def load(paths):
    """-> list of (path, env, records), unreadable files skipped with a message on stderr."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    runs = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"bench.report: skipping {f}: {e}", file=sys.stderr)
            continue
        if isinstance(doc, dict) and "records" in doc:
            runs.append((f, doc.get("env", {}), doc["records"]))
        elif isinstance(doc, dict) and "benchmarks" in doc:
            runs.append((f, *_from_pytest_benchmark(doc, f)))
        else:
            print(f"bench.report: skipping {f}: not a bitfast or pytest-benchmark result file", file=sys.stderr)
    return runs


def latest_per_device(runs):
    """The newest file per device, GPUs first; pytest-benchmark files join the bitfast file of the same device."""
    by_dev = defaultdict(list)
    for path, env, recs in runs:
        by_dev[env.get("device", "?")].append((env.get("date", ""), path.name, path, env, recs))
    out = []
    for dev, items in by_dev.items():
        items.sort(key=lambda t: (t[0], t[1]))
        _, _, path, env, recs = items[-1]
        out.append((path, env, recs, [i[2] for i in items[:-1]]))
    out.sort(key=lambda t: (t[1].get("device_type", "cuda") == "cpu", t[1].get("device", "")))
    return out


# ------------------------------------------------------------------------------------------------ numbers
def _split(rec):
    setting, _, cand = rec["name"].rpartition("/")
    return setting, cand


def by_setting(records, suite="models"):
    """{setting id: {candidate label: record}} for measured records of `suite`."""
    out = defaultdict(dict)
    for r in records:
        if r.get("suite") == suite and "img_per_s" in r:
            setting, cand = _split(r)
            out[setting][cand] = r
    return out


def ratio(a, b):
    return a["img_per_s"] / b["img_per_s"] if a and b and b.get("img_per_s") else float("nan")


def _verdict(r, target):
    if math.isnan(r):
        return "not measured"
    return "met" if r >= target else f"short by {100 * (target - r) / target:.0f}% of the target"


def headline_lines(records):
    """One line per train setting: GN+WS (bitfast) against BN+plain and the composite, with the targets."""
    lines = []
    for setting, c in sorted(by_setting(records).items()):
        if MAIN not in c or "-train-" not in setting:
            continue
        r_bn, r_co = ratio(c[MAIN], c.get(BASE)), ratio(c[MAIN], c.get(COMPOSITE))
        line = f"{setting}: GN+WS bitfast {c[MAIN]['img_per_s']:.1f} img/s = {r_bn:.2f}x BN+plain, " \
               f"{r_co:.2f}x timm-style composite"
        if setting.startswith(f"{R50}-train-") and setting.endswith("-bf16-channels_last"):  # the target setting
            line = f"{setting}: GN+WS bitfast {c[MAIN]['img_per_s']:.1f} img/s = {r_bn:.2f}x BN+plain " \
                   f"(target >= {TARGET_BN}x: {_verdict(r_bn, TARGET_BN)}; goal {GOAL_BN}x: " \
                   f"{_verdict(r_bn, GOAL_BN)}), {r_co:.2f}x the timm-style composite in the same mode " \
                   f"(target >= {TARGET_COMPOSITE}x, eager: {_verdict(r_co, TARGET_COMPOSITE)})"
        lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------------ markdown
def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return out + [""]


def _num(x, fmt="{:.1f}"):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _gib(b):
    return _num(None if b is None else b / 2**30, "{:.2f}")


def _iqr(r):
    return _num(100 * (r["q3_ms"] - r["q1_ms"]) / r["median_ms"] if r.get("median_ms") else None, "±{:.0f}%")


def _params(p):
    return ", ".join(f"{k}={v}" for k, v in (p or {}).items())


def models_section(records):
    groups = by_setting(records)
    if not groups:
        return []
    cands = ["gn-ws-bitfast", "gn-ws-composite", "gn-ws-torch", "gn-plain-bitfast", "bn-ws-bitfast"]
    out = ["### GN+WS speed relative to BN+plain, per setting", "",
           "img/s of BN+plain, then every candidate's img/s as a multiple of it (median of alternating repeats).",
           ""]
    rows = [[s, _num(c.get(BASE, {}).get("img_per_s"))] + [_num(ratio(c.get(k), c.get(BASE)), "{:.2f}x")
                                                           for k in cands] for s, c in sorted(groups.items())]
    out += _table(["setting", "BN+plain img/s"] + cands, rows)
    out += ["### All candidates", ""]
    rows = []
    for s, c in sorted(groups.items()):
        for k, r in c.items():
            rows.append([s, k, _num(r["img_per_s"]), _iqr(r), _num(r.get("median_ms"), "{:.2f}"),
                         _num(ratio(r, c.get(BASE)), "{:.2f}x"), _gib(r.get("peak_mem_bytes")),
                         _num(r.get("first_call_s"), "{:.1f}")])
    return out + _table(["setting", "candidate", "img/s", "IQR", "ms/step", "x BN+plain", "peak mem GiB",
                         "first call s"], rows)


def memory_section(records):
    rows = [[r["name"], r.get("max_batch"), "yes" if r.get("capped") else "no", _gib(r.get("total_mem_bytes"))]
            for r in records if r.get("suite") == "max_batch" and "max_batch" in r]
    if not rows:
        return []
    return ["### Largest train batch that fits (R50x1, 224, bf16, channels_last, eager)", ""] + \
        _table(["candidate", "largest batch", "hit the cap", "GPU memory GiB"], rows)


def scaling_section(records):
    groups = by_setting(records, "scaling")
    if not groups:
        return []
    out = ["### Scaling: train step against batch size and resolution", ""]
    rows = []
    for s, c in sorted(groups.items(), key=lambda kv: (kv[0].split("/")[0], int(kv[0].split("/")[-1]))):
        for k, r in c.items():
            rows.append([s, k, _num(r.get("median_ms"), "{:.2f}"), _iqr(r), _num(r["img_per_s"]),
                         _num(ratio(r, c.get(BASE)), "{:.2f}x")])
    out += _table(["sweep/size", "candidate", "ms/step", "IQR", "img/s", "x BN+plain"], rows)
    ddp = [r for r in records if r.get("suite") == "ddp"]
    if ddp:
        out += ["### DDP scaling", ""]
        out += _table(["world size", "img/s", "efficiency", "note"],
                      [[r.get("world_size"), _num(r.get("img_per_s")), _num(r.get("efficiency"), "{:.2f}"),
                        r.get("note", "")] for r in sorted(ddp, key=lambda r: r.get("world_size", 0))])
    return out


def kernels_section(records):
    rows = []
    for r in records:
        if r.get("suite") in MODEL_SUITES or ("median_ms" not in r and "gbps" not in r):
            continue
        gb = r.get("gbps")
        if gb is None and r.get("bytes") and r.get("median_ms"):
            gb = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9
        frac = gb / r["copy_gbps"] if gb and r.get("copy_gbps") else None
        rows.append([r["suite"], r["name"], _params(r.get("params")), _num(r.get("median_ms"), "{:.4g}"), _iqr(r),
                     _num(gb), _num(r.get("copy_gbps")), _num(None if frac is None else 100 * frac, "{:.0f}%")])
    if not rows:
        return []
    return ["### Kernels: time and effective bandwidth as a fraction of the measured copy", "",
            "Effective bandwidth counts the minimum bytes (GN forward 2T, backward 3T); copy = device-to-device "
            "copy measured in the same process.", ""] + \
        _table(["suite", "name", "params", "median ms", "IQR", "GB/s", "copy GB/s", "of copy"], sorted(rows))


def device_section(path, env, records, older):
    out = [f"## {env.get('device', '?')} — {env.get('date', '?')}", "",
           f"File `{path.name}`. torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
           f"cuDNN {env.get('cudnn')}, Python {env.get('python')}, bitfast {env.get('bitfast')} "
           f"(git {env.get('git')}); auto backends {env.get('backends')}; quick mode: {env.get('quick')}.", ""]
    lines = headline_lines(records)
    if lines:
        out += ["### Headline", "", "Targets: GN+WS with bitfast >= 0.9x BN+plain (goal 1.0x) and >= 1.5x the "
                "timm-style composite, on an H100/H200 in bf16 channels_last, eager.", ""]
        out += [f"- {line}" for line in lines] + [""]
    for part in (models_section, memory_section, scaling_section, kernels_section):
        out += part(records)
    skipped = [f"- {r['suite']}/{r['name']}: {r['skipped']}" for r in records if r.get("skipped")]
    if skipped:
        out += ["### Not measured", ""] + skipped + [""]
    if older:
        out += ["Older results for this device: " + ", ".join(f"`{p.name}`" for p in older), ""]
    return out


# ------------------------------------------------------------------------------------------------ plot
def plot(devices, png):
    """img/s per candidate for each train setting, and img/s against batch and resolution, of the first device.
    Returns the path, or None without matplotlib or data."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path, env, records, _ = devices[0]
    groups = {s: c for s, c in by_setting(records).items() if "-train-" in s} or by_setting(records)
    sweeps = defaultdict(lambda: defaultdict(list))  # kind -> candidate -> [(size, img/s)]
    for s, c in by_setting(records, "scaling").items():
        kind, size = s.split("/")[0], int(s.split("/")[-1])
        for k, r in c.items():
            sweeps[kind][k].append((size, r["img_per_s"]))
    panels = len(groups) + len(sweeps)
    if not panels:
        return None
    fig, axes = plt.subplots(panels, 1, figsize=(9, 1.5 + 2.4 * panels), squeeze=False)
    axes = list(axes[:, 0])
    for ax, (s, c) in zip(axes, sorted(groups.items())):
        names = sorted(c, key=lambda k: c[k]["img_per_s"])
        ax.barh(names, [c[k]["img_per_s"] for k in names],
                color=["tab:green" if k == MAIN else "tab:gray" if k == BASE else "tab:blue" for k in names])
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("images/s")
    for ax, (kind, cands) in zip(axes[len(groups):], sorted(sweeps.items())):
        for k, pts in sorted(cands.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        ax.set_title(f"train step, {kind} sweep", fontsize=9)
        ax.set_xlabel("resolution (px)" if kind == "res" else "batch size")
        ax.set_ylabel("images/s")
        ax.legend(fontsize=8)
    fig.suptitle(f"{env.get('device', '?')} — {env.get('date', '')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _rel(p):
    try:
        return Path(p).resolve().relative_to(HERE.parent.resolve())
    except ValueError:
        return p


def render(results=(HERE / "results",), out=HERE / "REPORT.md", png=HERE / "report.png"):
    """Write the markdown report (and the PNG when possible); returns the markdown text."""
    devices = latest_per_device(load(results))
    md = ["# bitfast benchmark report", "",
          "Rendered by `python -m bench.report` from " + ", ".join(f"`{_rel(p)}`" for p in results) + ". "
          "Medians of repeated, alternating runs; spread = interquartile range (IQR) relative to the median. "
          "Candidates: `norm-conv-impl`; impl `bitfast` = bitfast kernels, `torch` = bitfast's pure-torch "
          "reference backend, `composite` = timm-style torch composite, `nn` = plain torch.nn (BN+plain, the baseline).", ""]
    if not devices:
        md += ["No result files found. Run `pytest bench/` first.", ""]
    drawn = plot(devices, png) if devices and png else None
    if drawn:
        md += [f"![images/s per candidate]({Path(png).name})", ""]
    for dev in devices:
        md += device_section(*dev)
    text = "\n".join(md)
    Path(out).write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="*", default=[str(HERE / "results")], help="result folders or JSON files")
    ap.add_argument("--out", default=str(HERE / "REPORT.md"), help="markdown output (default bench/REPORT.md)")
    ap.add_argument("--png", default=str(HERE / "report.png"), help="plot output ('' for none)")
    a = ap.parse_args(argv)
    text = render(a.results, a.out, a.png or None)
    print(f"wrote {a.out}" + (f" and {a.png}" if a.png and Path(a.png).exists() else ""))
    for line in text.splitlines():
        if line.startswith("## ") or line.startswith("- ") and "img/s" in line:
            print(line)


if __name__ == "__main__":
    main()
