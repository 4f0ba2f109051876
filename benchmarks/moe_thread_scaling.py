"""Why the sparse block trails the dense FFN on CPU at some shapes: single-thread cost vs 2-thread scaling.

For the three shapes of benchmarks/moe_layer.py, forward+backward seconds of our block (default dispatch) and of the
dense FFN with the same activated width, with 1 and with 2 torch threads (same weights and inputs as moe_layer.py,
interleaved, medians). `ours_over_dense_tps` < 1 at 1 thread = extra work (routing, gather / scatter of the token
rows, smaller per-expert matmuls); a 2-thread speedup below the dense one = the parts that do not parallelise.
`weight_grad` gives, per contender, the MiB of parameter gradients one step creates and the seconds it takes to
create them fresh (torch.empty + first write, 1 thread): each step sets .grad to None, as the benchmark and
`zero_grad()` do, and a sparse block has E/k times the dense FFN's weights, so it pays more page faults for them.

    python benchmarks/moe_thread_scaling.py [--repeats 5]       # JSON to stdout
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.moe_layer import SHAPES, build, make_inputs, step  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    res = {"load_average_1_5_15min": list(os.getloadavg()), "shapes": {}}
    for shape in SHAPES:
        x, g = make_inputs(shape, torch.float32, "cpu")
        blocks = {n: build(n, shape, torch.float32, "cpu") for n in ("mose", "dense")}
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times = {n: [] for n in blocks}
            for b in blocks.values():
                step(b, x, g)  # warm-up
            for _ in range(args.repeats):
                for n, b in blocks.items():
                    t0 = time.perf_counter()
                    step(b, x, g)
                    times[n].append(time.perf_counter() - t0)
            med = {n: statistics.median(v) for n, v in times.items()}
            out[f"{threads}_thread"] = {"mose_s": round(med["mose"], 4), "dense_s": round(med["dense"], 4),
                                        "ours_over_dense_tps": round(med["dense"] / med["mose"], 3)}
        torch.set_num_threads(1)
        out["weight_grad"] = {}
        for n, b in blocks.items():
            shapes = [p.shape for p in b.parameters()]

            def fresh():
                for shp in shapes:
                    torch.empty(shp).fill_(1.0)

            fresh()
            t = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fresh()
                t.append(time.perf_counter() - t0)
            out["weight_grad"][n] = {"mib": round(sum(p.numel() for p in b.parameters()) * 4 / 2**20, 1),
                                     "fresh_s": round(statistics.median(t), 4)}
        out["speedup_1_to_2_threads"] = {n: round(out["1_thread"][f"{n}_s"] / out["2_thread"][f"{n}_s"], 2) for n in ("mose", "dense")}
        res["shapes"][",".join(map(str, shape))] = out
    return res


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
