"""Train the shipped window anomaly detector on NAB machine_temperature_system_failure.

The model is a Gaussian window detector: each input is a window of the last
WINDOW raw temperature readings (5-minute cadence, so one hour). The score is
the squared Mahalanobis distance of the window from the mean window of the
training data:

    score = || (x - mu) @ P ||^2      with  P @ P.T = inverse(covariance)

Training is fully unsupervised: it uses every window of the series (hop HOP)
and never looks at NAB's labels. The alert threshold is the THRESHOLD_QUANTILE
quantile of the training scores. NAB's labeled windows are used only to report
how well the flags line up, never to fit anything.

Writes, into models/nab-machine-temp/:
  model.onnx   opset-13 graph: Sub -> MatMul -> Mul -> ReduceSum, input
               "window" float32 [N, WINDOW], output "score" float32 [N, 1]
  model.toml   the package manifest, with sha256, golden pairs computed by
               onnxruntime and baseline statistics.

Run from the repository root:
  pip install -r models/training/requirements.txt
  python3 models/training/train_nab_window_detector.py
"""

import csv
import datetime as dt
import hashlib
import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "nab" / "machine_temperature_system_failure.csv"
LABELS = ROOT / "data" / "nab" / "anomaly_windows.json"
OUT = ROOT / "models" / "nab-machine-temp"
WINDOW = 12
HOP = 6
THRESHOLD_QUANTILE = 0.99
RIDGE = 1e-6
VERSION = "1.0.0"


def load():
    with open(DATA) as f:
        rows = list(csv.reader(f))[1:]
    ts = np.array([dt.datetime.strptime(r[0], "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp() for r in rows])
    values = np.array([float(r[1]) for r in rows])
    return ts, values


def windows(values):
    ends = np.arange(WINDOW - 1, len(values), HOP)
    return ends, np.stack([values[i - WINDOW + 1 : i + 1] for i in ends])


def build_graph(mu, p):
    x = helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", WINDOW])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])
    inits = [
        numpy_helper.from_array(mu.astype(np.float32).reshape(1, WINDOW), "mu"),
        numpy_helper.from_array(p.astype(np.float32), "whiten"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Sub", ["window", "mu"], ["centered"]),
        helper.make_node("MatMul", ["centered", "whiten"], ["white"]),
        helper.make_node("Mul", ["white", "white"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axes"], ["score"], keepdims=1),
    ]
    graph = helper.make_graph(nodes, "nab_window_detector", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edge-ml train_nab_window_detector.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main():
    ts, values = load()
    ends, x = windows(values)
    mu = x.mean(axis=0)
    cov = np.cov((x - mu).T) + RIDGE * np.eye(WINDOW)
    p = np.linalg.cholesky(np.linalg.inv(cov))
    model = build_graph(mu, p)
    onnx_bytes = model.SerializeToString()
    (OUT / "model.onnx").write_bytes(onnx_bytes)
    sha = hashlib.sha256(onnx_bytes).hexdigest()

    sess = ort.InferenceSession(onnx_bytes)
    scores = sess.run(None, {"window": x.astype(np.float32)})[0][:, 0]
    threshold = float(np.quantile(scores, THRESHOLD_QUANTILE))
    flags = scores > threshold

    with open(LABELS) as f:
        labels = json.load(f)["realKnownCause/machine_temperature_system_failure.csv"]
    parse = lambda s: dt.datetime.strptime(s[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp()
    spans = [(parse(a), parse(b)) for a, b in labels]
    end_ts = ts[ends]
    inside = np.zeros(len(ends), bool)
    for a, b in spans:
        inside |= (end_ts >= a) & (end_ts <= b)
    detected = sum(bool(np.any(flags & (end_ts >= a) & (end_ts <= b))) for a, b in spans)
    print(f"windows={len(ends)} threshold={threshold:.3f} flagged={int(flags.sum())} "
          f"in_labeled={int((flags & inside).sum())} outside={int((flags & ~inside).sum())} "
          f"labeled_windows_detected={detected}/{len(spans)}")

    # Golden pairs: one typical window, the highest-scoring window, and a constant window.
    picks = [int(np.argmin(np.abs(scores - np.median(scores)))), int(np.argmax(scores))]
    golden_inputs = [x[i] for i in picks] + [np.full(WINDOW, float(np.round(mu.mean(), 3)))]
    golden_inputs = [np.round(g.astype(np.float64), 6).astype(np.float32) for g in golden_inputs]
    golden = [(g, float(sess.run(None, {"window": g.reshape(1, WINDOW)})[0][0, 0])) for g in golden_inputs]

    fmt = lambda arr: "[" + ", ".join(f"{float(a):.6f}" for a in arr) + "]"
    lines = [
        "# Model package manifest (docs/model-package.md). Generated by",
        "# models/training/train_nab_window_detector.py; do not edit by hand.",
        'name = "nab-machine-temp"',
        f'version = "{VERSION}"',
        f'sha256 = "{sha}"',
        'description = "Gaussian window detector (squared Mahalanobis distance) trained unsupervised on NAB machine_temperature_system_failure"',
        "",
        "[input]",
        'tensor = "window"',
        f"window = {WINDOW}",
        f"hop = {HOP}",
        "batch_size = 1",
        # The series has one backwards clock jump; windows are cut in file order.
        'late_policy = "accept"',
        'nan_policy = "skip"',
        "",
        "[[input.features]]",
        'stream = "temperature"',
        'field = "value"',
        'transform = "raw"',
        "",
        "[output]",
        'tensor = "score"',
        'kind = "anomaly_score"',
        f"threshold = {threshold:.6f}",
        "",
        "[baseline]",
        f"score_p50 = {float(np.quantile(scores, 0.5)):.6f}",
        f"score_p99 = {threshold:.6f}",
        "",
        "[[baseline.features]]",
        'stream = "temperature"',
        'field = "value"',
        f"mean = {float(x.mean()):.6f}",
        f"std = {float(x.std()):.6f}",
        f"min = {float(x.min()):.6f}",
        f"max = {float(x.max()):.6f}",
        "",
    ]
    for g, s in golden:
        lines += ["[[golden]]", f"input = {fmt(g)}", f"score = {s:.6f}", ""]
    (OUT / "model.toml").write_text("\n".join(lines))
    print(f"wrote {OUT/'model.onnx'} sha256={sha}")


if __name__ == "__main__":
    main()
