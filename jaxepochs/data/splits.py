"""A dataset's parts as the trainer holds them: splits of inputs and labels, and the error bad data raises."""

from __future__ import annotations

import difflib
import re
from typing import NamedTuple

import numpy as np

from jaxepochs.data import rows as rows_lib


class Split(NamedTuple):
    x: object  # the inputs: an array [N, ...] (float32, or int32 tokens), or a pytree of them
    y: np.ndarray  # the labels [N, ...]: int32 class ids, or float32 targets (task custom: any pytree of arrays)
    extra: dict | None = None  # more per-example arrays of the batch beside "x" and "y" ("weight", "mask"), or None


def count(split: Split) -> int:
    import jax

    return int(jax.tree.leaves(split.y)[0].shape[0])


def take(split: Split, idx) -> Split:
    """The examples `idx` of a split (its inputs may be a pytree)."""
    import jax

    pick = lambda a: a.take(idx) if rows_lib.is_rows(a) else np.asarray(a)[idx]
    extra = None if split.extra is None else jax.tree.map(pick, split.extra)
    return Split(jax.tree.map(pick, split.x), jax.tree.map(pick, split.y), extra)


def as_batch(split: Split, array) -> dict:
    """A split's arrays as the trainer's batch: {"x": ..., "y": ..., and its extra keys}, each leaf `array(a)`."""
    import jax

    batch = {"x": jax.tree.map(array, split.x), "y": jax.tree.map(array, split.y)}
    return batch if split.extra is None else {**batch, **jax.tree.map(array, split.extra)}


class Dataset(NamedTuple):
    name: str
    train: Split
    val: Split  # N may be 0 when data.validation_fraction is 0
    test: Split
    num_classes: int  # classification: the classes; regression and binary: the outputs per example
    streamed: bool = False  # the splits' inputs are Rows, read a chunk at a time (data/rows.py)
    evals: dict = {}  # more evaluation sets by name (get_data's other splits, data.eval_splits): never mutated


# An evaluation set's name prefixes its rows' fields (<name>_loss): a word of its own, apart from the built-in
# splits' and the rows' other fields.
EVAL_NAME = re.compile(r"^[a-z][a-z0-9]*$")
RESERVED_NAMES = ("train", "val", "test", "validation", "final", "learning", "examples", "input", "peak", "steps")


def check_eval_name(name: str, where: str) -> None:
    """DataError unless `name` can name an evaluation set (its rows' prefix)."""
    if difflib.get_close_matches(name, ["validation"], n=1, cutoff=0.6):
        raise DataError(
            f'{where}: the split "{name}" reads as a misspelt "validation"; name the validation split "validation", '
            "or give an evaluation set a name of its own."
        )
    if not EVAL_NAME.match(name) or name in RESERVED_NAMES:
        raise DataError(
            f'{where}: the evaluation set "{name}" needs a name of lowercase letters and digits (no "_": it '
            f'prefixes the rows\' fields, <name>_loss), other than {", ".join(RESERVED_NAMES)}; e.g. "shifted".'
        )


class DataError(ValueError):
    """Data that cannot be trained on; the message says what is wrong and how to fix it."""


def fold_indices(num_train: int, cv: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of `fold`: a seeded permutation cut into K folds of N // K; the N mod K left over
    always train, so every fold has the same shapes (one program for all folds)."""
    order = np.random.default_rng(seed).permutation(num_train)
    size = num_train // cv
    val = np.sort(order[fold * size : (fold + 1) * size])
    train = np.sort(np.concatenate([order[: fold * size], order[(fold + 1) * size :]]))
    return train, val


def eval_splits(entries, dataset: str, available) -> list[tuple[str, str]]:
    """data.eval_splits' (name, TFDS split) pairs: "name=split" or "split" (then named as it is); DataError naming
    the fix for a bad name or a split the dataset lacks."""
    pairs = []
    for entry in entries:
        name, eq, source = str(entry).partition("=")
        name, source = name.strip(), (source if eq else name).strip()
        check_eval_name(name, f"data.eval_splits entry {entry!r}")
        if source not in available:
            raise DataError(
                f"data.eval_splits entry {entry!r}: dataset {dataset} has no split {source!r}; its splits are "
                f"{sorted(available)} (whole splits: TFDS's slices are not read here)."
            )
        pairs.append((name, source))
    if len({name for name, _ in pairs}) < len(pairs):
        raise DataError(f"data.eval_splits {tuple(entries)} names an evaluation set twice; give each its own name.")
    return pairs
