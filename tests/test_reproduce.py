"""`jaxepochs reproduce`: references as data, judging against a tolerance, the quick end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TIMED

from jaxepochs import cli
from jaxepochs.studies import common, reproduce


def _history(test_accuracy_per_epoch, steps_per_epoch=40):
    return [
        {"epoch": e + 1, "steps": (e + 1) * steps_per_epoch, "test_accuracy": acc}
        for e, acc in enumerate(test_accuracy_per_epoch)
    ]


def test_every_reference_states_value_source_and_tolerance():
    names = common.available()
    assert {"mnist1d", "double-descent", "grokking"} <= set(names)
    for name in names:
        reference = common.load_reference(name)
        assert reference["tolerance_why"] and reference["recipe"]
        values = reference.get("values", []) + [
            p for run in reference.get("runs", []) for p in run.get("published", [])
        ]
        assert values
        for value in values:
            assert {"metric", "value", "unit", "measured_on", "source"} <= value.keys()
            assert "tolerance" in value or value["low"] <= value["value"] <= value["high"]
            assert value.get("tolerance", 0.05) < 0.1
        for curve in reference.get("curves", []):
            xs = curve.get("steps", curve.get("widths"))
            assert len(xs) == len(curve["values"]) and curve["source"]
        if "rerun" in reference:  # a rerun of the published code covers every judged experiment and step
            rerun = common.load_rerun(reference)
            assert reference["rerun"]["label"] and reference["rerun"]["why"] and rerun["command"]
            for curve in reference["curves"]:
                for step in curve["steps"]:
                    assert len(reproduce._rerun_at(rerun, curve["experiment"], step)) >= 3
        for experiment in {v.get("experiment", reference.get("experiment")) for v in values} - {None}:
            assert common.experiment_module(experiment).is_file()


def test_judge_passes_within_tolerance_and_fails_outside():
    reference = {
        "values": [
            {"experiment": "a", "label": "A", "metric": "test_accuracy", "value": 0.50, "tolerance": 0.03},
            {"experiment": "b", "label": "B", "metric": "test_accuracy", "value": 0.50, "tolerance": 0.03},
        ],
        "curves": [
            {
                "experiment": "a",
                "metric": "test_accuracy",
                "steps": [80, 120],
                "values": [0.30, 0.49],
                "tolerance": 0.03,
            }
        ],
    }
    histories = {
        "a": [_history([0.1, 0.31, 0.48]), _history([0.1, 0.33, 0.50])],  # final mean 0.49: within 0.03
        "b": [_history([0.1, 0.2, 0.45]), _history([0.1, 0.2, 0.45])],  # final 0.45: 0.05 below
    }
    rows = reproduce.judge(reference, histories, quick=False)
    assert [r["passed"] for r in rows] == [True, False, True, True]
    assert rows[0]["mean"] == pytest.approx(0.49) and rows[0]["std"] == pytest.approx(0.01)
    assert rows[1]["difference"] == pytest.approx(-0.05)
    assert rows[2]["mean"] == pytest.approx(0.32)  # the value logged at step 80 (end of epoch 2)


def test_a_result_published_twice_is_judged_against_the_range():
    value = {"experiment": "a", "label": "A", "metric": "test_accuracy", "value": 0.68, "tolerance": 0.03}
    value["also_published"] = {"value": 0.651, "source": "notebook"}
    reference = {"values": [value], "curves": []}

    def judged(final):
        return reproduce.judge(reference, {"a": [_history([0.1, 0.2, final])]}, quick=False)[0]

    inside = judged(0.66)
    assert inside["passed"] and inside["difference"] == 0.0 and inside["published"] == (0.651, 0.68)
    below = judged(0.62)  # 0.031 under the lower end
    assert not below["passed"] and below["difference"] == pytest.approx(-0.031)
    assert judged(0.705)["passed"] and not judged(0.72)["passed"]  # 0.025 and 0.04 above the upper end


def test_a_rerun_of_the_published_code_is_shown_and_judged_by_the_same_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "REFERENCES", tmp_path)
    (tmp_path / "reruns").mkdir()
    rerun_curves = {"a": {"0": {"80": 0.26, "120": 0.46}, "1": {"80": 0.28, "120": 0.47}}}  # means 0.27, 0.465
    (tmp_path / "reruns" / "a.json").write_text(json.dumps({"curves": rerun_curves}))
    reference = {
        "title": "t",
        "recipe": "r",
        "rerun": {"file": "reruns/a.json", "label": "PyTorch rerun", "why": "Why."},
        "values": [{"experiment": "a", "label": "A", "metric": "test_accuracy", "value": 0.49, "tolerance": 0.03}],
        "curves": [
            {"experiment": "a", "metric": "test_accuracy", "steps": [40, 80], "values": [0.2, 0.295], "tolerance": 0.03}
        ],
    }
    histories = {"a": [_history([0.2, 0.31, 0.48]), _history([0.2, 0.33, 0.50])]}
    final, at_40, at_80 = reproduce.judge(reference, histories, quick=False)
    # The final is the rerun's last logged step (120): 0.465 is 0.025 under 0.49, so it passes, as ours (0.49).
    assert final["rerun_mean"] == pytest.approx(0.465) and final["rerun_std"] == pytest.approx(0.005)
    assert final["rerun_passed"] and final["passed"]
    assert "rerun_mean" not in at_40  # the rerun logged no step 40
    assert at_80["rerun_mean"] == pytest.approx(0.27) and at_80["rerun_passed"]  # 0.025 under 0.295
    histories_far = {"a": [_history([0.2, 0.31, 0.48])]}
    reference["curves"][0]["values"] = [0.2, 0.32]  # the rerun's 0.27 is now 0.05 under: it fails, ours passes
    rows = reproduce.judge(reference, histories_far, quick=False)
    assert rows[2]["passed"] and not rows[2]["rerun_passed"]
    common.write_report(tmp_path / "report.md", reference, rows, seeds=1, quick=False)
    report = (tmp_path / "report.md").read_text()
    assert "| PyTorch rerun (mean ± std) | ours - rerun | rerun's verdict |" in report
    assert "| 0.270 ± 0.010 | +0.040 | FAIL |" in report
    assert "PyTorch rerun, judged by the same rule: 1 of 2 pass. Ours against it: the largest difference" in report
    assert "of the means is +0.040 (a test_accuracy @ 80 steps). Why." in report
    reproduce.plot(tmp_path / "curves.png", {**reference, "name": "t"}, histories_far)
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_quick_judges_the_ordering():
    reference = {"quick_order": ["cnn", "mlp", "logreg"], "values": [], "curves": []}
    good = {"cnn": [_history([0.9])], "mlp": [_history([0.6])], "logreg": [_history([0.3])]}
    assert all(r["passed"] for r in reproduce.judge(reference, good, quick=True))
    swapped = {**good, "mlp": [_history([0.2])]}
    assert [r["passed"] for r in reproduce.judge(reference, swapped, quick=True)] == [True, False]


def test_unknown_reference_lists_the_available_ones(tmp_path, capsys):
    assert cli.main(["reproduce", "no-such-result", "--workdir", str(tmp_path)]) == 2
    assert "Available: " in capsys.readouterr().err


def test_reproduce_mnist1d_quick_end_to_end(tmp_path):
    assert cli.main(["reproduce", "mnist1d", "--quick", "--quiet", "--workdir", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "mnist1d_cnn > mnist1d_mlp" in report and "mnist1d_mlp > mnist1d_logreg" in report
    assert "FAIL" not in report and "2 of 2 pass" in report
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    histories = sorted(p.name for p in (tmp_path / "histories").iterdir())
    assert histories == ["mnist1d_cnn_seed0.jsonl", "mnist1d_logreg_seed0.jsonl", "mnist1d_mlp_seed0.jsonl"]
    rows = (tmp_path / "histories" / "mnist1d_cnn_seed0.jsonl").read_text().splitlines()
    assert len(rows) == reproduce.QUICK["epochs"] and '"test_accuracy"' in rows[0]


def test_double_descent_judges_the_points_and_the_peak():
    from jaxepochs.studies import double_descent

    reference = common.load_reference("double-descent")
    finals = {}
    for condition, curve in ((c["condition"], c) for c in reference["curves"]):
        for width, value in zip(curve["widths"], curve["values"], strict=True):
            finals[f"{condition}_h{width}"] = np.array([value + 0.01, value - 0.01])  # published, +-1 point
    rows = double_descent.judge(reference, finals, quick=False)
    assert len(rows) == len(reference["values"]) + 2 and all(r["passed"] for r in rows)
    finals["noisy_h47"] = finals["noisy_h47"] + 0.05  # 5 points off: outside the 3-point tolerance
    finals["noisy_h300"] = np.array([0.60, 0.60])  # the far end above the peak: no double descent
    failed = [r["what"] for r in double_descent.judge(reference, finals, quick=False) if not r["passed"]]
    assert len(failed) == 3 and any("h=47" in w for w in failed) and any("above h=300" in w for w in failed)


def _grok_history(train_acc, test_acc, test_loss):
    return [
        {"epoch": e + 1, "train_accuracy": a, "test_accuracy": b, "test_loss": c}
        for e, (a, b, c) in enumerate(zip(train_acc, test_acc, test_loss, strict=True))
    ]


def test_grokking_finds_the_delay_and_replays_early_stopping():
    from jaxepochs.studies import grokking

    n = 60
    train = [min(1.0, 0.1 * e) for e in range(1, n + 1)]  # 100% from epoch 10
    test = [0.01] * 40 + [1.0] * (n - 40)  # 100% from epoch 41: 4.1x later
    loss = [4.0 - 0.1 * e for e in range(5)] + [5.0] * 35 + [0.01] * (n - 40)  # best at epoch 5, then rises
    history = _grok_history(train, test, loss)
    assert grokking.first_epoch_at(history, "train_accuracy", 0.99) == 10
    assert grokking.first_epoch_at(history, "test_accuracy", 0.99) == 41
    assert grokking.first_epoch_at(history[:30], "test_accuracy", 0.99) is None
    replay = grokking.early_stop_replay(history, patience=10)
    assert replay["stopped"] and replay["best_epoch"] == 5 and replay["stop_epoch"] == 15
    assert replay["test_accuracy_kept"] == 0.01 and replay["test_accuracy_final"] == 1.0
    reference = {
        "threshold": 0.99,
        "min_delay_ratio": 4,
        "early_stopping_patience": 10,
        "early_stopping_why": "",
        "runs": [{"id": "r", "published": []}],
    }
    rows, lines = grokking.judge(reference, {"r": [history]}, quick=False)
    assert [r["passed"] for r in rows] == [True] and rows[0]["mean"] == pytest.approx(4.1)
    assert any("| r | 0 | 10 | 41 | 15 | 5 | 0.010 | 1.000 |" in line for line in lines)
    rows, _ = grokking.judge({**reference, "min_delay_ratio": 5}, {"r": [history]}, quick=False)
    assert [r["passed"] for r in rows] == [False]


@pytest.mark.reproduction
def test_reproduce_double_descent_quick_end_to_end(tmp_path):
    assert cli.main(["reproduce", "double-descent", "--quick", "--quiet", "--workdir", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "FAIL" not in report and "3 of 3 pass" in report and "early stopping" in report
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.reproduction
def test_reproduce_grokking_quick_end_to_end(tmp_path):
    assert cli.main(["reproduce", "grokking", "--quick", "--quiet", "--workdir", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "FAIL" not in report and "1 of 1 pass" in report and "grokking_small" in report
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.xla_defaults  # bit-equality of programs of other shapes: XLA keeps it for its defaults
def test_vmapped_seeds_equal_the_sequential_runs_and_feed_the_reports(tmp_path):
    """A sweep member is the run program on a batch of runs: its rows and summary equal its solo run's exactly;
    and the double-descent report reads either (`--vmap` with 2+ seeds raised AttributeError: no summary)."""
    from jaxepochs.studies import double_descent

    # mesh.data = 1: each solo run on one device, as each sweep member runs.
    overrides = {"train.log_test": "True", "train.epochs": "3", "early_stopping.enabled": "True", "mesh.data": "1"}
    solo = common.run_seeds("lr", "mnist1d_logreg", overrides, tmp_path / "solo", 2, quiet=True)
    swept = common.run_seeds("lr", "mnist1d_logreg", overrides, tmp_path / "swept", 2, quiet=True, vmap=True)
    assert (tmp_path / "swept" / "histories" / "lr_seed1.jsonl").exists()
    assert not (tmp_path / "swept" / "runs").exists()  # one sweep, not a run per seed
    untimed = lambda rows: [{k: v for k, v in row.items() if k not in TIMED} for row in rows]
    for a, b in zip(solo, swept, strict=True):
        assert [row["epoch"] for row in a.history] == [1, 2, 3]
        assert untimed(a.history) == untimed(b.history)
        for key in ("best_epoch", "stopped_epoch", "stop_reason", "epochs_completed", "test_accuracy", "test_loss"):
            assert a.summary[key] == b.summary[key], key
    reference = {"early_stopping": {"why": "a test"}}
    for runs in (solo, swept):
        lines, rows = double_descent.early_stopping_lines(reference, {3: solo}, {3: runs}, epochs=3)
        assert len(rows) == 1 and lines[-1].startswith("| 3 |")
