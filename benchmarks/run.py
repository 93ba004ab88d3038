#!/usr/bin/env python
"""Benchmark harness of cogvx_kernels: every available backend of each op against a baseline in one
run: the `reference` backend, or what the op's module names in `baselines()` (attention: SDPA).

    python benchmarks/run.py                              # all ops, cuda if present else cpu
    python benchmarks/run.py --op causal_conv3d --device cpu --backward \
        --json benchmarks/results/cpu-causal_conv3d.json --png benchmarks/results/cpu-causal_conv3d.png
    python benchmarks/run.py --quick                      # 1-2 shapes per op, few repeats
    python benchmarks/run.py --save                       # JSON (+PNG) under benchmarks/results/
    python benchmarks/run.py --distributed                # 1 vs W ranks per parallel plan (benchmarks/distributed.py)

For each (op, shape, backend, pass) it reports the median of timed repetitions after warm-up
(CUDA events on the GPU, perf_counter on the CPU; the backends' calls interleaved round by round,
so that a change of machine load hits them alike: _timing.py), the speedup over the baseline
(t_base / t), the achieved TFLOP/s and GB/s (minimal bytes: inputs read once, outputs written once)
and, on a known GPU, their fraction of the device's peak, plus the peak memory of one call (on the
CPU in fresh child processes: _memory.py). _report.py writes the table, JSON and PNG.

Adding an op: write `benchmarks/<op>.py` implementing `Benchmark` (benchmarks/_interface.py) and add
it to BENCHMARKS there. A model benchmark (not a registry op, e.g. `benchmarks/transformer.py`: cogvx
vs diffusers) defines `contenders(device, dtype)`, the names it times, baseline first, instead of
relying on registered backends.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
# `python benchmarks/run.py` puts benchmarks/ first on sys.path: import the op modules as the
# `benchmarks` package from the repository root instead, so that they cannot shadow anything.
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path.pop(0)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import cogvx_kernels  # noqa: E402,F401  (registers the ops)
from cogvx_kernels import _registry  # noqa: E402

from benchmarks import _interface, _memory  # noqa: E402
from benchmarks._interface import BENCHMARKS  # noqa: E402
from benchmarks._report import (DTYPE_NAMES, gpu_peak, header, load_average, shape_set,  # noqa: E402,F401 (gpu_peak: tests)
                                slug, table, whole_header, write_json, write_png)
from benchmarks._timing import budget, time_interleaved  # noqa: E402

MODES = ("forward", "forward+backward")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
TRITON_ON_CPU = ("on CPU only the Triton interpreter runs (TRITON_INTERPRET=1): a correctness tool, "
                 "not something to time")


# ---- the run ------------------------------------------------------------------------------------

def plan_backends(mod, device: torch.device, dtype: torch.dtype, only: list[str] | None):
    """(backends to time, the baseline first; [(backend, reason)] skipped).

    The baseline is the `reference` backend, unless the op's benchmark module defines
    `baselines(device, dtype)`: then those (e.g. SDPA's backends for attention) run first, the first
    of them is what speedups are measured against, and the reference only runs if the module's
    `RUN_REFERENCE` is true (an eager L×L attention does not fit at the model's sequence length)."""
    if mod.contenders:  # a model benchmark: its own contenders, not registry backends
        return list(mod.contenders(device, dtype)), []
    extra = list(mod.baselines(device, dtype)) if mod.baselines else []
    run, skipped = [], []
    for impl in _registry.implementations(mod.OP):
        if impl.backend == "reference" and extra and not mod.RUN_REFERENCE:
            continue
        if impl.backend in extra:  # a baseline of the same name measures it already (attention's sdpa on CPU)
            continue
        if only and impl.backend not in only and impl.backend != "reference":
            continue
        reason = impl.unavailable(device)
        if impl.backend == "triton" and device.type == "cpu":
            reason = TRITON_ON_CPU
        elif reason is None and dtype not in impl.dtypes:
            reason = f"does not support {DTYPE_NAMES.get(dtype, dtype)}"
        if reason is None:
            run.append(impl.backend)
        else:
            skipped.append((impl.backend, reason))
    run.sort(key=lambda b: (b != "reference", _registry.BACKEND_RANK[b]))
    return extra + run, skipped


def _max_diff(out, ref) -> float:
    """Max |out - ref| over an output tensor or a tuple of them (ops with several outputs)."""
    if isinstance(out, (tuple, list)):
        return max((_max_diff(o, r) for o, r in zip(out, ref)), default=0.0)
    return (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0


def bench_op(op: str, device: torch.device, dtype: torch.dtype, args, peak: dict | None):
    mod = _interface.load(op)
    backends, skipped = plan_backends(mod, device, dtype, args.backend)
    shapes = mod.shapes(device, args.quick, tiny=args.tiny)
    if args.shape:
        shapes = [shapes[i] for i in args.shape]
    modes = list(MODES if args.backward and not mod.INFERENCE_ONLY else MODES[:1])
    print(f"\n== {op}: {shape_set(mod, device, args.quick, args.tiny)}")
    print(f"   timing: {', '.join(backends)}")
    for backend, reason in skipped:
        print(f"   skipped {backend}: {reason}")
    rows = []
    bud = budget(device, args, mod.BUDGET)
    for shape in shapes:
        shape_rows = []
        for mode in modes:
            backward = mode == "forward+backward"
            inputs = mod.make_inputs(shape, device, dtype, backward)  # shared: no backend mutates them
            call = mod.forward_backward if backward else mod.forward
            fns = {b: (lambda b=b: call(b, inputs)) for b in backends}
            times = time_interleaved(fns, device, **bud)
            ref_out = None
            for backend in backends:
                t = times[backend]
                row = dict(op=op, shape=shape, shape_label=mod.label(shape), backend=backend, mode=mode,
                           dtype=DTYPE_NAMES[dtype], device=device.type, times_ms=t, reps=len(t),
                           warmup=bud["warmup"], median_ms=statistics.median(t), min_ms=min(t),
                           flops=mod.flops(shape, backward), bytes=mod.bytes_moved(shape, dtype, backward))
                if not backward:
                    with torch.no_grad():
                        out = fns[backend]()
                    if backend == backends[0]:
                        ref_out = out
                    row["max_abs_diff_vs_baseline"] = None if ref_out is None else _max_diff(out, ref_out)
                    del out
                if device.type == "cuda" and not args.no_memory:
                    row["peak_mem_mib"] = _memory.cuda_peak_mib(fns[backend], device)
                    row["peak_mem_method"] = "max_memory_allocated"
                shape_rows.append(row)
                print(f"   {row['shape_label']:<28} {backend:<9} {mode:<16} {row['median_ms']:10.3f} ms "
                      f"({len(t)} reps)", flush=True)
            del inputs, fns, ref_out
            gc.collect()
        if device.type == "cpu" and not args.no_memory:
            _memory.add_cpu_peaks(shape_rows, op, shape, backends, dtype, modes, model=mod.load is not None)
        for row in shape_rows:
            ref = next((r for r in shape_rows if r["backend"] == backends[0] and r["mode"] == row["mode"]), None)
            row["baseline"] = backends[0]
            t = row["median_ms"] / 1e3
            row["speedup_vs_baseline"] = ref["median_ms"] / row["median_ms"] if ref else None
            # on a loaded machine the fastest call is the better estimate of the unloaded time
            row["speedup_vs_baseline_min"] = ref["min_ms"] / row["min_ms"] if ref else None
            row["tflops"] = row["flops"] / t / 1e12
            row["gbps"] = row["bytes"] / t / 1e9
            row["frac_peak_tflops"] = row["frac_peak_gbps"] = None
            if peak is not None:
                if dtype in (torch.bfloat16, torch.float16):  # the table is the dense bf16/fp16 peak
                    row["frac_peak_tflops"] = row["tflops"] / peak["bf16_dense_tflops"]
                row["frac_peak_gbps"] = row["gbps"] / peak["hbm_gbps"]
        order = {m: i for i, m in enumerate(modes)}
        rows.extend(sorted(shape_rows, key=lambda r: (backends.index(r["backend"]), order[r["mode"]])))
    return rows, [dict(op=op, backend=b, reason=r) for b, r in skipped]


# ---- CLI ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", choices=sorted(BENCHMARKS),
                   help="op to benchmark (repeatable; default: every op with a benchmark module)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--backend", action="append", choices=[b for b in _registry.BACKENDS if b != "reference"],
                   help="only these backends (repeatable; the baseline always runs)")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--quick", action="store_true", help="1-2 shapes per op and fewer repeats")
    p.add_argument("--tiny", action="store_true", default=os.environ.get("COGVX_BENCH_TINY") == "1",
                   help="tiny shapes, for the harness's own tests (also COGVX_BENCH_TINY=1)")
    p.add_argument("--shape", action="append", type=int, metavar="I",
                   help="only the I-th shape of each op's set (repeatable; 0-based, as listed in a full run)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark=True (lets the reference's conv3d autotune)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--png", metavar="PATH", help="write a plot of the speedups (matplotlib)")
    p.add_argument("--save", action="store_true",
                   help="write JSON (and PNG) to benchmarks/results/<device-name>-<date>.json/.png "
                        "unless --json/--png are given")
    p.add_argument("--distributed", action="store_true",
                   help="multi-rank inference instead of the ops: one denoising step on 1 rank and on 2 (CPU) or all "
                        "GPUs per parallel plan, with the bytes each rank sends (benchmarks/distributed.py)")
    p.add_argument("--cli", action="store_true",
                   help="a newcomer's first command instead of the ops: `cogvx generate` with the embedded model and "
                        "its settings on one CPU thread, and --help, each a fresh process (benchmarks/cli.py)")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_whole(args, device: torch.device) -> int:
    """--distributed or --cli: a module's run() and table() with the machine header, instead of the ops."""
    from benchmarks import cli, distributed

    t0 = time.perf_counter()
    if args.distributed:
        module, result = distributed, distributed.run(device.type, tiny=args.tiny,
                                                      reps=3 if args.quick or args.tiny else 5)
    else:
        module, result = cli, cli.run(reps=2 if args.quick or args.tiny else 3)
    result["header"] = whole_header(args, device, t0)
    print(module.table(result))
    print(f"({result['header']['wall_s']} s, load average {result['header']['load_average']})")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(_memory.child(json.loads(args.memory_child))))
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if args.distributed or args.cli:
        return run_whole(args, device)

    ops = list(dict.fromkeys(args.op or BENCHMARKS))
    registered = set(_registry.ops()) | {op for op in BENCHMARKS if _interface.load(op).contenders}
    missing = [op for op in ops if op not in registered]
    for op in missing:
        print(f"skipping {op}: it is not in the cogvx_kernels registry (not implemented yet?)")
    ops = [op for op in ops if op in registered]
    for op in sorted(registered - set(BENCHMARKS)):
        print(f"note: {op} has no benchmark module (add benchmarks/{op}.py and list it in benchmarks/_interface.py)")

    shape_sets = {op: shape_set(_interface.load(op), device, args.quick, args.tiny) for op in ops}
    head = header(args, device, dtype, shape_sets)
    where = head["gpu"] or f"{head['machine']['cpu_model']}, {head['machine']['cpu_capability']}"
    print(f"cogvx_kernels benchmark: {device.type} ({where}), {head['dtype']}, "
          f"{head['machine']['torch_threads']} torch threads, torch {torch.__version__}"
          + (", QUICK" if args.quick else "") + (", TINY" if args.tiny else ""))
    if head["extension"] != "loaded":
        print(f"warning: {head['extension']}")
    if device.type == "cuda" and head["gpu_peak"] is None:
        print(f"note: no peak figures for {where}: fractions of peak are not reported")

    rows, skipped = [], []
    t0 = time.perf_counter()
    for op in ops:
        r, s = bench_op(op, device, dtype, args, head["gpu_peak"])
        rows += r
        skipped += s
    head["wall_s"] = round(time.perf_counter() - t0, 1)
    head["load_average_end"] = load_average()

    print()
    print(table(rows, gpu=device.type == "cuda"))
    for s in skipped:
        print(f"skipped {s['op']}/{s['backend']}: {s['reason']}")
    print(f"({head['wall_s']} s)")

    stem = os.path.join(ROOT, "benchmarks", "results",
                        f"{slug(where)}-{datetime.date.today().isoformat()}")
    json_path = args.json or (stem + ".json" if args.save else None)
    png_path = args.png or (stem + ".png" if args.save else None)
    data = dict(schema=1, header=head, rows=rows, skipped=skipped)
    if json_path:
        write_json(json_path, data)
        print(f"wrote {json_path}")
    if png_path:
        write_png(png_path, rows, head)
        print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
