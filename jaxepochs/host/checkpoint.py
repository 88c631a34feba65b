"""Checkpoints with orbax: everything a resumed run needs, saved asynchronously at epoch boundaries.

A checkpoint (`WORKDIR/checkpoints/<epoch>/`) holds one `CheckpointState` in two items, in one format for a
run, a streamed run (whose checkpoints inside an epoch are in `checkpoints_in_epoch/<step>/`) and a sweep's chunk:
- `arrays`: the batch's carry with its run axis (`arrays_of`): {"train": TrainState, "early_stopping": ...,
  "plateau": ..., "best_params": params}, and inside an epoch the position's {"state", "sums"};
- `meta`: JSON with the epoch, each member's rows so far, the epochs whose loss was not finite, the run's lineage
  (host/lineage.py: the run it was initialised from, the meshes it trained on), and a CRC-32 of
  each array and of the rest of the meta (`checksums`): a restore that reads other bytes than were saved is
  refused, naming the array. Checkpoints of jaxepochs 0.1 (three formats) are refused with that said.
Resuming restores them exactly; the epoch's shuffle (`fold_in(key, epoch)`) and dropout keys
(`fold_in(key, step)`) depend only on those, so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import re
import shutil
import zlib
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxepochs.core.program import RunCarry

CHECKPOINT_DIR = "checkpoints"
IN_EPOCH_DIR = "checkpoints_in_epoch"  # a streamed run's positions inside an epoch, by optimizer step
ROOM_MARGIN_BYTES = 1 << 20  # beyond the arrays and the meta: orbax's metadata files and the file system's blocks


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored; the message names it and says what to do."""


def checksums(arrays: dict, meta: dict) -> dict[str, int]:
    """A CRC-32 of every array's bytes (named by its path, as `path_name`) and of the meta's other fields: saved
    in the meta, checked on restore, so bit rot in a file that still parses is caught (orbax has no such check:
    tensorstore's zarr chunks carry none)."""
    sums = {path_name(path): zlib.crc32(np.ascontiguousarray(leaf).tobytes()) for path, leaf in _leaves(arrays)}
    sums["meta"] = zlib.crc32(json.dumps({k: v for k, v in meta.items() if k != "checksums"}, sort_keys=True).encode())
    return sums


def _leaves(arrays: dict):
    return jax.tree_util.tree_flatten_with_path(jax.device_get(arrays))[0]


def _verify(where: pathlib.Path, arrays: dict, meta: dict) -> None:
    """CheckpointError naming the first array (or the meta) whose checksum differs from the one saved."""
    saved = meta.get("checksums")
    if saved is None:  # written before checkpoints carried checksums
        return
    for name, crc in checksums(arrays, meta).items():
        if name in saved and saved[name] != crc:
            raise CheckpointError(
                f"checkpoint {where} is corrupt: {name} fails its checksum (saved {saved[name]:#010x}, read "
                f"{crc:#010x}): its files changed after they were written"
            )


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def path_name(path, sep: str = ".") -> str:
    """ "train.params.Dense_0.kernel" (or with another `sep`): orbax's metadata keys NamedTuple fields by name,
    jax by attribute."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return sep.join(parts)


def _first_mismatch(saved_metadata, expected) -> str | None:
    """The path, saved shape and expected shape of the first array that differs, or None. Every array has a
    leading run axis: the shapes are said without it (a model's), and a different number of runs on its own."""
    saved = {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(saved_metadata)[0]}
    for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
        name = path_name(path)
        if name not in saved:
            return f"{name}: missing from the checkpoint"
        got, want = tuple(getattr(saved[name], "shape", ())), tuple(leaf.shape)
        if got[1:] != want[1:]:
            return f"{name}: checkpoint has shape {got[1:]}, the model needs {want[1:]}"
        if got != want:
            return f"{name}: the checkpoint holds {got[:1]} runs, this batch {want[:1]}"
    return None


class KeepBest(NamedTuple):
    """checkpoint.keep_best: the checkpoints of a run's `k` best epochs by `monitor` (read from its rows), kept
    beside the latest max_to_keep (orbax's preservation policies: any of LatestN and BestN keeps one)."""

    k: int
    monitor: str
    higher_is_better: bool

    def policy(self, max_to_keep: int):
        sign = 1.0 if self.higher_is_better else -1.0  # BestN keeps the n highest
        best = ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: sign * metrics["value"], n=self.k, keep_checkpoints_without_metrics=False
        )
        return ocp.checkpoint_managers.AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(n=max_to_keep), best])

    def metrics(self, epoch: int, meta: dict) -> dict | None:
        """The monitor's value at `epoch` in the run's rows (None for an epoch without it: not ranked)."""
        rows = next(iter(meta["histories"].values()), [])
        value = next((row.get(self.monitor) for row in rows if row.get("epoch") == epoch), None)
        return {"value": float(value)} if value is not None and np.isfinite(value) else None


class Checkpointer:
    """Saves at epoch boundaries (asynchronously) and restores the newest good checkpoint."""

    def __init__(
        self,
        workdir: pathlib.Path,
        max_to_keep: int = 3,
        asynchronous: bool = True,
        name: str = CHECKPOINT_DIR,
        keep_best: KeepBest | None = None,
    ):
        """`name`: the directory under `workdir` (IN_EPOCH_DIR for a streamed run's checkpoints inside an epoch,
        numbered by optimizer step). `keep_best`: a run's best epochs' checkpoints too (none when its k is 0)."""
        self.directory = (pathlib.Path(workdir) / name).absolute()
        self.keep_best = keep_best if keep_best is not None and keep_best.k > 0 else None
        keeping = {"max_to_keep": max_to_keep}
        if self.keep_best:  # best_fn set too: orbax then writes each step's metrics, so a resumed run ranks them
            policy = self.keep_best.policy(max_to_keep)
            keeping = {"preservation_policy": policy, "best_fn": lambda metrics: metrics["value"]}
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=asynchronous, create=True, **keeping)
        handlers = {"arrays": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._saving: int | None = None  # the epoch of the last save started

    def epochs(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, epoch: int, arrays: dict, meta: dict) -> None:
        """Starts saving; returns once the arrays are copied off the device (the write continues). OSError when
        the disk lacks the room (checked first: orbax's writer threads fail noisily on a full disk)."""
        if epoch in self._manager.all_steps():
            return
        meta = {**meta, "checksums": checksums(arrays, meta)}
        self._check_room(epoch, arrays, meta)
        args = ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))
        ranked = {"metrics": self.keep_best.metrics(epoch, meta)} if self.keep_best else {}
        with self._as_os_error(epoch):
            self._manager.save(epoch, args=args, **ranked)
        self._saving = epoch

    def _check_room(self, epoch: int, arrays: dict, meta: dict) -> None:
        needed = sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in jax.tree.leaves(arrays))
        needed += len(json.dumps(meta)) + ROOM_MARGIN_BYTES
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"No space left for the checkpoint of epoch {epoch} ({needed / 1e6:.2f} MB needed, "
                f"{free / 1e6:.2f} MB free)",
                str(self.directory),
            )

    @contextlib.contextmanager
    def _as_os_error(self, epoch: int | None):
        """orbax's (and tensorstore's) write failures as the OSError they stand for, naming the checkpoint."""
        try:
            yield
        except OSError:
            raise
        except Exception as e:
            code = re.search(r"os_error_code='(\d+)'", str(e))
            number = int(code.group(1)) if code else errno.EIO
            what = f"the checkpoint of epoch {epoch}" if epoch else "a checkpoint"
            raise OSError(number, f"{os.strerror(number)}: {what} could not be written", str(self.directory)) from e

    def wait(self) -> None:
        with self._as_os_error(self._saving):
            self._manager.wait_until_finished()

    def restore(self, epoch: int, like: dict) -> tuple[dict, dict]:
        """Restores `epoch` into the structure of `like`; CheckpointError if it is corrupt or does not fit."""
        where = self.directory / str(epoch)
        try:
            metadata = self._manager.item_metadata(epoch)
            saved = metadata["arrays"] if metadata is not None else None
        except Exception as e:  # orbax raises many types for unreadable files
            raise CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}: {e})") from e
        if saved is not None:
            mismatch = _first_mismatch(saved, like)
            if mismatch:
                raise CheckpointError(
                    f"checkpoint {where} does not match the model: {mismatch}. It was written by a run with "
                    "another model config; use another workdir or --restart."
                )
        args = ocp.args.Composite(arrays=ocp.args.StandardRestore(_abstract(like)), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(epoch, args=args)
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} is corrupt or truncated ({type(e).__name__}: {e})") from e
        _verify(where, restored.arrays, restored.meta)
        return restored.arrays, restored.meta

    def meta(self, epoch: int) -> dict:
        """A checkpoint's meta alone (its arrays unread)."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._manager.restore(epoch, args=args).meta

    def restore_latest(self, like: dict, warn) -> tuple[int, dict, dict] | None:
        """The newest checkpoint that restores, falling back past corrupt ones (saying so); None if none."""
        errors = []
        for epoch in reversed(self.epochs()):
            try:
                arrays, meta = self.restore(epoch, like)
            except CheckpointError as e:
                if "does not match the model" in str(e):
                    raise
                errors.append(str(e))
                warn(f"{e}; falling back to the previous checkpoint.")
                continue
            for unreadable in [e for e in self.epochs() if e > epoch]:
                self._manager.delete(unreadable)  # the resumed run saves these epochs again
            return epoch, arrays, meta
        if errors:
            raise CheckpointError(
                "no checkpoint in the workdir can be restored: " + "; ".join(errors) + ". Use --restart to start over."
            )
        return None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


@contextlib.contextmanager
def opened(
    workdir: pathlib.Path,
    max_to_keep: int,
    enabled: bool = True,
    keep_best: KeepBest | None = None,
    name: str = CHECKPOINT_DIR,
):
    """A Checkpointer for the block (None when not `enabled`), closed after it, its writes finished. When the
    block raises, a failure to close (a full disk) is not allowed to hide the block's own error."""
    ckpt = Checkpointer(workdir, max_to_keep, name=name, keep_best=keep_best) if enabled else None
    try:
        yield ckpt
    except BaseException:
        if ckpt is not None:
            with contextlib.suppress(Exception):
                ckpt.close()
        raise
    if ckpt is not None:
        ckpt.close()


def arrays_of(carry) -> dict:
    """What a checkpoint holds of a RunCarry: all but `halted`, which a resumed run recomputes (a run halted by a
    non-finite loss is saved at its last good epoch, and resuming it meets the same loss again)."""
    return {
        "train": carry.state,
        "early_stopping": carry.es_state,
        "plateau": carry.plateau,
        "best_params": carry.best_params,
    }


def carry_of(arrays: dict, halted):
    """The RunCarry of a checkpoint's arrays, halted where `halted` says."""
    return RunCarry(arrays["train"], arrays["early_stopping"], arrays["plateau"], arrays["best_params"], halted)


class CheckpointState(NamedTuple):
    """What one checkpoint holds, for a run, a streamed run and a sweep's chunk alike (as Kauldron's
    CheckpointState holds the train state beside the data iterator's): the batch's carry (a leading run axis R;
    its `halted` is recomputed on restore), every member's rows, the epochs whose loss was not finite, and a
    streamed run's position inside the next epoch."""

    carry: RunCarry  # after `epoch` epochs
    histories: dict[str, list[dict]]  # member name -> its rows (metrics.jsonl's) up to `epoch`
    non_finite: dict[str, int]  # member name -> the epoch whose training loss was not finite
    epoch: int  # epochs the carry has finished
    step: int = 0  # steps of epoch + 1 done (a checkpoint inside a streamed epoch), else 0
    inside: Any = None  # with `step`: {"state": TrainState [R] after those steps, "sums": their metric sums [R]}
    lineage: dict | None = None  # host/lineage.py: the run it was initialised from, the meshes it trained on


def save_state(ckpt: Checkpointer, state: CheckpointState, key: int | None = None) -> None:
    """Starts saving `state` under `key` (its epoch; a streamed run's step inside an epoch)."""
    arrays = arrays_of(state.carry)
    if state.inside is not None:
        arrays["inside"] = state.inside
    meta = {
        "epoch": state.epoch,
        "step": state.step,
        "histories": {name: list(rows) for name, rows in state.histories.items()},  # copies: orbax writes later
        "non_finite": dict(state.non_finite),
        "lineage": state.lineage or {},
    }
    ckpt.save(state.epoch if key is None else key, arrays, meta)


def restore_state(ckpt: Checkpointer, like_carry, say, like_inside=None, key: int | None = None):
    """The newest checkpoint that restores (falling back past corrupt ones), or `key`'s, as a CheckpointState
    shaped as `like_carry` (and `like_inside` for one inside an epoch); None if there is none."""
    like = arrays_of(like_carry)
    if like_inside is not None:
        like["inside"] = like_inside
    try:
        restored = ckpt.restore_latest(like, say) if key is None else (key, *ckpt.restore(key, like))
    except CheckpointError as e:
        _refuse_old_format(ckpt, e)
        raise
    if restored is None:
        return None
    _, arrays, meta = restored
    if "histories" not in meta:
        _refuse_old_format(ckpt, None)
    halted = np.zeros(jax.tree.leaves(arrays["train"].step)[0].shape, bool)
    carry = carry_of(arrays, halted)
    return CheckpointState(carry, meta["histories"], meta["non_finite"], meta["epoch"], meta["step"],
                           arrays.get("inside"), meta.get("lineage") or {})  # fmt: skip


def _refuse_old_format(ckpt: Checkpointer, error: CheckpointError | None) -> None:
    """CheckpointError for a checkpoint of jaxepochs 0.1's formats (a run's had no run axis), which do not load."""
    for epoch in reversed(ckpt.epochs()):
        try:
            meta = ckpt.meta(epoch)
        except Exception:  # unreadable: the error already raised says so
            continue
        if "histories" not in meta:
            raise CheckpointError(
                f"checkpoint {ckpt.directory / str(epoch)} was written by an earlier jaxepochs, whose checkpoints "
                "(a run's, a streamed run's, a sweep's) had other formats; it cannot be resumed. Use --restart to "
                "train afresh in this workdir, or another workdir."
            ) from error
        return
