"""`jaxepochs run --config experiments/NAME.py --workdir DIR [--config.a.b=value ...] [--quiet] [--restart]`,
`jaxepochs sweep --config ... --workdir DIR --sweep.a.b=V1,V2 ... [--random N] [--cv K [--refit]] [--chunk C]`
`jaxepochs reproduce NAME|all --workdir DIR [--seeds K] [--quick]` and
`jaxepochs lr-find --config ... --workdir DIR [--min 1e-8 --max 1 --steps 100 --rates 8 --epochs 2]`,
`jaxepochs predict WORKDIR --input x.npy --out y.npy [--epoch best] [--run r3] [--batch-size N]` and
`jaxepochs export WORKDIR --out DIR [--epoch best] [--run r3] [--weights separate] [--format onnx]`."""

from __future__ import annotations

import argparse
import errno
import os
import pathlib
import sys
import traceback

from jaxepochs.host import ctrl_c  # imports nothing heavy: the command listens for Ctrl-C before JAX loads
from jaxepochs.sweep import command as sweep_command  # nor does this


class UsageError(ValueError):
    """A command line that cannot be run."""


def _split_overrides(argv: list[str], prefix: str = "--config.") -> tuple[list[str], dict[str, str]]:
    rest, overrides = [], {}
    args = iter(argv)
    for arg in args:
        if arg.startswith(prefix):
            key, sep, value = arg.removeprefix(prefix).partition("=")
            if not sep:  # --config.a.b value
                value = next(args, None)
                if value is None:
                    raise UsageError(f"{arg} needs a value: {arg}=VALUE.")
            overrides[key] = value
        else:
            rest.append(arg)
    return rest, overrides


def _refuse_experiment_keys(overrides, flag: str = "--config.") -> None:
    """experiment.* records the module the config was loaded from (its path and source hash, in config.json): set
    by loading --config, never from the command line, where it would record another module than the one run."""
    fixed = sorted(k for k in overrides if k == "experiment" or k.startswith("experiment."))
    if fixed:
        raise UsageError(
            f"{flag}{fixed[0]}: experiment.* records the experiment module the config was loaded from (its path and "
            "source hash), so it cannot be overridden. Pass the module itself as --config PATH."
        )


def _load_config(path: str, overrides: dict[str, str]):
    """The experiment module's config with the command line's overrides (experiment.* refused)."""
    _refuse_experiment_keys(overrides)
    if pathlib.Path(path).is_file() and pathlib.Path(path).suffix != ".py":
        raise UsageError(
            f"--config {path} is not a Python file: the config is an experiment module, a .py file that defines "
            "get_config() (e.g. experiments/mnist1d_mlp.py)."
        )
    from jaxepochs.host import config as config_lib  # imports jax: after Ctrl-C is listened for

    return config_lib.apply_overrides(config_lib.load_config_file(path), overrides)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxepochs", description="Epoch-centric training with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train one experiment", epilog="Override any field: --config.train.epochs=5")
    run.add_argument("--config", required=True, help="experiment module, e.g. experiments/mnist1d_mlp.py")
    run.add_argument("--workdir", required=True, help="directory for the run's outputs")
    run.add_argument("--quiet", action="store_true", help="print nothing while training")
    run.add_argument(
        "--restart", action="store_true", help="discard a run already in the workdir (by default it is resumed)"
    )
    rep = sub.add_parser("reproduce", help="rerun a published result over seeds and judge it")
    rep.add_argument("name", help='a reference in experiments/references (e.g. "mnist1d") or "all"')
    rep.add_argument("--workdir", required=True, help="directory for the runs, report.md and curves.png")
    rep.add_argument("--seeds", type=int, default=None, help="seeds per experiment (default: the reference's, else 3)")
    rep.add_argument("--quick", action="store_true", help="1 seed, a few epochs: checks directions only")
    rep.add_argument("--quiet", action="store_true", help="print nothing but errors")
    rep.add_argument(
        "--vmap",
        action="store_true",
        help="each experiment's seeds as one sweep (one vmapped program): far faster on an accelerator; the "
        "same numbers (bit for bit on one device; elsewhere to float32 round-off, which a chaotic result such as "
        "grokking's epoch can amplify)",
    )
    swp = sweep_command.add_parser(sub)
    for command in (run, swp):
        _distributed_arguments(command)
    _lr_find_arguments(sub)
    cmp = sub.add_parser("compare", help="runs and sweeps side by side: their validation curves and a table")
    cmp.add_argument("dirs", nargs="+", metavar="DIR", help="workdirs of finished runs or sweeps")
    cmp.add_argument("--out", default="compare", help="writes OUT.png and OUT.csv (default: ./compare)")
    _model_arguments(sub)
    return parser


def _model_arguments(sub) -> None:
    """predict and export: a trained run's model taken out of its workdir."""
    pred = sub.add_parser("predict", help="a trained run's outputs for the inputs of a .npy or .npz file")
    exp = sub.add_parser("export", help="a trained run's inference function, serialised (jax.export, or ONNX)")
    for command in (pred, exp):
        command.add_argument(
            "workdir", metavar="WORKDIR", help="a run's workdir, a sweep's (with --run), or SWEEPDIR/r3"
        )
        command.add_argument(
            "--epoch", default=None, help='"best", "last" or an epoch with a checkpoint (default: last)'
        )
        command.add_argument("--run", default=None, help='a sweep\'s member ("r3", "r3_fold1") or refit ("refit/r3")')
    pred.add_argument(
        "--input", required=True, help="x.npy (the inputs, [N, ...]) or x.npz (one array, or one per input)"
    )
    pred.add_argument("--out", required=True, help="y.npy: the outputs, [N, ...] (y.npz: each output by name)")
    pred.add_argument("--batch-size", type=int, default=None, help="examples per batch (default train.eval_batch_size)")
    exp.add_argument("--out", required=True, help="directory for model.jax (or model.onnx) and export.json")
    exp.add_argument("--weights", choices=("inside", "separate"), default="inside", help="separate: DIR/weights.npz")
    exp.add_argument("--format", choices=("jax", "onnx"), default="jax", help="onnx needs pip install jaxepochs[onnx]")


def _take_model_out(args, overrides: dict[str, str]) -> int:
    if overrides:
        raise UsageError(f"{args.command} reads a trained run; it takes no --config.* overrides.")
    from jaxepochs.host import export, inference  # imports jax: after the cheap checks

    model = inference.load_model(args.workdir, args.epoch, args.run)
    if args.command == "export":
        manifest = export.export_model(model, args.out, weights=args.weights, format=args.format)
        print(f"Wrote {args.out}: {manifest['format']} of {model.name}, epoch {model.epoch}.")
        return 0
    import numpy as np

    x = np.load(args.input, allow_pickle=False)
    if isinstance(x, np.lib.npyio.NpzFile):  # an .npz: its arrays, by name
        with x:
            x = dict(x)
    y = model.predict(x, args.batch_size)
    if isinstance(y, np.ndarray):
        np.save(args.out, y)
    else:
        np.savez(args.out, **export.flat_weights(y))
    print(f"Wrote {args.out}: the outputs of {model.name}, epoch {model.epoch}, for {args.input}.")
    return 0


def _compare(args, overrides: dict[str, str]) -> int:
    if overrides:
        raise UsageError("compare reads finished workdirs; it takes no --config.* overrides.")
    from jaxepochs.studies import compare

    rows = compare.compare(args.dirs, args.out)
    out = pathlib.Path(args.out)
    print(compare.markdown(rows))
    print(f"\nWrote {out.with_suffix('.png')} and {out.with_suffix('.csv')}.")
    return 0


def _lr_find_arguments(sub) -> None:
    lrf = sub.add_parser(
        "lr-find",
        help="the learning-rate range test, and K constant rates trained side by side in one vmapped program",
        epilog="Override any field: --config.optimizer.name=sgd",
    )
    lrf.add_argument("--config", required=True, help="experiment module, e.g. experiments/mnist1d_mlp.py")
    lrf.add_argument("--workdir", required=True, help="directory for lr_find.json, lr_find.png, constant_rates/")
    lrf.add_argument("--min", type=float, default=1e-8, help="the range test's first rate (default 1e-8)")
    lrf.add_argument("--max", type=float, default=1.0, help="the range test's last rate (default 1)")
    lrf.add_argument("--steps", type=int, default=100, help="the range test's steps, one rate each (default 100)")
    lrf.add_argument("--rates", type=int, default=8, help="constant rates trained side by side (default 8)")
    lrf.add_argument("--epochs", type=int, default=2, help="epochs each constant rate trains (default 2)")
    lrf.add_argument(
        "--rates-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="the constant rates' range (default: 3 decades below where the range test diverged)",
    )
    lrf.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _lr_find(args, overrides: dict[str, str]) -> int:
    from jaxepochs.studies import lr_find  # imports jax: after the cheap checks

    lr_find.check_arguments(args.min, args.max, args.steps, args.rates, args.epochs, args.rates_range)
    config = _load_config(args.config, overrides)
    lr_find.lr_find(
        config, args.workdir, min_lr=args.min, max_lr=args.max, steps=args.steps, rates=args.rates,
        epochs=args.epochs, rates_range=args.rates_range, quiet=args.quiet,
    )  # fmt: skip
    return 0


def _distributed_arguments(command: argparse.ArgumentParser) -> None:
    """Many processes (hosts) as one run, through JAX's own runtime (`jax.distributed.initialize`)."""
    group = command.add_argument_group(
        "many processes", "start one process per host (or per GPU) with the same command and config"
    )
    group.add_argument("--coordinator_address", help="HOST:PORT of process 0, reachable by every process")
    group.add_argument("--num_processes", type=int, help="how many processes the run spans")
    group.add_argument("--process_id", type=int, help="this process's index, 0 to num_processes - 1")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="join the processes with what JAX detects (TPU pods, SLURM, Open MPI) when no address is given",
    )
    group.add_argument(
        "--distributed_timeout", type=int, default=60, help="seconds to reach the coordinator before an error"
    )
    group.add_argument(
        "--heartbeat_timeout",
        type=int,
        default=100,
        help="seconds without a sign of life from a process before the others stop with an error",
    )


def _initialize_distributed(args) -> None:
    """`jax.distributed.initialize` where the command line asks for many processes; before anything else
    touches a JAX backend."""
    given = [args.coordinator_address, args.num_processes, args.process_id]
    if not args.distributed and all(value is None for value in given):
        return
    if not args.distributed and any(value is None for value in given):
        raise UsageError(
            "--coordinator_address, --num_processes and --process_id go together (or use --distributed where JAX "
            "detects them: TPU pods, SLURM, Open MPI)."
        )
    if None not in (args.num_processes, args.process_id) and not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process_id {args.process_id} is not in 0..{args.num_processes - 1}.")
    from jaxepochs.host import devices

    devices.initialize(
        args.coordinator_address, args.num_processes, args.process_id, args.distributed_timeout, args.heartbeat_timeout
    )


def _sweep(args, overrides: dict[str, str], specs: dict[str, str]) -> int:
    _refuse_experiment_keys(specs, "--sweep.")
    options = sweep_command.search_options(args, specs) if args.search else sweep_command.sweep_options(args)
    config = _load_config(args.config, overrides)
    if args.search:
        from jaxepochs.studies import search

        search.search(config, specs, args.workdir, **options)
        return 0
    from jaxepochs.sweep import grid as sweep_lib
    from jaxepochs.sweep import run as sweep_run

    sweep_run.sweep(config, sweep_lib.expand(config, specs, args.random, args.random_seed), args.workdir, **options)
    return 0


_WHAT_TO_DO = {  # errno -> what a user can do about it
    errno.ENOSPC: "free space on that disk, or give a --workdir on another one, then run the command again: the "
    "run resumes from its last checkpoint",
    errno.EDQUOT: "free space within your quota, then run the command again: the run resumes from its last checkpoint",
    errno.EACCES: "give a path you may write to",
    errno.EPERM: "give a path you may write to",
    errno.EROFS: "give a path on a writable file system",
    errno.ENOTDIR: "a part of that path is a file: give a path under a directory",
    errno.EEXIST: "a file is in the way: remove it, or give another path",
    errno.EISDIR: "a directory is in the way: remove it, or give another path",
}


def os_error_message(e: OSError) -> str:
    """One line: what failed, on which path, and what to do."""
    where = f" ({e.filename})" if e.filename else ""
    what = e.strerror or str(e)
    fix = _WHAT_TO_DO.get(e.errno, "check that path and run the command again")
    return f"{what}{where}: {fix}."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = _split_overrides(argv)
        rest, specs = _split_overrides(rest, "--sweep.")
        args = _parser().parse_args(rest)
        if specs and args.command != "sweep":
            raise UsageError("--sweep.* options belong to `jaxepochs sweep`.")
        if args.command in ("run", "sweep"):
            _initialize_distributed(args)
        if args.command == "sweep":
            return _sweep(args, overrides, specs)
        if args.command == "lr-find":
            return _lr_find(args, overrides)
        if args.command == "compare":
            return _compare(args, overrides)
        if args.command in ("predict", "export"):
            return _take_model_out(args, overrides)
        if args.command == "reproduce":
            if overrides:
                raise UsageError("reproduce takes no --config.* overrides; the references fix each recipe.")
            from jaxepochs.studies import common, reproduce

            names = common.available() if args.name == "all" else [args.name]
            failed = 0
            for name in names:
                workdir = args.workdir if len(names) == 1 else f"{args.workdir}/{name}"
                rows = reproduce.reproduce(
                    name, workdir, seeds=args.seeds, quick=args.quick, quiet=args.quiet, vmap=args.vmap
                )
                failed += sum(not row["passed"] for row in rows)
            return 1 if failed else 0
        config = _load_config(args.config, overrides)
        from jaxepochs.host import run  # imports jax: after the cheap checks

        run.train_and_evaluate(config, args.workdir, quiet=args.quiet, restart=args.restart)
    except (ValueError, FloatingPointError, _distributed_error()) as e:  # our errors say what to fix
        print(f"jaxepochs: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk or the file system refused: say which path, and what to do
        print(f"jaxepochs: error: {os_error_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:  # an experiment module's on_epoch_end raised: its traceback, then what to do
        if type(e).__name__ != "CallbackError":
            raise
        traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"jaxepochs: error: {e}", file=sys.stderr)
        return 1
    return 0


def _many_processes() -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


def _process_index() -> int:
    return sys.modules["jax"].process_index()


def _distributed_error() -> type:
    from jaxepochs.host import devices

    return devices.DistributedError


def entry() -> None:
    """The `jaxepochs` command: main(), and after a Ctrl-C an exit that skips the interpreter's shutdown. Its
    work is saved by then, or a second Ctrl-C aborted it: then the checkpoint library's writer threads, still
    running, would meet a closing interpreter and print tracebacks for a save that was meant to be dropped."""
    ctrl_c.listen()  # before the imports below: a Ctrl-C during them is noted and acted on, not lost
    from jaxepochs.host import driver

    driver.EXIT_ON_SECOND_CTRL_C = True
    try:
        code = main()
    except BaseException:  # a traceback: past one process, printed, then the same quick exit as below
        if not _many_processes():
            raise
        import traceback

        traceback.print_exc()
        error = sys.exc_info()[1]
        last_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        print(f"jaxepochs: error: process {_process_index()}: {type(error).__name__}: {last_line}", file=sys.stderr)
        code = 1
    if code and _many_processes():
        print(
            "jaxepochs: this process of a multi-process run stopped; if another process died, start every process "
            "again with the same command: the run resumes from its last checkpoint.",
            file=sys.stderr,
        )
        # At once: JAX's shutdown would wait (minutes) at a barrier for processes that are still training; they
        # learn of this one's end from the runtime's heartbeat and stop with an error too.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
