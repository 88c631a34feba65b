"""Schedules written in epochs: values pinned by hand, the rate the optimizer applies, clipping, plateaus."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxepochs.core import optim as S
from jaxepochs.host import config as config_lib


def sched_cfg(**fields):
    cfg = config_lib.schedule_config()
    cfg.update(fields)
    return cfg


def opt_cfg(name="sgd", learning_rate=1.0, momentum=0.0, schedule=None, **fields):
    cfg = config_lib.optimizer_config()
    cfg.update(dict(name=name, learning_rate=learning_rate, momentum=momentum, **fields))
    if schedule is not None:
        cfg.schedule = schedule
    return cfg


def values(schedule, steps):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(list(steps), jnp.int32)), np.float64)


def applied_rates(tx, num_steps, opt_state=None):
    """Runs `num_steps` jitted sgd (momentum 0) updates of gradient 1: each update is -(its applied rate)."""
    params = jnp.zeros(())
    opt_state = tx.init(params) if opt_state is None else opt_state

    def body(state, _):
        updates, state = tx.update(jnp.ones(()), state, params)
        return state, -updates

    opt_state, rates = jax.jit(lambda st: jax.lax.scan(body, st, None, length=num_steps))(opt_state)
    return np.asarray(rates), opt_state


def test_config_sections_have_the_documented_keys():
    s = config_lib.schedule_config()
    assert s.name == "constant" and s.warmup_epochs == 0.0 and s.decay_epochs == 0.0
    assert s.final_fraction == 0.0 and tuple(s.boundaries_epochs) == () and s.factor == 0.1
    assert (s.pct_start, s.div_factor, s.final_div_factor) == (0.3, 25.0, 1e4)
    assert {"rate_per_epoch", "patience", "cooldown", "min_learning_rate", "rtol", "atol"} <= set(s.keys())
    assert s.monitor == "val_loss"
    o = config_lib.optimizer_config()
    keys = {"name", "learning_rate", "momentum", "b1", "b2", "weight_decay", "clip_norm", "layer_decay", "schedule"}
    assert set(o.keys()) == keys
    assert o.clip_norm == 0.0 and o.schedule.name == "constant"


@pytest.mark.parametrize(
    "epochs, steps_per_epoch, steps", [(0.5, 10, 5), (0.25, 10, 3), (2.5, 4, 10), (0.3, 10, 3), (1 / 3, 3, 1)]
)
def test_epochs_to_steps_rounds_to_nearest_halves_up(epochs, steps_per_epoch, steps):
    assert S.epochs_to_steps(epochs, steps_per_epoch) == steps


def test_constant_without_and_with_fractional_warmup():
    flat = S.make_schedule(sched_cfg(), 0.3, 10, 4)
    np.testing.assert_allclose(values(flat, [0, 17, 39]), [0.3, 0.3, 0.3], rtol=1e-6)
    # 0.5 epoch at 10 steps per epoch: a 5-step ramp from 0, then constant.
    warm = S.make_schedule(sched_cfg(warmup_epochs=0.5), 0.3, 10, 4)
    np.testing.assert_allclose(values(warm, [0, 1, 4, 5, 6, 39]), [0, 0.06, 0.24, 0.3, 0.3, 0.3], rtol=1e-6)


def test_warmup_cosine_until_the_end_of_training():
    # lr 2, 10 steps/epoch, 10 epochs: warmup steps 0..10, cosine over the remaining 90 steps to 2 * 0.1.
    sched = S.make_schedule(sched_cfg(name="warmup_cosine", warmup_epochs=1.0, final_fraction=0.1), 2.0, 10, 10)
    cos = lambda t: 0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * t / 90))
    np.testing.assert_allclose(
        values(sched, [0, 5, 9, 10, 55, 99, 100]), [0, 1.0, 1.8, 2.0, 1.1, cos(89), 0.2], rtol=1e-5, atol=1e-7
    )


def test_warmup_cosine_decay_epochs_counts_from_step_zero():
    # decay_epochs=5 ends the decay at step 50 (optax's decay_steps includes the warmup); then the floor.
    cfg = sched_cfg(name="warmup_cosine", warmup_epochs=1.0, decay_epochs=5.0, final_fraction=0.1)
    sched = S.make_schedule(cfg, 2.0, 10, 10)
    np.testing.assert_allclose(values(sched, [10, 30, 50, 99]), [2.0, 1.1, 0.2, 0.2], rtol=1e-5)


def test_one_cycle_cosine_and_linear():
    # 100 steps: start 1/25, peak 1 at int(0.3 * 100) = 30, end 1/25/1e4.
    sched = S.make_schedule(sched_cfg(name="one_cycle"), 1.0, 10, 10)
    end = 0.04 / 1e4
    down = lambda t: end + (1 - end) / 2 * (math.cos(math.pi * t / 70) + 1)
    np.testing.assert_allclose(
        values(sched, [0, 15, 30, 65, 99, 100]),
        [0.04, 0.52, 1.0, down(35), down(69), end],
        rtol=1e-5,
        atol=1e-7,
    )
    lin = S.make_schedule(sched_cfg(name="one_cycle_linear"), 1.0, 10, 10)
    # optax: up to step 30, back down to 1/25 at int(0.85 * 100) = 85, then to 1/25/1e4 at 100.
    np.testing.assert_allclose(values(lin, [0, 15, 30, 85, 100]), [0.04, 0.52, 1.0, 0.04, end], rtol=1e-5)


def test_step_boundaries_at_fractional_epochs():
    # 4 steps/epoch: boundaries 2.5 and 5 epochs fall on steps 10 and 20.
    sched = S.make_schedule(sched_cfg(name="step", boundaries_epochs=(2.5, 5.0), factor=0.1), 1.0, 4, 10)
    np.testing.assert_allclose(values(sched, [0, 9, 10, 19, 20, 39]), [1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
    # A warmup ramps to the rate, and the boundaries stay at their absolute epochs.
    warm = S.make_schedule(sched_cfg(name="step", boundaries_epochs=(2.5, 5.0), warmup_epochs=1.0), 1.0, 4, 10)
    np.testing.assert_allclose(
        values(warm, [0, 2, 4, 9, 10, 19, 20, 39]), [0, 0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6
    )


def test_exponential_is_continuous_per_epoch_rate():
    sched = S.make_schedule(sched_cfg(name="exponential", rate_per_epoch=0.5), 2.0, 4, 3)
    np.testing.assert_allclose(
        values(sched, [0, 2, 4, 8, 11]), [2.0, 2 * 0.5**0.5, 1.0, 0.5, 2 * 0.5 ** (11 / 4)], rtol=1e-6
    )
    warm = S.make_schedule(sched_cfg(name="exponential", rate_per_epoch=0.5, warmup_epochs=0.5), 2.0, 4, 3)
    np.testing.assert_allclose(values(warm, [0, 1, 2, 4]), [0, 0.5**0.5, 2 * 0.5**0.5, 1.0], rtol=1e-6)


def test_reduce_on_plateau_step_part_is_constant_with_warmup():
    sched = S.make_schedule(sched_cfg(name="reduce_on_plateau", warmup_epochs=1.0), 0.5, 4, 10)
    np.testing.assert_allclose(values(sched, [0, 2, 4, 39]), [0, 0.25, 0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize(
    "schedule",
    [
        sched_cfg(warmup_epochs=0.5),
        sched_cfg(name="warmup_cosine", warmup_epochs=1.0, final_fraction=0.1),
        sched_cfg(name="one_cycle"),
        sched_cfg(name="step", boundaries_epochs=(1.5, 2.0)),
        sched_cfg(name="exponential", rate_per_epoch=0.8, warmup_epochs=0.25),
    ],
    ids=["constant", "warmup_cosine", "one_cycle", "step", "exponential"],
)
def test_update_k_applies_schedule_k_and_state_holds_the_last_steps_rate(schedule):
    lr, spe, epochs = 0.1, 4, 3
    tx = S.make_optimizer(opt_cfg(learning_rate=lr, schedule=schedule), spe, epochs)
    expected = values(S.make_schedule(schedule, lr, spe, epochs), range(spe * epochs))
    assert float(S.learning_rate_of(tx.init(jnp.zeros(())))) == pytest.approx(expected[0], abs=1e-7)
    rates, opt_state = applied_rates(tx, spe)  # one epoch, jitted as a scan
    np.testing.assert_allclose(rates, expected[:spe], rtol=1e-5, atol=1e-8)
    # After the epoch's N updates the state holds schedule(N - 1): the value at the epoch's last step.
    assert float(S.learning_rate_of(opt_state)) == pytest.approx(expected[spe - 1], rel=1e-5, abs=1e-8)
    rates, opt_state = applied_rates(tx, spe * (epochs - 1), opt_state)
    np.testing.assert_allclose(rates, expected[spe:], rtol=1e-5, atol=1e-8)
    assert float(S.learning_rate_of(opt_state)) == pytest.approx(expected[-1], rel=1e-5, abs=1e-8)


def test_clip_norm_bounds_the_update_and_keeps_the_rate_readable():
    grads = {"a": jnp.full((4,), 30.0), "b": jnp.full((3,), 40.0)}
    params = jax.tree.map(jnp.zeros_like, grads)
    norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))))
    clipped = S.make_optimizer(opt_cfg(learning_rate=1.0, clip_norm=1.0), 4, 2)
    state = clipped.init(params)
    updates, state = jax.jit(clipped.update)(grads, state, params)
    assert norm(updates) == pytest.approx(1.0, rel=1e-5)
    assert float(S.learning_rate_of(state)) == 1.0
    small = jax.tree.map(lambda g: g / 1000, grads)  # norm 0.1 < 1: untouched
    updates, _ = jax.jit(clipped.update)(small, state, params)
    assert norm(updates) == pytest.approx(norm(small), rel=1e-5)
    unclipped = S.make_optimizer(opt_cfg(learning_rate=1.0), 4, 2)
    updates, _ = jax.jit(unclipped.update)(grads, unclipped.init(params), params)
    assert norm(updates) == pytest.approx(norm(grads), rel=1e-5)


def test_momentum_and_weight_decay_are_hyperparams():
    params = jnp.zeros(3)
    sgd = S.make_optimizer(opt_cfg(name="sgd", momentum=0.8), 2, 1).init(params)
    assert float(sgd.hparams.momentum) == pytest.approx(0.8)
    adamw = S.make_optimizer(opt_cfg(name="adamw", weight_decay=0.05, clip_norm=2.0), 2, 1).init(params)
    assert float(adamw.hparams.weight_decay) == pytest.approx(0.05)
    assert float(S.learning_rate_of(adamw)) == 1.0
    adam = S.make_optimizer(opt_cfg(name="adam", learning_rate=3e-3), 2, 1).init(params)
    assert float(S.learning_rate_of(adam)) == pytest.approx(3e-3)


def test_optimizer_section_without_schedule_keys_is_a_constant_rate():
    cfg = opt_cfg(name="adam", learning_rate=0.01)
    del cfg["schedule"], cfg["clip_norm"]  # an `optimizer` section from before this module
    tx = S.make_optimizer(cfg, 5, 2)
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.ones(2), state, jnp.zeros(2))
    assert float(S.learning_rate_of(state)) == pytest.approx(0.01)
    assert S.plateau_init(cfg) is None


def test_zero_epochs_builds_every_schedule():
    for name in ("constant", "warmup_cosine", "one_cycle", "one_cycle_linear", "exponential"):
        state = S.make_optimizer(opt_cfg(schedule=sched_cfg(name=name)), 3, 0).init(jnp.zeros(()))
        assert np.isfinite(float(S.learning_rate_of(state))), name


def plateau_scales(plateau_state, values_per_epoch):
    update = jax.jit(S.plateau_update)
    scales = []
    for v in values_per_epoch:
        plateau_state = update(plateau_state, v)
        scales.append(float(plateau_state.scale))
    return scales


def plateau_opt(**fields):
    return opt_cfg(learning_rate=1.0, schedule=sched_cfg(name="reduce_on_plateau", **fields))


def test_plateau_reduces_on_the_patience_th_flat_epoch():
    # Improvements at epochs 0 and 1; flat from epoch 2. With patience 2 the 2nd flat epoch (3) halves the
    # scale, and every 2nd flat epoch after it halves it again.
    state = S.plateau_init(plateau_opt(patience=2, factor=0.5, cooldown=0))
    assert float(state.scale) == 1.0
    scales = plateau_scales(state, [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    assert scales == [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.125]


def test_plateau_cooldown_skips_epochs_after_a_reduction():
    # cooldown 1: the epoch after a reduction is ignored, so the next one comes 3 epochs later, not 2.
    state = S.plateau_init(plateau_opt(patience=2, factor=0.5, cooldown=1))
    scales = plateau_scales(state, [1.0, 0.9] + [0.9] * 8)
    assert scales == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]


def test_plateau_min_learning_rate_is_an_absolute_floor():
    cfg = plateau_opt(patience=1, factor=0.5, min_learning_rate=0.3)
    cfg.learning_rate = 2.0  # floor 0.3 is scale 0.15
    scales = plateau_scales(S.plateau_init(cfg), [1.0] * 6)
    np.testing.assert_allclose(scales, [1, 0.5, 0.25, 0.15, 0.15, 0.15], rtol=1e-6)


def test_plateau_scale_reaches_the_step_updates_without_recompiling():
    cfg = plateau_opt(patience=1, factor=0.5, warmup_epochs=0.0)
    cfg.learning_rate = 0.1
    spe = 3
    tx = S.make_optimizer(cfg, spe, 5)
    plateau = S.plateau_init(cfg)
    params = jnp.zeros(())

    def epoch(opt_state):
        def body(state, _):
            updates, state = tx.update(jnp.ones(()), state, params)
            return state, -updates

        return jax.lax.scan(body, opt_state, None, length=spe)

    opt_state = tx.init(params)
    compiled = jax.jit(epoch).lower(opt_state).compile()  # as the trainer does: once per run
    for value, rate in [(1.0, 0.1), (1.0, 0.1), (0.5, 0.05), (0.5, 0.05), (0.4, 0.025)]:
        opt_state, rates = compiled(opt_state)
        np.testing.assert_allclose(rates, [rate] * spe, rtol=1e-6)
        assert float(S.learning_rate_of(opt_state)) == pytest.approx(rate, rel=1e-6)  # the epoch's last step
        plateau = jax.jit(S.plateau_update)(plateau, value)
        opt_state = S.with_plateau_scale(opt_state, plateau)
        # The last step's rate under the new scale (a constant schedule: what the next epoch applies).
        assert float(S.learning_rate_of(opt_state, plateau)) == pytest.approx(0.1 * float(plateau.scale), rel=1e-6)


def test_with_plateau_scale_is_a_no_op_without_plateau():
    tx = S.make_optimizer(opt_cfg(), 2, 2)
    state = tx.init(jnp.zeros(()))
    assert S.with_plateau_scale(state, None) is state
    assert S.plateau_init(opt_cfg()) is None


@pytest.mark.parametrize(
    "fields, key",
    [
        (dict(name="cosine"), "optimizer.schedule.name"),
        (dict(warmup_epochs=-1.0), "optimizer.schedule.warmup_epochs"),
        (dict(warmup_epochs=11.0), "optimizer.schedule.warmup_epochs"),
        (dict(name="one_cycle", warmup_epochs=1.0), "optimizer.schedule.warmup_epochs"),
        (dict(name="step", boundaries_epochs=(5.0, 3.0)), "optimizer.schedule.boundaries_epochs"),
        (dict(name="step", boundaries_epochs=()), "optimizer.schedule.boundaries_epochs"),
        (dict(name="step", boundaries_epochs=(2.0,), factor=0.0), "optimizer.schedule.factor"),
        (dict(name="step", boundaries_epochs=(2.0,), factor=1.5), "optimizer.schedule.factor"),
        (dict(name="exponential", rate_per_epoch=0.0), "optimizer.schedule.rate_per_epoch"),
        (dict(name="exponential", rate_per_epoch=-0.5), "optimizer.schedule.rate_per_epoch"),
        (dict(name="warmup_cosine", final_fraction=1.5), "optimizer.schedule.final_fraction"),
        (dict(name="warmup_cosine", final_fraction=-0.1), "optimizer.schedule.final_fraction"),
        (dict(name="warmup_cosine", warmup_epochs=2.0, decay_epochs=1.0), "optimizer.schedule.decay_epochs"),
        (dict(name="one_cycle", pct_start=1.0), "optimizer.schedule.pct_start"),
        (dict(name="reduce_on_plateau", patience=-1), "optimizer.schedule.patience"),
        (dict(name="reduce_on_plateau", patience=0), "optimizer.schedule.patience"),
        (dict(name="reduce_on_plateau", cooldown=-1), "optimizer.schedule.cooldown"),
        (dict(name="reduce_on_plateau", factor=1.0), "optimizer.schedule.factor"),
        (dict(name="reduce_on_plateau", min_learning_rate=-1.0), "optimizer.schedule.min_learning_rate"),
        (dict(name="reduce_on_plateau", monitor="val_accuracy"), "optimizer.schedule.monitor"),
    ],
)
def test_bad_schedule_raises_naming_the_key(fields, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        S.validate_schedule(sched_cfg(**fields), 10)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        S.make_optimizer(opt_cfg(schedule=sched_cfg(**fields)), 4, 10)


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="warmup_cosine") as err:
        S.validate_schedule(sched_cfg(name="cosine"), 10)
    assert all(name in str(err.value) for name in S.SCHEDULES)


def test_other_bad_settings_raise_naming_the_key():
    with pytest.raises(ValueError, match=r"boundaries_epochs"):  # 0.1 and 0.12 epochs share step 1
        S.make_schedule(sched_cfg(name="step", boundaries_epochs=(0.1, 0.12)), 1.0, 10, 5)
    with pytest.raises(ValueError, match=r"optimizer\.name"):
        S.make_optimizer(opt_cfg(name="rmsprop"), 4, 2)
    with pytest.raises(ValueError, match=r"optimizer\.clip_norm"):
        S.make_optimizer(opt_cfg(clip_norm=-1.0), 4, 2)
    with pytest.raises(ValueError, match=r"optimizer\.learning_rate"):
        S.make_optimizer(opt_cfg(learning_rate=0.0), 4, 2)
    with pytest.raises(ValueError, match=r"min_learning_rate"):
        S.plateau_init(plateau_opt(min_learning_rate=2.0))  # above learning_rate 1.0


def test_the_built_in_optimizer_is_a_trainer_optimizer_and_its_methods_are_the_functions():
    from jaxepochs.core import schedules

    assert S.make_schedule is schedules.make_schedule and S.SCHEDULES is schedules.SCHEDULES  # one definition
    cfg = opt_cfg(name="adamw", schedule=sched_cfg(name="reduce_on_plateau", factor=0.5, patience=1))
    tx = S.make_optimizer(cfg, 2, 4)
    assert isinstance(tx, S.TrainerOptimizer) and tx.group_names == ()
    params = {"w": jnp.ones(3)}
    run_values = S.hparams_of({**cfg.to_dict(), "learning_rate": 0.05, "weight_decay": 0.2})
    state = tx.with_hparams(tx.init(params), S.OptHParams(*(jnp.float32(v) for v in run_values)))
    assert tx.hparams(state) is state.hparams and float(state.hparams.weight_decay) == pytest.approx(0.2)
    _, state = tx.update({"w": jnp.full(3, 0.5)}, state, params)
    assert tx.learning_rate(state) == S.learning_rate_of(state) == jnp.float32(0.05)
    plateau = S.plateau_update(S.plateau_update(S.plateau_init(cfg), 1.0), 1.0)  # one reduction: scale 0.5
    scaled = tx.with_plateau_scale(state, plateau.scale)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype and a.shape == b.shape, scaled, state))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), scaled, S.with_plateau_scale(state, plateau)))
    assert float(tx.learning_rate(scaled)) == pytest.approx(0.025)
