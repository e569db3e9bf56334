"""python -m bitfast: print what this install can do; --tune: measure the backends on this device (bitfast.autotune)."""
import argparse

from bitfast.info import info


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bitfast", description="Print versions, backends and cached autotune "
                                "choices; with --tune, measure them first.")
    p.add_argument("--tune", action="store_true", help="check and time every backend for every op and shape class on "
                   "the device, replace its cached choices and print them")
    p.add_argument("--device", help="device for --tune (default: cuda if a GPU is visible, else cpu)")
    args = p.parse_args(argv)
    if not args.tune:
        return info()
    import torch

    from bitfast import autotune

    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if device is not None and device.type not in autotune.CANDIDATES:
        p.error(f"--device must be a cpu or cuda device, got {args.device!r}")
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device: no CUDA GPU is visible")
    path, entries = autotune.tune_all(device)
    print(f"autotune cache: {path}")
    print("\n".join(autotune.table(entries)))
    kind = device.type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in autotune.TUNED:
        print(f"(auto uses these choices for {kind.upper()} tensors only with BITFAST_AUTOTUNE=all)")


if __name__ == "__main__":
    main()
