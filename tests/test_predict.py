"""Taking the model out (issue #31): `load_model(...).predict` is the run's own evaluation, `export` runs where
only jax is installed (and through ONNX), a sweep's member loads and predicts, and the errors say what fits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config

import jaxepochs
from jaxepochs import cli
from jaxepochs.host import hooks as hooks_lib
from jaxepochs.host import setup, warm_start


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch tiny run, a sweep of two seeds (a chunk each), and the test split."""
    root = tmp_path_factory.mktemp("predict")
    config = tiny_config({"train.epochs": "1"})
    result = jaxepochs.train_and_evaluate(config, root / "run", quiet=True)
    # Chunks of one run: the run's own program (a compilation-cache hit); r1 is in the second chunk.
    swept = jaxepochs.sweep(config, [{"seed": "1"}, {"seed": "2"}], root / "sweep", chunk=1, quiet=True)
    test = setup.load_data(config, hooks_lib.load_hooks(config), True).test
    x, y = np.asarray(test.x), np.asarray(test.y)
    np.save(root / "x.npy", x)
    return root, result.summary, swept.summaries, x, y


def _accuracy(outputs, y) -> float:
    return float(np.mean(np.argmax(outputs, -1) == y))


def test_predict_is_the_runs_own_evaluation(trained, tmp_path):
    root, summary, _, x, y = trained
    model = jaxepochs.load_model(root / "run")
    outputs = model.predict(x)  # train.eval_batch_size 1000: one batch
    assert outputs.shape == (len(x), 10) and outputs.dtype == np.float32
    assert _accuracy(outputs, y) == pytest.approx(summary["test_accuracy"], abs=1e-12)
    np.testing.assert_allclose(model.predict(x, batch_size=7), outputs, atol=1e-6)  # 143 batches, the last of 6
    loaded = jax.tree_util.tree_leaves_with_path(jaxepochs.load(root / "run"))
    for (path, a), (other, b) in zip(jax.tree_util.tree_leaves_with_path(model.state), loaded, strict=True):
        assert path == other and np.array_equal(np.asarray(a), np.asarray(b))
    assert cli.main(["predict", str(root / "run"), "--input", str(root / "x.npy"), "--out", str(tmp_path / "y.npy"),
                     "--batch-size", "300"]) == 0  # fmt: skip
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), outputs, atol=1e-6)


EXPORTED = """
import sys, numpy as np, jax
x, want = np.load(sys.argv[1]), np.load(sys.argv[2])
inside = jax.export.deserialize(open(sys.argv[3] + "/model.jax", "rb").read())
separate = jax.export.deserialize(open(sys.argv[4] + "/model.jax", "rb").read())
weights = dict(np.load(sys.argv[4] + "/weights.npz"))
for n in (1, 7):
    for got in (inside.call(x[:n]), separate.call(weights, x[:n])):
        assert np.asarray(got).shape == want[:n].shape
        np.testing.assert_allclose(np.asarray(got), want[:n], atol=1e-6, rtol=0)
assert "jaxepochs" not in sys.modules and "flax" not in sys.modules
print("ok")
"""


def test_the_export_runs_in_a_process_that_has_only_jax(trained, tmp_path):
    root, _, _, x, _ = trained
    np.save(tmp_path / "x.npy", x[:7])
    np.save(tmp_path / "want.npy", jaxepochs.load_model(root / "run").predict(x[:7]))
    for weights in ("inside", "separate"):
        argv = ["export", str(root / "run"), "--out", str(tmp_path / weights), "--weights", weights, "--epoch", "best"]
        assert cli.main(argv) == 0
    assert json.loads((tmp_path / "inside" / "export.json").read_text())["outputs"] == ["[batch, 10] float32"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    script = tmp_path / "call.py"
    script.write_text(EXPORTED)
    args = [str(tmp_path / name) for name in ("x.npy", "want.npy", "inside", "separate")]
    done = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_onnx_export_matches_under_onnxruntime(trained, tmp_path):
    pytest.importorskip("jax2onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    root, _, _, x, _ = trained
    model = jaxepochs.load_model(root / "run")
    manifest = jaxepochs.export_model(model, tmp_path, format="onnx")
    assert manifest["checked_with_onnxruntime"] is not None
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        got = session.run(None, {session.get_inputs()[0].name: x[:n]})[0]
        np.testing.assert_allclose(got, model.predict(x[:n]), atol=1e-5, rtol=0)


def test_a_sweep_member_loads_predicts_and_warm_starts(trained):
    root, _, summaries, x, y = trained
    model = jaxepochs.load_model(root / "sweep", run="r1")  # in chunks/group0_chunk1
    assert _accuracy(model.predict(x), y) == pytest.approx(summaries["r1"]["test_accuracy"], abs=1e-12)
    by_path = jaxepochs.load(root / "sweep" / "r1")  # SWEEPDIR/r1: the same member
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model.state), jax.tree.leaves(by_path), strict=True)
    )
    assert not np.array_equal(model.state.params["Dense_0"]["kernel"], jaxepochs.load(root / "sweep", run="r0")
                              .params["Dense_0"]["kernel"])  # fmt: skip
    init = tiny_config({"init.from_workdir": str(root / "sweep" / "r1")}).init
    shapes = jax.eval_shape(lambda: model.state.params)
    warm = warm_start.prepare(init, shapes, {})
    np.testing.assert_array_equal(warm.params["Dense_0/kernel"], model.state.params["Dense_0"]["kernel"])


def test_errors_say_what_fits(trained, tmp_path):
    root, _, _, x, _ = trained
    with pytest.raises(jaxepochs.WorkdirError, match="has no run 'r7'. Its runs: r0, r1."):
        jaxepochs.load_model(root / "sweep", run="r7")
    with pytest.raises(jaxepochs.WorkdirError, match="holds a sweep: name one of its runs.*r0, r1"):
        jaxepochs.load(root / "sweep")
    with pytest.raises(jaxepochs.WorkdirError, match=r"holds one run \(r0\), not 'r3'"):
        jaxepochs.load(root / "run", run="r3")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.json", "run.json"):
        (unfinished / name).write_bytes((root / "run" / name).read_bytes())
    with pytest.raises(jaxepochs.WorkdirError, match="has no finished checkpoint yet"):
        jaxepochs.load_model(unfinished)
    model = jaxepochs.load_model(root / "run")
    with pytest.raises(jaxepochs.InputError, match=r"takes inputs \[N, 40\] float32; got \[5, 39\] float32"):
        model.predict(x[:5, :39])
    with pytest.raises(jaxepochs.InputError, match=r"\[N, 40\] float32; got \[5, 40\] complex64"):
        model.predict(x[:5].astype(np.complex64))
    with pytest.raises(jaxepochs.InputError, match=r"add a leading batch axis"):
        model.predict(x[0])
    model.inference_fn = lambda weights, x_b: x_b.reshape(-1, 80)  # pairs of examples: not for every batch size
    with pytest.raises(jaxepochs.ExportError, match=r"symbolic batch size.*reshape\(-1, 80\)"):
        jaxepochs.export_model(model, tmp_path / "out")
