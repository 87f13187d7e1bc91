"""The `seg3d-fast` command: demo | train | predict | evaluate | info | profile.

Bad input (missing, truncated or non-NIfTI files, mismatched grids, labels out of range, empty images) ends
with one line `seg3d-fast: error: FILE: problem` on stderr and exit status 2, no traceback.
"""
import argparse
import errno
import math
import re
import signal
import sys
import threading

from .files import Terminated, forget_termination, interrupt, interrupted, terminate, terminating


def _demo(args):
    from .demo import run_demo

    metrics = run_demo(args.out, epochs=args.epochs, quick=args.quick, device=args.device, seed=args.seed)
    return 0 if metrics["mean_dice"] == metrics["mean_dice"] else 1  # NaN would mean nothing was evaluated


def _train(args):
    from . import train

    check_amp(args.amp, args.device)
    return train.main(args)


def _predict(args):
    from . import predict

    check_amp(args.amp, args.device)
    return predict.main(args)


def _evaluate(args):
    from .metrics import METRICS, evaluate_folders, write_evaluation

    result = evaluate_folders(args.pred_dir, args.label_dir, regions=args.regions, hd95=args.hd95)
    out = args.out or args.pred_dir
    write_evaluation(result, out)
    mean = result["mean"]
    metrics = [m for m in METRICS if m in next(iter(mean.values()), {})]
    print(f"{'target':<12}" + "".join(f"{m:>13}" for m in metrics))
    for target, values in mean.items():
        print(f"{target:<12}" + "".join(f"{values[m]:>13.4f}" for m in metrics))
    print(f"mean Dice over classes {result['classes']}: {result['mean_dice']:.4f} "
          f"({len(result['per_case'])} case(s)); wrote {out}/evaluation.csv and evaluation.json")
    missing = result["unpredicted"]
    if missing:  # (evaluating one fold's predictions against the whole dataset leaves the other folds' out)
        print(f"note: {len(missing)} labelled case(s) of {args.label_dir} have no prediction in {args.pred_dir}: "
              f"{', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}")
    return 0


def _info(args):
    import platform

    import torch

    from . import __version__, backends

    lines = [f"seg3d_fast {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as e:  # noqa: BLE001 - report any import failure
        lines.append(f"triton not importable ({type(e).__name__}: {e})")
    lines.append(f"CUDA (torch build) {torch.version.cuda}")
    lines.append(f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, "
                         f"compute capability {p.major}.{p.minor}")
    else:
        lines.append(f"devices: CPU only ({torch.get_num_threads()} threads)")
    lines.append("backends:")
    for name, reason in backends.available().items():
        lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    print("\n".join(lines))
    return 0


def _profile_arguments(p):
    try:
        from . import profile
    except ImportError as e:
        p.set_defaults(profile_error=f"seg3d_fast.profile is not available ({e})")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        return
    profile.add_arguments(p)


def _profile(args):
    if getattr(args, "profile_error", None):
        raise UsageError(args.profile_error)
    from . import profile

    return profile.main(args)


class UsageError(Exception):
    """A bad combination of command-line options (reported like a data error)."""


# argparse types: a bad value ends in argparse's one-line error naming the option (exit status 2), before any work
def finite(text):
    """A finite float (float() also takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def at_least(low, kind=int, below=None):
    """A number (int or finite float) >= low, and < below when given."""
    def parse(text):
        try:
            value = int(text) if kind is int else finite(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < low or (below is not None and value >= below):
            bounds = f">= {low}" if below is None else f"in [{low}, {below})"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return parse


def device_name(text):
    """auto, cpu, cuda or cuda:N (whether CUDA is there is checked where the device is used)."""
    if text in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def check_amp(amp, device):
    """fp16 autocast runs on a GPU only: refused for --device cpu, and for auto where there is no GPU."""
    if amp == "fp16" and (device == "cpu" or device == "auto" and not _cuda()):
        raise UsageError("--amp fp16 needs a CUDA GPU; use --amp bf16 on the CPU")


def _cuda():
    import torch

    return torch.cuda.is_available()


def build_parser(argv=None):
    parser = argparse.ArgumentParser(prog="seg3d-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train on the bundled brain MRI, predict a held-out slab, print Dice")
    p.add_argument("--out", default="seg3d_demo", help="output folder (default ./seg3d_demo)")
    p.add_argument("--epochs", type=at_least(1), default=None, help="training epochs (default 100; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="a tiny model for a few seconds (checks the pipeline only)")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (a GPU where there is one), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, crops and augmentation")
    p.set_defaults(func=_demo)

    from . import predict, train  # argument definitions live beside the code that uses them

    p = sub.add_parser("train", help="train Seg3DNet on a dataset (BRATS, MSD/nnU-Net, CSV)")
    train.add_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("predict", help="predict label maps with a trained run")
    predict.add_arguments(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("evaluate", help="Dice, Jaccard, sensitivity, PPV, HD95 of predicted label maps")
    p.add_argument("pred_dir")
    p.add_argument("label_dir", help="the ground truth: a folder of label maps (name.nii.gz, name_seg, labelsTr/), "
                                     "or the dataset as train reads it (a CSV manifest, a folder with dataset.json)")
    p.add_argument("--out", default=None, help="where to write evaluation.csv/.json (default: PRED_DIR)")
    p.add_argument("--regions", choices=("auto", "brats", "brats2023", "none"), default="auto",
                   help="BRATS region scores (auto: when labels are within 0..4 and 4 occurs)")
    p.add_argument("--no-hd95", dest="hd95", action="store_false",
                   help="skip the 95th-percentile Hausdorff distances (mm), the slowest part for many classes")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("info", help="versions, devices and which kernel backends can run here")
    p.set_defaults(func=_info)

    # Only build the profile parser when asked for: seg3d_fast.profile may import heavier things.
    argv = sys.argv[1:] if argv is None else argv
    if "profile" in argv[:1]:
        p = sub.add_parser("profile", help="training time and memory of Seg3DNet, fused and plain PyTorch")
        _profile_arguments(p)
        p.set_defaults(func=_profile)
    else:
        sub.add_parser("profile", help="training time and memory of Seg3DNet, fused and plain PyTorch (see profile --help)")
    return parser


def main(argv=None):
    from .backends import BackendUnsupported
    from .data.nifti import Seg3DFastDataError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    previous = _stop_on_sigterm()
    previous_sigint = _stop_on_sigint()
    try:
        if args.command in ("demo", "train", "predict", "profile"):  # (the commands that run the fused ops)
            _check_env_backend()
        return args.func(args) or 0
    except BaseException as e:
        # after a SIGTERM, whatever ends the run is its end (its Terminated may come back as another exception:
        # files.stop_if_terminated)
        if isinstance(e, Terminated) or (terminating() and not isinstance(e, SystemExit)):
            print("seg3d-fast: terminated", file=sys.stderr)
            return 143
        if isinstance(e, KeyboardInterrupt) or (interrupted() and not isinstance(e, SystemExit)):  # (likewise Ctrl-C)
            print("seg3d-fast: interrupted", file=sys.stderr)
            return 130
        if isinstance(e, (Seg3DFastDataError, UsageError, BackendUnsupported, OSError)):  # (OSError: e.g. --out)
            print(f"seg3d-fast: error: {_os_error_text(e) if isinstance(e, OSError) else e}", file=sys.stderr)
            return 2
        raise
    finally:
        forget_termination()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)


def _check_env_backend():
    """A SEG3D_FAST_BACKEND that names no backend, a dispatch table that is not one: a one-line error, not the first
    op's ValueError traceback."""
    from .backends import check_environment

    try:
        check_environment()
    except ValueError as e:
        raise UsageError(str(e)) from None


def _os_error_text(e):
    """A file where a folder belongs (--out naming a file, or a file in the path) says so; other OS errors as they
    are ("[Errno 17] File exists: 'run'" did not say that a folder was expected)."""
    if e.errno in (errno.EEXIST, errno.ENOTDIR) and e.filename is not None:
        return f"{e.filename}: cannot make this folder, a file is in its place or its parent's ({e.strerror})"
    return str(e)


def _stop_on_sigterm():
    """Install the SIGTERM handler (main thread only) -> the previous one, or None where none was installed."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        # once: torchrun sends each worker SIGTERM twice in a row, and the repeat must not interrupt the clean-up
        # the first started (a temporary file left behind, a traceback from main's finally)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # a SIGTERM sent to the process group (`timeout`, a scheduler) reaches the data loader's workers too, and
        # PyTorch's workers die by one that is not their main process's: its SIGCHLD handler then raised "DataLoader
        # worker (pid N) is killed by signal: Terminated" over this Terminated (exit status 1, or a traceback under
        # 143). Worker deaths are expected from here on. (Not put back: a worker killed by the signal and not yet
        # reaped would raise it at the next SIGCHLD; the data loader's own checks of its workers remain.)
        if hasattr(signal, "SIGCHLD"):
            signal.signal(signal.SIGCHLD, lambda *args: None)  # (not SIG_DFL: a pending one would print an OSError)
        terminate()

    return signal.signal(signal.SIGTERM, stop)


def _stop_on_sigint():
    """Ctrl-C as Python's own handler does it (KeyboardInterrupt where the process is), and noted, so that one
    swallowed by the code it interrupted still ends the run (files.stop_if_terminated: matplotlib's guarded import of
    its 3D axes caught it, wrapped in a RuntimeError, and training went on to its last epoch, exit status 0). Only
    where Python's handler is in place (not where SIGINT is ignored: a background job, nohup) -> the previous
    handler, or None."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None
    return signal.signal(signal.SIGINT, lambda signum, frame: interrupt())


if __name__ == "__main__":
    sys.exit(main())
