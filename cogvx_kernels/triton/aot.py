"""Ahead-of-time compile check of the Triton kernels, without a GPU.

Every op module listed in ``OP_MODULES`` exposes ``aot_specs()``: a list of dicts

    name       unique label, e.g. "causal_conv3d_fwd_bf16_sm90"
    kernel     the @triton.jit function
    signature  {arg name: "*bf16" | "*fp32" | "i32" | "i64" | "constexpr", ...} for every argument
    constexprs {arg name: value} for the "constexpr" entries (block sizes, flags, strides of 1, ...)
    options    triton compile options, e.g. {"num_warps": 8, "num_stages": 3}
    uses_dot   whether the kernel uses tl.dot (then tensor-core instructions are required)
    arch       (optional) the SM arch (80 / 90) the config is meant for; without it, every arch
    attrs      (optional) {arg name: 16}: arguments known 16-divisible/aligned, as the JIT assumes

``compile_spec(spec, arch)`` compiles one spec for sm_<arch> with ``triton.compile`` (ptxas bundled
with triton), runs the bundled ``cuobjdump -res-usage`` on the cubin and returns registers, stack and
local (spill) bytes, shared memory and whether the PTX holds ``mma.sync`` (sm_80) / ``wgmma``
(sm_90). ``problems(result)`` says what is wrong with a result (spills, missing tensor-core MMA).

    python -m cogvx_kernels.triton.aot [--json PATH] [--arch 80 --arch 90] [--jobs N] [--filter SUBSTR]

prints a table of every spec of every op module and exits 1 if any has a problem.

TRITON_INTERPRET=1 makes @triton.jit return interpreter objects at import time, which cannot be
compiled: run this in a process without it (the command line refuses to run otherwise).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

OP_MODULES = ("cogvx_kernels.triton.causal_conv3d", "cogvx_kernels.triton.rope3d", "cogvx_kernels.triton.joint_attention")
ARCHS = (80, 90)


def _cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):  # pragma: no cover - triton wheels bundle it
        from shutil import which
        path = which("cuobjdump") or path
    return path


def _res_usage(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout

    def field(name):
        m = re.search(rf"\b{name}:(\d+)", out)
        if m is None:
            raise RuntimeError(f"cuobjdump -res-usage: no {name} in:\n{out}")
        return int(m.group(1))

    return dict(regs=field("REG"), stack_bytes=field("STACK"), local_bytes=field("LOCAL"))


def signature(kernel, pointers: dict, constexprs: dict, scalars: dict | None = None) -> dict:
    """A kernel's ASTSource signature: pointer types from `pointers`, "constexpr" for `constexprs`,
    scalar types from `scalars` (e.g. {"stride_b": "i64", "eps": "fp32"}), "i32" otherwise."""
    scalars = scalars or {}
    return {name: "constexpr" if name in constexprs else pointers.get(name) or scalars.get(name, "i32")
            for name in kernel.arg_names}


def compile_spec(spec: dict, arch: int) -> dict:
    """Compile `spec` for sm_<arch>; returns name, arch, regs, local_bytes, stack_bytes, shared_bytes,
    has_mma_sync, has_wgmma, uses_dot, num_warps, num_stages, compile_s."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = spec["kernel"]
    if not hasattr(kernel, "arg_names") or type(kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("cogvx aot: the kernels were decorated under TRITON_INTERPRET=1; "
                           "run the AOT check in a process without it")
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", int(div)]]
             for name, div in (spec.get("attrs") or {}).items()}
    src = ASTSource(fn=kernel, signature=dict(spec["signature"]), constexprs=dict(spec["constexprs"]),
                    attrs=attrs)
    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options=dict(spec["options"]))
    elapsed = time.time() - t0
    ptx = compiled.asm["ptx"]
    res = _res_usage(compiled.asm["cubin"])
    return dict(
        name=spec["name"], arch=int(arch), **res,
        shared_bytes=int(getattr(compiled.metadata, "shared", 0)),
        has_mma_sync="mma.sync" in ptx, has_wgmma="wgmma" in ptx,
        uses_dot=bool(spec.get("uses_dot", False)),
        num_warps=spec["options"].get("num_warps"), num_stages=spec["options"].get("num_stages"),
        compile_s=round(elapsed, 2),
    )


def problems(result: dict) -> list[str]:
    """What is wrong with a compile result: spills / stack use, missing tensor-core MMA."""
    out = []
    if result["local_bytes"]:
        out.append(f"LOCAL {result['local_bytes']} bytes (register spills)")
    if result["stack_bytes"]:
        out.append(f"STACK {result['stack_bytes']} bytes")
    if result["uses_dot"]:
        if result["arch"] == 90 and not result["has_wgmma"]:
            out.append("no wgmma on sm_90")
        if result["arch"] < 90 and not result["has_mma_sync"]:
            out.append(f"no mma.sync on sm_{result['arch']}")
    return out


def _compile_job(job):
    mod_name, index, arch = job
    spec = importlib.import_module(mod_name).aot_specs()[index]
    try:
        res = compile_spec(spec, arch)
        res["problems"] = problems(res)
    except Exception as e:  # noqa: BLE001 - reported in the table
        res = dict(name=spec["name"], arch=arch, error=f"{type(e).__name__}: {e}",
                   problems=[f"compile failed: {type(e).__name__}: {e}"])
    res["module"] = mod_name
    return res


def run_all(modules=OP_MODULES, archs=ARCHS, jobs: int = 1, name_filter: str | None = None) -> list[dict]:
    work = []
    for mod_name in modules:
        specs = importlib.import_module(mod_name).aot_specs()
        for index, spec in enumerate(specs):
            if name_filter and name_filter not in spec["name"]:
                continue
            spec_archs = (spec["arch"],) if spec.get("arch") is not None else tuple(archs)
            work += [(mod_name, index, a) for a in spec_archs if a in archs]
    if jobs > 1 and len(work) > 1:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        with ctx.Pool(min(jobs, len(work))) as pool:
            return pool.map(_compile_job, work, chunksize=1)
    return [_compile_job(w) for w in work]


def format_table(results: list[dict]) -> str:
    head = f"{'kernel':44s} {'arch':>5s} {'warps':>5s} {'stg':>3s} {'regs':>4s} {'local':>5s} {'stack':>5s} " \
           f"{'smem':>7s} {'mma.sync':>8s} {'wgmma':>5s} {'time':>6s}  status"
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:44s} {'sm' + str(r['arch']):>5s}  ERROR {r['error']}")
            continue
        status = "ok" if not r["problems"] else "; ".join(r["problems"])
        lines.append(
            f"{r['name']:44s} {'sm' + str(r['arch']):>5s} {r['num_warps']:>5} {r['num_stages']:>3} "
            f"{r['regs']:>4d} {r['local_bytes']:>5d} {r['stack_bytes']:>5d} {r['shared_bytes']:>7d} "
            f"{'yes' if r['has_mma_sync'] else 'no':>8s} {'yes' if r['has_wgmma'] else 'no':>5s} "
            f"{r['compile_s']:>5.1f}s  {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogvx_kernels.triton.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--arch", type=int, action="append", help="SM arch(s) to compile for (default 80, 90)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--filter", help="only specs whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("cogvx aot: unset TRITON_INTERPRET (the interpreter replaces @triton.jit at import time)",
              file=sys.stderr)
        return 2
    results = run_all(archs=tuple(args.arch or ARCHS), jobs=args.jobs, name_filter=args.filter)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = [r for r in results if r["problems"]]
    print(f"\n{len(results)} compiled, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
