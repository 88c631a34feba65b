"""`jaxepochs run --config experiments/NAME.py --workdir DIR [--config.a.b=value ...] [--quiet] [--restart]`
and `jaxepochs reproduce NAME|all --workdir DIR [--seeds K] [--quick]`."""

from __future__ import annotations

import argparse
import sys

from jaxepochs import config as config_lib


class UsageError(ValueError):
    """A command line that cannot be run."""


def _split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    rest, overrides = [], {}
    args = iter(argv)
    for arg in args:
        if arg.startswith("--config."):
            key, sep, value = arg.removeprefix("--config.").partition("=")
            if not sep:  # --config.a.b value
                value = next(args, None)
                if value is None:
                    raise UsageError(f"{arg} needs a value: {arg}=VALUE.")
            overrides[key] = value
        else:
            rest.append(arg)
    return rest, overrides


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
    rep.add_argument("--seeds", type=int, default=3, help="seeds per experiment (default 3)")
    rep.add_argument("--quick", action="store_true", help="1 seed, a few epochs: checks directions only")
    rep.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = _split_overrides(argv)
        args = _parser().parse_args(rest)
        if args.command == "reproduce":
            if overrides:
                raise UsageError("reproduce takes no --config.* overrides; the references fix each recipe.")
            from jaxepochs import reproduce

            names = reproduce.available() if args.name == "all" else [args.name]
            failed = 0
            for name in names:
                workdir = args.workdir if len(names) == 1 else f"{args.workdir}/{name}"
                rows = reproduce.reproduce(name, workdir, seeds=args.seeds, quick=args.quick, quiet=args.quiet)
                failed += sum(not row["passed"] for row in rows)
            return 1 if failed else 0
        config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
        from jaxepochs import train  # imports jax: after the cheap checks

        train.train_and_evaluate(config, args.workdir, quiet=args.quiet, restart=args.restart)
    except (ValueError, FloatingPointError) as e:  # our errors say what to fix; no traceback needed
        print(f"jaxepochs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
