"""Taking a trained model out: its evaluation forward pass serialised with `jax.export` (StableHLO, the batch
size symbolic), so that a process with only `jax` installed runs it:

    exported = jax.export.deserialize(open("DIR/model.jax", "rb").read())
    outputs = exported.call(x)                                   # weights inside (the default)
    outputs = exported.call(dict(np.load("DIR/weights.npz")), x)  # --weights separate

`export_model(model, out_dir, weights="inside"|"separate", format="jax"|"onnx")` writes DIR/model.jax (and
DIR/weights.npz with separate weights, the arrays by their path, "params.Dense_0.kernel"), or DIR/model.onnx
through jax2onnx (an optional extra, `pip install jaxepochs[onnx]`), checked against onnxruntime there; and
DIR/export.json: the inputs, the outputs, the run and epoch, the platforms.
"""

from __future__ import annotations

import json
import pathlib
import traceback

import jax
import numpy as np

from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import inference, report

PLATFORMS = ("cpu", "cuda", "tpu")  # lowered for each where it can be (a model's custom calls may not)
ONNX_TOLERANCE = 1e-5


class ExportError(ValueError):
    """A model that cannot be exported as asked; the message says why (the op) and what to do."""


def _where_in_user_code(error: BaseException) -> str:
    """ " at FILE:LINE in FUNCTION: CODE" of the innermost frame outside jax, flax and jaxepochs' own machinery
    (the model's line that the symbolic batch size failed in), or ""."""
    skip = ("/jax/", "/jaxlib/", "/flax/", "/jaxepochs/host/", "/jaxepochs/core/", "/contextlib.py", "/functools.py")
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not any(s in f.filename for s in skip)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _symbolic_specs(specs):
    """The inputs with a symbolic leading dimension "batch", shared by every input."""
    (batch,) = jax.export.symbolic_shape("batch")
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct((batch, *s[0]), s[1]), specs, is_leaf=inference._is_spec)


def flat_weights(weights) -> dict[str, np.ndarray]:
    """The weights by their path ("params.Dense_0.kernel"), as numpy: weights.npz's arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(weights))[0]
    return {checkpoint_lib.path_name(path): np.asarray(leaf) for path, leaf in leaves}


def _function(model: inference.SavedModel, separate: bool):
    """(the function to export, its arguments' specs, the weights by name or None)."""
    x_spec = _symbolic_specs(model.input_specs)
    if not separate:
        weights = jax.device_get(model.weights)
        return (lambda x: model.inference_fn(weights, x)), (x_spec,), None
    flat = flat_weights(model.weights)
    treedef = jax.tree.structure(model.weights)
    names = list(flat)  # in the tree's order

    def call(named, x):
        return model.inference_fn(jax.tree.unflatten(treedef, [named[name] for name in names]), x)

    w_spec = {name: jax.ShapeDtypeStruct(a.shape, a.dtype) for name, a in flat.items()}
    return call, (w_spec, x_spec), flat


def _export(fn, specs):
    """jax.export's Exported of `fn` for as many of PLATFORMS as lower (else this backend's); ExportError
    naming the op when the model cannot take a symbolic batch size."""
    try:
        return jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*specs)
    except Exception as first:  # noqa: BLE001 (retried for this platform alone: any lowering error)
        try:
            return jax.export.export(jax.jit(fn))(*specs)
        except Exception as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(
                f"the model cannot be exported with a symbolic batch size: {type(e).__name__}: {text}"
                f"{_where_in_user_code(e)}. Shape-polymorphic export needs every op to work for any batch size "
                "(no Python arithmetic or branches on x.shape[0], no reshape that fixes it)."
            ) from first


def export_model(model: inference.SavedModel, out_dir: str | pathlib.Path, weights: str = "inside",
                 format: str = "jax") -> dict:  # fmt: skip
    """Writes the model's inference function into `out_dir` (see the module's doc); returns export.json's
    contents."""
    if weights not in ("inside", "separate"):
        raise ExportError(f"weights={weights!r}: give 'inside' (in model.jax) or 'separate' (weights.npz).")
    if format not in ("jax", "onnx"):
        raise ExportError(f"format={format!r}: give 'jax' (jax.export's StableHLO) or 'onnx' (through jax2onnx).")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "run": model.name,
        "epoch": model.epoch,
        "inputs": inference.describe(model.input_specs),
        "format": format,
        "weights": weights,
    }
    if format == "onnx":
        manifest.update(_export_onnx(model, out))
    else:
        fn, specs, flat = _function(model, weights == "separate")
        exported = _export(fn, specs)
        (out / "model.jax").write_bytes(exported.serialize())
        if flat is not None:
            np.savez(out / "weights.npz", **flat)
        manifest["platforms"] = list(exported.platforms)
        manifest["outputs"] = [f"[{', '.join(map(str, o.shape))}] {o.dtype}" for o in exported.out_avals]
        manifest["call"] = "exported.call(x)" if flat is None else 'exported.call(dict(np.load("weights.npz")), x)'
    report.write_text(out / "export.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _export_onnx(model: inference.SavedModel, out: pathlib.Path) -> dict:
    """DIR/model.onnx through jax2onnx (a dynamic batch dimension), checked with onnxruntime against the
    model's own outputs on a few examples."""
    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise ExportError(
            "--format onnx needs jax2onnx (and onnxruntime to check it): pip install 'jaxepochs[onnx]'."
        ) from None
    if not inference._is_spec(model.input_specs):
        takes = inference.describe(model.input_specs)
        raise ExportError(f"--format onnx takes a model of one input array; this one takes {takes}: use --format jax.")
    shape, dtype = model.input_specs
    weights = jax.device_get(model.weights)
    spec = jax.ShapeDtypeStruct(("batch", *shape), dtype)
    try:
        proto = to_onnx(lambda x: model.inference_fn(weights, x), [spec], return_mode="proto")
    except Exception as e:
        raise ExportError(f"jax2onnx cannot convert the model: {type(e).__name__}: {str(e)[:400]}") from e
    (out / "model.onnx").write_bytes(proto.SerializeToString())
    return {"checked_with_onnxruntime": _check_onnx(out / "model.onnx", model, shape, dtype)}


def _check_onnx(path: pathlib.Path, model: inference.SavedModel, shape, dtype) -> float | None:
    """The largest difference between onnxruntime's outputs and the model's on 7 random examples (None without
    onnxruntime); ExportError beyond ONNX_TOLERANCE."""
    try:
        import onnxruntime
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, *shape)) if np.issubdtype(dtype, np.floating) else rng.integers(0, 2, (7, *shape))
    x = x.astype(dtype)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    want = model.predict(x, batch_size=7)
    diff = float(np.max(np.abs(got - want)))
    if not diff <= ONNX_TOLERANCE * max(1.0, float(np.max(np.abs(want)))):
        raise ExportError(f"{path}: onnxruntime's outputs differ from the model's by {diff:.3g}.")
    return diff
