"""`jaxepochs sweep`: its arguments, and the keyword arguments they make for a sweep or an Optuna search (nothing
heavy is imported).

jaxepochs sweep --config ... --workdir DIR --sweep.a.b=V1,V2 ... [--random N] [--cv K [--refit]] [--chunk C]
    [--prune sha|hyperband [--eta 3] [--min_epochs E]] [--no-compact]
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    swp = sub.add_parser(
        "sweep",
        help="train a grid of configurations in one vmapped program",
        epilog="Sweep any field: --sweep.optimizer.learning_rate=1e-3,1e-2 --sweep.seed=0,1,2 "
        "(ranges with --random N: loguniform:1e-4:1e-1, uniform:A:B, randint:A:B).",
    )
    swp.add_argument("--config", required=True, help="experiment module, e.g. experiments/mnist1d_mlp.py")
    swp.add_argument("--workdir", required=True, help="directory for sweep.jsonl, results.csv and sweep.png")
    swp.add_argument("--random", type=int, default=0, help="draw N configurations instead of the grid")
    swp.add_argument("--random-seed", type=int, default=0, help="seed of the --random draws")
    swp.add_argument("--cv", type=int, default=0, help="K-fold cross-validation of the training split")
    swp.add_argument("--refit", action="store_true", help="with --cv: retrain on all training data, report test")
    swp.add_argument("--chunk", type=int, default=0, help="most runs trained at once (0: from free memory)")
    swp.add_argument("--prune", choices=("sha", "hyperband"), default=None,
                     help="successive halving or Hyperband: at each rung the best 1/eta of the runs go on")  # fmt: skip
    swp.add_argument("--eta", type=int, default=3, help="with --prune: keep the best 1/eta at each rung (default 3)")
    swp.add_argument("--min_epochs", type=int, default=1, help="with --prune: the first rung's epoch (default 1)")
    swp.add_argument("--no-compact", dest="compact", action="store_false",
                     help="keep halted runs' lanes in the program (for measuring compaction)")  # fmt: skip
    swp.add_argument("--search", choices=("optuna",), default=None,
                     help="ask Optuna for the configurations (--sweep.* lists and ranges: its space)")  # fmt: skip
    swp.add_argument("--trials", type=int, default=0, help="with --search: how many trials in all")
    swp.add_argument("--batch", type=int, default=0, help="with --search: trials trained at once (one program)")
    swp.add_argument("--sampler", default="tpe", help="with --search: Optuna's sampler (tpe, random, cmaes, gp, ...)")
    swp.add_argument("--pruner", default="sha", help="with --search: Optuna's pruner (sha, hyperband, median, none)")
    swp.add_argument("--quiet", action="store_true", help="print nothing but errors")
    swp.add_argument("--restart", action="store_true", help="discard a sweep already in the workdir")
    return swp


def sweep_options(args) -> dict:
    """sweep.run.sweep's keyword arguments from the parsed arguments (checked: --search's belong to it)."""
    from jaxepochs.sweep import grid as sweep_lib
    from jaxepochs.sweep import prune as prune_lib

    if args.trials or args.batch or args.sampler != "tpe" or args.pruner != "sha":
        raise sweep_lib.SweepError("--trials, --batch, --sampler and --pruner belong to --search optuna; add it.")
    if args.prune is None and (args.eta != 3 or args.min_epochs != 1):
        raise prune_lib.PruneError(
            "--eta and --min_epochs set successive halving's rungs: add --prune sha (or hyperband)."
        )
    prune = prune_lib.PruneSpec(args.prune, args.eta, args.min_epochs) if args.prune else None
    return dict(cv=args.cv, refit=args.refit, chunk=args.chunk, quiet=args.quiet, restart=args.restart, prune=prune,
                compact=args.compact)  # fmt: skip


def search_options(args, specs: dict[str, str]) -> dict:
    """studies.search.search's keyword arguments from the parsed arguments (checked: a grid's do not apply)."""
    from jaxepochs.sweep import grid as sweep_lib

    if args.prune or args.random or args.cv or args.refit or args.chunk:
        raise sweep_lib.SweepError(
            "--search optuna asks Optuna for each configuration and prunes with --pruner: leave out --prune, "
            "--random, --cv, --refit and --chunk (--batch sets the trials trained at once)."
        )
    if args.trials < 1 or args.batch < 1:
        raise sweep_lib.SweepError("--search optuna needs --trials N (in all) and --batch R (trained at once).")
    if not specs:
        raise sweep_lib.SweepError("Nothing to search: give --sweep.KEY=loguniform:A:B (or a list of values).")
    return dict(trials=args.trials, batch=args.batch, sampler=args.sampler, pruner=args.pruner, eta=args.eta,
                min_epochs=args.min_epochs, seed=args.random_seed, quiet=args.quiet, restart=args.restart,
                compact=args.compact)  # fmt: skip
