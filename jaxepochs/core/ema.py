"""An exponential moving average of the parameters (train.ema_decay), kept by the optimizer beside its own state.

    tx = EmaOptimizer(inner, decay=0.999)          # any TrainerOptimizer (core/optim.py)
    state = tx.init(params)                         # EmaState(inner's state, ema = params)
    updates, state = tx.update(grads, state, params)
    tx.eval_params(state, params)                   # the average: what validation, test, the best epoch see

After each step the average moves towards the parameters the step left: ema <- decay * ema + (1 - decay) *
params, starting from the initial parameters (as Keras's `use_ema`, Flax's and timm's model EMA do: no bias
correction is needed when the average starts at the parameters). Keeping it in the optimizer's state puts it in
the run's carry: checkpoints save it, a resumed run goes on with it bit for bit, a sweep keeps one per run, and
the run program, the best epoch's parameters, `jaxepochs.load` and the exports see it through `eval_params`
(`optim.evaluation_state`) with nothing else knowing about it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxepochs.core import optim


class EmaState(NamedTuple):
    inner: Any  # the wrapped optimizer's state
    ema: Any  # the parameters' moving average, shaped as the params (float32 where they are)


@dataclasses.dataclass(frozen=True, eq=False)
class EmaOptimizer:
    """A TrainerOptimizer that is `inner` plus a moving average of the parameters; `evaluate_ema` (default)
    evaluates the average, else the trained parameters (the average is still kept and saved)."""

    inner: optim.TrainerOptimizer
    decay: float  # 0 < decay < 1: the average's weight on its past; about 1 / (1 - decay) steps remembered
    evaluate_ema: bool = True

    @property
    def defaults(self) -> tuple[float, ...]:
        return self.inner.defaults

    @property
    def group_names(self) -> tuple[str, ...]:
        return self.inner.group_names

    @property
    def groups(self):
        return getattr(self.inner, "groups", None)

    def init(self, params) -> EmaState:
        return EmaState(self.inner.init(params), jax.tree.map(jnp.asarray, params))

    def update(self, grads, state: EmaState, params=None):
        updates, inner = self.inner.update(grads, state.inner, params)
        trained = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: self.decay * e + (1.0 - self.decay) * p, state.ema, trained)
        return updates, EmaState(inner, ema)

    def eval_params(self, state: EmaState, params):
        if self.evaluate_ema:
            return state.ema
        inner_eval = getattr(self.inner, "eval_params", None)
        return params if inner_eval is None else inner_eval(state.inner, params)

    def with_hparams(self, state: EmaState, hparams: optim.OptHParams, groups=None) -> EmaState:
        return state._replace(inner=self.inner.with_hparams(state.inner, hparams, groups))

    def hparams(self, state: EmaState) -> optim.OptHParams:
        return self.inner.hparams(state.inner)

    def learning_rate(self, state: EmaState) -> jax.Array:
        return self.inner.learning_rate(state.inner)

    def with_plateau_scale(self, state: EmaState, scale: jax.Array) -> EmaState:
        return state._replace(inner=self.inner.with_plateau_scale(state.inner, scale))
