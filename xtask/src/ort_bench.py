"""onnxruntime side of `cargo xtask bench runtime`: one model, one thread, median latency,
cold start (session creation + first run) and peak RSS, printed as one JSON line."""
import json
import resource
import sys
import time

t_start = time.perf_counter()
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

model, sample, iters, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
feeds = dict(np.load(sample))
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
t0 = time.perf_counter()
sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
sess.run(None, feeds)
cold = (time.perf_counter() - t0) * 1e3
for _ in range(5):
    sess.run(None, feeds)
times = []
for _ in range(iters):
    t = time.perf_counter()
    sess.run(None, feeds)
    times.append((time.perf_counter() - t) * 1e3)
times.sort()
print(json.dumps({
    "p50": times[len(times) // 2],
    "min": times[0],
    "cold_start_ms": cold,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "onnxruntime": ort.__version__,
}))
