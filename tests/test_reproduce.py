"""`jaxepochs reproduce`: references as data, judging against a tolerance, the quick end-to-end run."""

from __future__ import annotations

import pytest

from jaxepochs import cli, reproduce


def _history(test_accuracy_per_epoch, steps_per_epoch=40):
    return [
        {"epoch": e + 1, "steps": (e + 1) * steps_per_epoch, "test_accuracy": acc}
        for e, acc in enumerate(test_accuracy_per_epoch)
    ]


def test_every_reference_states_value_source_and_tolerance():
    names = reproduce.available()
    assert "mnist1d" in names
    for name in names:
        reference = reproduce.load_reference(name)
        assert reference["tolerance_why"] and reference["recipe"]
        for value in reference["values"]:
            assert {"experiment", "metric", "value", "unit", "measured_on", "source", "tolerance"} <= value.keys()
            assert 0 < value["tolerance"] < 0.1
        for curve in reference["curves"]:
            assert len(curve["steps"]) == len(curve["values"]) and curve["source"]


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
