"""onnxruntime side of `cargo xtask bench quantize`: quantize one fp32 ONNX model with
onnxruntime's own tools and measure the results, printed as one JSON line.

    ort_quant.py MODEL CALIB.npz EVAL.npz SAMPLE.npz OUTDIR ITERS

- quantize_static: QDQ format, per_channel=True, MinMax, int8 weights and activations
  (QInt8/QInt8, ORT's recommended CPU setting), calibrated on every sample of CALIB.npz.
- quantize_dynamic: QInt8 weights (ORT's default op set: MatMul/Gemm/Conv/Gather...).
- accuracy on EVAL.npz (a dataset: arrays with a leading N axis; or one sample): top-1 in percent when it holds
  `labels`, else 100 x cosine of the first output to the fp32 model's, over all samples at
  once (what `kiln optimize --eval` reports).
- latency: median of ITERS runs on SAMPLE.npz, 1 thread (intra_op_num_threads=1).
"""
import json
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_dynamic, quantize_static)

model_path, calib_path, eval_path, sample_path, outdir, iters = sys.argv[1:7]
iters = int(iters)
os.makedirs(outdir, exist_ok=True)
graph_inputs = onnx.load(model_path, load_external_data=False).graph.input
inputs = [i.name for i in graph_inputs]
shapes = {i.name: i.type.tensor_type.shape.dim for i in graph_inputs}


def dataset(path):
    """Per-sample feeds of an .npz whose arrays carry a leading N axis."""
    d = dict(np.load(path))
    labels = d.pop("labels", None)
    if d[inputs[0]].ndim == len(shapes[inputs[0]]):  # one sample, not a dataset
        d = {k: v[None] for k, v in d.items()}
    n = d[inputs[0]].shape[0]
    return [{k: d[k][i] for k in inputs} for i in range(n)], labels


class Reader(CalibrationDataReader):
    """Feeds the calibration samples one by one."""

    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def outputs(sess, feeds):
    return np.stack([sess.run(None, f)[0] for f in feeds])


def latency_ms(sess, sample):
    for _ in range(3):
        sess.run(None, sample)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, sample)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


calib, _ = dataset(calib_path)
evals, labels = dataset(eval_path)
sample = {k: v for k, v in np.load(sample_path).items() if k in inputs}
fp32 = session(model_path)
ref = outputs(fp32, evals)


def measure(path, sess):
    out = outputs(sess, evals)
    row = {"size": os.path.getsize(path), "cosine": cosine(out, ref),
           "p50_ms": latency_ms(sess, sample)}
    if labels is not None:
        row["top1"] = 100.0 * float(np.mean(out.reshape(len(evals), -1).argmax(-1) == labels))
        row["accuracy"] = row["top1"]
    else:
        row["accuracy"] = 100.0 * row["cosine"]
    return row


result = {"onnxruntime": ort.__version__, "fp32": measure(model_path, fp32),
          "metric": "top1" if labels is not None else "cosine"}
static_path = os.path.join(outdir, "ort-int8-static.onnx")
dynamic_path = os.path.join(outdir, "ort-int8-dynamic.onnx")
for name, path, make in [
    ("int8-static", static_path, lambda: quantize_static(
        model_path, static_path, Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax)),
    ("int8-dynamic", dynamic_path, lambda: quantize_dynamic(
        model_path, dynamic_path, weight_type=QuantType.QInt8)),
]:
    try:
        t0 = time.perf_counter()
        make()
        quant_s = time.perf_counter() - t0
        result[name] = measure(path, session(path))
        result[name]["quantize_s"] = quant_s
    except Exception as e:  # noqa: BLE001 - report what ORT could not do, keep the others
        result[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
print(json.dumps(result))
