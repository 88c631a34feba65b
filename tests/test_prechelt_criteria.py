"""Prechelt's 14 criteria on recorded curves (studies/prechelt_criteria.py): the trainer's own GL/PQ/UP rules,
vmapped over runs and thresholds, stop where the definitions say, and the measures are Prechelt's."""

from __future__ import annotations

import numpy as np
import pytest

from jaxepochs.studies import prechelt_criteria as criteria


def test_the_fourteen_criteria_stop_where_their_definitions_say():
    # GL: E_opt(5) = 0.7; GL(4) = 2.86 and GL(5) = 7.14, then the curve goes on falling.
    gl_val = [1.0, 0.8, 0.7, 0.72, 0.75] + [0.6] * 15
    # UP (strips of 5): strip ends 0.9, 0.8, 0.85, 0.87 at epochs 5, 10, 15, 20 rise at 15 and 20.
    up_val = [1.0, 0.95, 0.93, 0.92, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8] + [0.85] * 5 + [0.87] * 5
    # PQ: the docstring's example of core/early_stopping.py, GL / P_5 = 0.04 at epoch 5 and 1.73 at 10.
    pq_train = [1.2, 1.1, 1.0, 0.95, 0.9, 0.89, 0.885, 0.88, 0.88, 0.88] + [0.88] * 10
    pq_val = [1.0, 0.9, 0.85, 0.87, 0.9] + [0.9] * 15
    val = np.array([gl_val, up_val, pq_val])
    train = np.array([[1.0] * 20, [1.0] * 20, pq_train])
    stops = criteria.stopping_epochs(val, train)
    assert list(stops) == ["GL1", "GL2", "GL3", "GL5", "PQ0.5", "PQ0.75", "PQ1", "PQ2", "PQ3",
                           "UP2", "UP3", "UP4", "UP6", "UP8"]  # fmt: skip
    assert [stops[c][0] for c in ("GL1", "GL2", "GL3", "GL5")] == [4, 4, 5, 5]
    assert [stops[c][1] for c in ("UP2", "UP3", "UP4")] == [20, 20, 20]  # UP2 fires at 20; the others never
    assert [stops[c][1] for c in ("GL1", "GL5")] == [11, 11]  # GL(11) = 100 * (0.85 / 0.8 - 1) = 6.25
    assert stops["PQ0.5"][2] == 10 and stops["PQ1"][2] == 10  # GL / P_5 = 1.73 at epoch 10
    assert stops["PQ2"][2] == stops["PQ3"][2] == 15  # no progress in the third strip: P_5 = 0, the quotient inf
    assert stops["GL5"][2] == 5  # GL(5) = 100 * (0.9 / 0.85 - 1) = 5.88


def test_the_measures_are_relative_to_the_fastest_criterion_and_the_best_reachable_test_error():
    val = np.array([[1.0, 0.8, 0.7, 0.72, 0.75, 0.6, 0.6, 0.6, 0.6, 0.6]])
    test = np.array([[1.0, 0.8, 0.72, 0.7, 0.8, 0.65, 0.6, 0.6, 0.6, 0.6]])
    stops = {"fast": np.array([4]), "slow": np.array([8])}
    table = criteria.measures(stops, val, test)
    # The lowest validation error is at epoch 6 (the first of the 0.6s): its test error 0.65 is the best reachable.
    assert table["fast"] == pytest.approx(
        {
            "mean_stop_epoch": 4,
            "relative_time": 1.0,
            "test_error": 0.7,
            "generalisation_loss": 0.7 / 0.65 - 1,
            "near_best_fraction": 0.0,
            "error_floor": 0.0,
        }  # fmt: skip
    )
    assert table["slow"]["relative_time"] == 2.0 and table["slow"]["generalisation_loss"] == pytest.approx(
        0.6 / 0.65 - 1
    )
    assert table["slow"]["near_best_fraction"] == 1.0
    # A classifier's best reachable test error can be 0: the relative loss divides by one test example's share.
    perfect = criteria.measures({"late": np.array([3])}, [[0.5, 0.4, 0.45]], [[0.1, 0.0, 0.05]], floor=0.05)
    assert perfect["late"]["generalisation_loss"] == pytest.approx(1.0)  # one example more wrong than the best


def test_a_run_that_diverged_is_left_out_of_the_curves():
    """A run whose loss turned non-finite stopped there, its rows with it: the study goes on without it."""
    from jaxepochs.studies import prechelt

    row = lambda v: {"val_loss": v, "train_loss": v, "test_loss": v}
    histories = {"r0": [row(1.0), row(0.5), row(0.4)], "r1": [row(1.0)], "r2": [row(2.0), row(1.5), row(1.2)]}
    val, train, test = prechelt._curves(histories, "regression")
    assert val.shape == (2, 3) and val[1, 2] == 1.2


def _measures(epoch, error, near=0.5, loss=0.1):
    return {"mean_stop_epoch": epoch, "test_error": error, "near_best_fraction": near, "generalisation_loss": loss}


def test_the_claims_are_judged_on_the_slowest_and_the_fastest_criterion_and_the_classes():
    from jaxepochs.studies import common, prechelt

    reference = common.load_reference("prechelt")
    per_problem = {
        "a": {"GL1": _measures(10.0, 0.20, near=0.6, loss=0.2), "PQ1": _measures(12.0, 0.21),
              "UP8": _measures(40.0, 0.19, near=0.4, loss=0.05)},
        "b": {"GL1": _measures(20.0, 2.00, near=0.6, loss=0.2), "PQ1": _measures(21.0, 2.1),
              "UP8": _measures(80.0, 1.94, near=0.4, loss=0.05)},
    }  # fmt: skip
    rows = prechelt.judge(reference, prechelt.pooled(per_problem), per_problem, "X: ")
    # 60 / 15 epochs; 5% and 3% better: 4% mean; GL ends near the best in 0.6 of runs, PQ in 0.5: +0.1; GL's
    # generalisation loss 20%, UP's 5%: +15 points
    assert [r["mean"] for r in rows] == pytest.approx([4.0, 4.0, 0.1, 15.0])
    assert all(r["passed"] for r in rows) and "UP8" in rows[0]["what"] and "GL1" in rows[0]["what"]
    assert all(r["what"].startswith("X: ") for r in rows)
    for problem in per_problem.values():  # barely slower and 3% worse on b; GL not the likeliest near the best,
        problem["GL1"] |= {"near_best_fraction": 0.3, "generalisation_loss": 0.01}  # and the best on average
    per_problem["a"]["UP8"]["mean_stop_epoch"] = 11.0
    per_problem["b"]["UP8"] = _measures(21.0, 2.2, near=0.4, loss=0.05)
    assert not any(r["passed"] for r in prechelt.judge(reference, prechelt.pooled(per_problem), per_problem))


def test_reproduce_prechelt_quick_end_to_end(tmp_path):
    """`jaxepochs reproduce prechelt --quick`: RPROP's full-batch sweeps of two problems (3 sizes, 1 seed, 60
    epochs) with their whole curves, the 14 criteria on them, the judged claims, report.md and the trade-off plot."""
    from jaxepochs.studies import reproduce

    rows = reproduce.reproduce("prechelt", tmp_path, quick=True, quiet=True)
    assert len(rows) == 4 and "training time" in rows[0]["what"] and "improvement" in rows[1]["what"]
    assert all(r["what"].startswith("RPROP: ") for r in rows)  # quick: the paper's condition only
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {name} |" in report for name in criteria.stopping_epochs(np.ones((1, 5)), np.ones((1, 5))))
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    lines = (tmp_path / "sweeps" / "rprop" / "cancer" / "sweep.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 60 and '"test_accuracy"' in lines[0] and '"val_loss"' in lines[0]
