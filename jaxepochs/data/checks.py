"""The checks every split passes before anything compiles: lengths, finite inputs, numeric arrays, labels that fit
the task, and every split shaped as the training split."""

from __future__ import annotations

import numpy as np

from jaxepochs.data import rows as rows_lib
from jaxepochs.data.splits import DataError, Split


def _leaves(x) -> list:
    import jax

    return [a if rows_lib.is_rows(a) else np.asarray(a) for a in jax.tree.leaves(x)]


def check_split(split: Split, num_classes: int, what: str, task: str = "classification") -> None:
    """Raises DataError for mismatched lengths, non-finite inputs, or labels that do not fit the task:
    classification needs integer class ids in [0, num_classes); regression float targets; binary 0/1 labels."""
    if task == "custom":
        return _check_custom(split, what)
    n = split.y.shape[0] if np.ndim(split.y) else 0
    for leaf in _leaves((split.x, split.extra)):
        if leaf.ndim == 0 or leaf.shape[0] != n:
            raise DataError(
                f"{what}: {leaf.shape[0] if leaf.ndim else 'no'} inputs but {n} labels; every input needs one label "
                "(each array's leading axis counts the examples)."
            )
        # Rows (a streamed split) were checked block by block as they were decoded.
        if not rows_lib.is_rows(leaf) and np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
            raise DataError(f"{what}: inputs contain NaN or inf; clean the data before training.")
    _check_labels(split.y, num_classes, what, task)


def _check_custom(split: Split, what: str) -> None:
    """A custom task's split (the module's loss_fn): every leaf of x, y and the extra keys holds the same number of
    examples and finite values; what the labels mean is the loss's business."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path({"x": split.x, "y": split.y, **(split.extra or {})})
    counts = {jax.tree_util.keystr(path): (a.shape[0] if np.ndim(a) else None) for path, a in leaves}
    if len(set(counts.values())) > 1 or None in counts.values():
        raise DataError(
            f"{what}: its arrays disagree on the number of examples ({counts}); every leaf of x, y and the other "
            "keys needs one leading example axis of the same length."
        )
    for path, leaf in leaves:
        if not rows_lib.is_rows(leaf) and np.issubdtype(np.asarray(leaf).dtype, np.floating):
            if not np.isfinite(leaf).all():
                raise DataError(f"{what}: {jax.tree_util.keystr(path)} holds NaN or inf; clean the data first.")


def _check_labels(y: np.ndarray, num_classes: int, what: str, task: str) -> None:
    integer = np.issubdtype(y.dtype, np.integer)
    if task == "classification":
        if not integer:
            raise DataError(
                f"{what}: labels are {y.dtype} values, not integer class ids; task classification would have to "
                'reinterpret them. For real-valued targets set config.task = "regression" (for 0/1 labels, '
                '"binary"); for classes, give integer labels.'
            )
        if y.ndim != 1:
            raise DataError(f"{what}: labels have shape {y.shape}; classification needs class ids of shape [N].")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(
                f"{what}: labels span [{y.min()}, {y.max()}] but the model has {num_classes} classes "
                f"(valid labels 0..{num_classes - 1}). Set model.num_classes to at least {y.max() + 1}, "
                "or fix the labels."
            )
    elif task == "regression" and integer:
        raise DataError(
            f'{what}: labels are {y.dtype}; task "regression" takes float targets. Convert them '
            '(y.astype("float32")), or set config.task = "classification" if they are class ids.'
        )
    elif task == "binary" and y.size and not np.isin(y, (0, 1)).all():
        raise DataError(f'{what}: task "binary" takes labels 0 and 1; these hold other values ({np.unique(y)[:5]}).')
    if not integer and y.size and not np.isfinite(y).all():
        raise DataError(f"{what}: labels contain NaN or inf; clean the data before training.")


def check_numeric(x, y, where: str, split: str, extra: dict | None = None) -> None:
    """DataError naming the split and the key of an array that holds no numbers (strings, objects, dates): JAX
    would refuse it deep inside the first jit, with no word of get_data."""
    import jax

    tree = {"x": x, "y": y, **(extra or {})}
    name = lambda path: path[0].key + jax.tree_util.keystr(path[1:])  # x['text'], y, weight
    leaves = [(name(path), a) for path, a in jax.tree_util.tree_leaves_with_path(tree)]
    for key, array in leaves:
        if np.asarray(array).dtype.kind not in "biuf":  # bool, signed and unsigned integers, floats
            raise DataError(
                f'{where}: split "{split}" has {key} of dtype {np.asarray(array).dtype}, which is not numeric; JAX '
                "trains on numbers only. Convert it in get_data: parse numbers (.astype(np.float32)), or encode "
                "strings and categories as integer ids."
            )


def _per_example(split: Split) -> dict[str, tuple[tuple, str]]:
    """Each input leaf's and the labels' per-example shape and dtype, by name: "x", "x['image']", "y"."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(split.x)
    out = {f"x{jax.tree_util.keystr(path)}": (tuple(np.shape(a)[1:]), str(a.dtype)) for path, a in leaves}
    labels = jax.tree_util.tree_leaves_with_path({"y": split.y, **(split.extra or {})})
    more = {path[0].key + jax.tree_util.keystr(path[1:]): (tuple(np.shape(a)[1:]), str(a.dtype))
            for path, a in labels}  # fmt: skip
    return {**out, **more}


def check_like_train(parts: dict[str, Split], where: str) -> None:
    """DataError unless every split's inputs (each leaf of x) and labels have the training split's per-example
    shapes and dtypes: the model is built for the training split's, and another split's would fail only at its
    first evaluation, with a traceback from inside the model."""
    want = _per_example(parts["train"])
    for name, split in parts.items():
        if name == "train":
            continue
        got = _per_example(split)
        if list(got) != list(want):
            raise DataError(
                f'{where}: split "{name}" has inputs {sorted(got)} but split "train" has {sorted(want)}; every split '
                "must hold the same inputs. Give each split's x the training split's structure."
            )
        for key, (shape, dtype) in got.items():
            if (shape, dtype) != want[key]:
                raise DataError(
                    f'{where}: split "{name}" has {key} of per-example shape {shape} ({dtype}), but split "train" '
                    f"has {want[key][0]} ({want[key][1]}); the model is built for the training split's. Give every "
                    f"split's {key} the same per-example shape and dtype (the leading axis counts the examples)."
                )
