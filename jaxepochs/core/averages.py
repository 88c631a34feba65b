"""Averages of the parameters, kept by the optimizer beside its own state: an exponential moving average
(train.ema_decay) and stochastic weight averaging (train.swa_start_epoch).

    tx = EmaOptimizer(inner, decay=0.999)          # any TrainerOptimizer (core/optim.py)
    state = tx.init(params)                         # EmaState(inner's state, ema = params, decay)
    state = with_decay(tx, state, 0.99)             # a run's own decay (a sweep's differ: one program)
    updates, state = tx.update(grads, state, params)
    tx.eval_params(state, params)                   # the average: what validation, test, the best epoch see

    tx = SwaOptimizer(inner, start_epoch=10, steps_per_epoch=57)   # the equal-weight average of epochs 10, 11, ...
    stats = recompute_stats(task, tx.eval_params(state, params), model_state, train_n, batch_size, key)
    state = state._replace(stats=stats)             # a model with BatchNorm: its statistics for the average

EMA: after each step the average moves towards the parameters the step left, ema <- decay * ema + (1 - decay) *
params, starting from the initial parameters (as Keras's `use_ema`, Flax's and timm's model EMA do: no bias
correction is needed when the average starts at the parameters). SWA (Izmailov et al. 2018, Lightning's
`StochasticWeightAveraging`): at the end of each epoch from `start_epoch` on, the parameters join an
equal-weight average (swa <- swa + (params - swa) / n); before the first, evaluation sees the trained parameters.
A model with state (BatchNorm's statistics) gets them recomputed for the average after each epoch that changed
it, as Lightning's `update_bn` does at the end: a forward pass over the training split in training mode, from
the trained statistics (flax's BatchNorm keeps its momentum, so they are its moving average over that pass, not
torch's cumulative one).

Keeping an average in the optimizer's state puts it in the run's carry: checkpoints save it, a resumed run goes
on with it bit for bit, a sweep keeps one per run, and the run program, the best epoch's parameters,
`jaxepochs.load` and the exports see it through `eval_params` (`optim.evaluation_state`) with nothing else
knowing about it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxepochs.core import optim

STATS_STREAM = 3  # fold_in tag of the recomputing pass's keys (epoch.py's streams are 0-2)


class EmaState(NamedTuple):
    inner: Any  # the wrapped optimizer's state
    ema: Any  # the parameters' moving average, shaped as the params (float32 where they are)
    decay: jax.Array  # float32 [] the run's decay: an array, so runs that differ in it share one program


class SwaState(NamedTuple):
    inner: Any  # the wrapped optimizer's state
    swa: Any  # the equal-weight average of the parameters at the epochs' ends taken so far, shaped as the params
    taken: jax.Array  # int32 [] epochs averaged (0: none yet; evaluation sees the trained parameters)
    count: jax.Array  # int32 [] optimizer steps taken (an epoch ends every steps_per_epoch)
    stats: Any = None  # the model state (BatchNorm's statistics) recomputed for `swa` (recompute_stats); or None


@dataclasses.dataclass(frozen=True, eq=False)
class _Averaging:
    """A TrainerOptimizer that is `inner` plus an average of the parameters (its state: a NamedTuple whose `inner`
    is inner's); `evaluate_average` (default) evaluates the average, else the trained parameters (the average is
    still kept and saved)."""

    inner: optim.TrainerOptimizer
    evaluate_average: bool

    @property
    def defaults(self) -> tuple[float, ...]:
        return self.inner.defaults

    @property
    def group_names(self) -> tuple[str, ...]:
        return self.inner.group_names

    @property
    def groups(self):
        return getattr(self.inner, "groups", None)

    def _trained_eval(self, state, params):
        inner_eval = getattr(self.inner, "eval_params", None)
        return params if inner_eval is None else inner_eval(state.inner, params)

    def with_hparams(self, state, hparams: optim.OptHParams, groups=None):
        return state._replace(inner=self.inner.with_hparams(state.inner, hparams, groups))

    def hparams(self, state) -> optim.OptHParams:
        return self.inner.hparams(state.inner)

    def learning_rate(self, state) -> jax.Array:
        return self.inner.learning_rate(state.inner)

    def with_plateau_scale(self, state, scale: jax.Array):
        return state._replace(inner=self.inner.with_plateau_scale(state.inner, scale))


@dataclasses.dataclass(frozen=True, eq=False)
class EmaOptimizer(_Averaging):
    decay: float = 0.999  # 0 < decay < 1: the average's weight on its past (about 1 / (1 - decay) steps); init's
    evaluate_average: bool = True

    def init(self, params) -> EmaState:
        return EmaState(self.inner.init(params), jax.tree.map(jnp.asarray, params), jnp.float32(self.decay))

    def update(self, grads, state: EmaState, params=None):
        updates, inner = self.inner.update(grads, state.inner, params)
        trained = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: (state.decay * e + (1.0 - state.decay) * p).astype(e.dtype), state.ema, trained)
        return updates, EmaState(inner, ema, state.decay)

    def eval_params(self, state: EmaState, params):
        return state.ema if self.evaluate_average else self._trained_eval(state, params)


@dataclasses.dataclass(frozen=True, eq=False)
class SwaOptimizer(_Averaging):
    start_epoch: int = 1  # the first epoch whose end joins the average
    steps_per_epoch: int = 1
    evaluate_average: bool = True
    stats_like: Any = None  # the model state's shapes (jax.ShapeDtypeStruct) where it has one: stats are kept

    def init(self, params) -> SwaState:
        zero = jnp.zeros((), jnp.int32)
        stats = (
            None if self.stats_like is None else jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.stats_like)
        )
        return SwaState(self.inner.init(params), jax.tree.map(jnp.asarray, params), zero, zero, stats)

    def update(self, grads, state: SwaState, params=None):
        updates, inner = self.inner.update(grads, state.inner, params)
        trained = optax.apply_updates(params, updates)
        count = state.count + 1
        take = (count % self.steps_per_epoch == 0) & (count // self.steps_per_epoch >= self.start_epoch)
        taken = state.taken + take.astype(jnp.int32)
        weight = 1.0 / jnp.maximum(taken, 1).astype(jnp.float32)
        swa = jax.tree.map(lambda a, p: jnp.where(take, a + (p - a) * weight, a).astype(a.dtype), state.swa, trained)
        return updates, SwaState(inner, swa, taken, count, state.stats)

    def eval_params(self, state: SwaState, params):
        if not self.evaluate_average:
            return self._trained_eval(state, params)
        trained = self._trained_eval(state, params)
        return jax.tree.map(lambda a, p: jnp.where(state.taken > 0, a, p), state.swa, trained)

    def eval_model_state(self, state: SwaState, model_state):
        """The statistics recomputed for the average, where it is evaluated and has any (else `model_state`)."""
        if not self.evaluate_average or state.stats is None:
            return model_state
        return jax.tree.map(lambda s, m: jnp.where(state.taken > 0, s, m), state.stats, model_state)


def recompute_stats(task, params, model_state, data_n, batch_size: int, key, layout=None):
    """The model state (BatchNorm's statistics) after a forward pass in training mode over the whole batches of
    `data_n` in order, from `model_state`, at `params`: the statistics of the averaged weights."""
    n = jax.tree.leaves(data_n)[0].shape[0]
    whole = max(n // batch_size, 1)
    cut = lambda a: a[: whole * batch_size].reshape(whole, min(batch_size, n), *a.shape[1:])
    batches = jax.tree.map(cut, data_n)

    def body(state, inputs):
        i, batch = inputs
        batch = batch if layout is None else layout.rows(batch)
        return task.apply(params, state, batch["x"], jax.random.fold_in(key, i), True)[1], None

    return jax.lax.scan(body, model_state, (jnp.arange(whole), batches))[0]


def keeps_stats(tx) -> bool:
    """Whether `tx` is an SWA whose evaluated average needs the model's statistics recomputed (recompute_stats)."""
    return isinstance(tx, SwaOptimizer) and tx.evaluate_average and tx.stats_like is not None


def with_recomputed_stats(tx, task, state, data_n, batch_size: int, epoch, layout=None):
    """`state` (a TrainState at the end of epoch `epoch`) whose SWA state holds the statistics recomputed for its
    average, on the epochs whose end joined it (a real branch: the epoch is the same for a sweep's runs)."""

    def recompute(opt_state):
        key = jax.random.fold_in(jax.random.fold_in(state.key, STATS_STREAM), epoch)
        params = tx.eval_params(opt_state, state.params)
        return opt_state._replace(stats=recompute_stats(task, params, state.model_state, data_n, batch_size, key,
                                                         layout))  # fmt: skip

    opt_state = jax.lax.cond(epoch >= tx.start_epoch, recompute, lambda o: o, state.opt_state)
    return state._replace(opt_state=opt_state)


def with_decay(tx, opt_state, decay: float):
    """`opt_state` with a run's own EMA decay where `tx` keeps one (any leading run axis kept); else as it is."""
    if not isinstance(tx, EmaOptimizer):
        return opt_state
    return opt_state._replace(decay=jnp.full(jnp.shape(opt_state.decay), decay, jnp.float32))
