#!/usr/bin/env python3
"""Compile-only check of the CUDA kernels: no GPU needed, only nvcc.

Compiles every csrc/cuda/*.cu with nvcc (device code only: one `-fatbin` nvcc process per file and
arch, run concurrently), with the flags a torch extension build uses, and checks per kernel and arch:

* ptxas `-v`: registers, stack frame (local memory), spill stores/loads;
* SASS (`cuobjdump -sass`): the tensor-core kernels (TENSOR_CORE_KERNELS below) contain HMMA.

Prints a table, optionally writes JSON, and exits non-zero on any spill, any local memory (stack
frame), more than 255 registers, a tensor-core kernel without HMMA, or a compile error.

    scripts/check_cuda_build.py [--arch 80 90] [--json PATH] [--files csrc/cuda/x.cu ...]

nvcc is taken from $CUDA_HOME/bin (or $CUDA_PATH), else from PATH (resolving a wrapper script via
`nvcc --dryrun`).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernels (regex on the demangled name) that must run on tensor cores, i.e. contain HMMA in SASS.
TENSOR_CORE_KERNELS = [
    r"causal_conv3d_(fwd|dgrad|wgrad)_kernel<c10::(Half|BFloat16)>",
    r"joint_attention_(fwd|bwd_dkdv|bwd_dq)_kernel<c10::(Half|BFloat16)",
]

# Flags torch.utils.cpp_extension adds to every nvcc compile (COMMON_NVCC_FLAGS), plus setup.py's.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
SETUP_NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:  # the nvcc on PATH may be a wrapper: ask nvcc where its toolkit is
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if "TOP=" in line:
                top = os.path.realpath(line.split("TOP=", 1)[1].strip())
                if os.path.exists(os.path.join(top, "bin", "nvcc")):
                    return top
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def torch_include_dirs(cuda_home: str) -> tuple[list[str], int]:
    """torch's include dirs (CUDA flavour) and its _GLIBCXX_USE_CXX11_ABI value."""
    os.environ.setdefault("CUDA_HOME", cuda_home)
    import torch
    from torch.utils import cpp_extension
    import inspect

    params = inspect.signature(cpp_extension.include_paths).parameters
    if "device_type" in params:
        dirs = cpp_extension.include_paths(device_type="cuda")
    elif "cuda" in params:
        dirs = cpp_extension.include_paths(cuda=True)
    else:
        dirs = cpp_extension.include_paths()
    # torch derives the CUDA include dir from the CUDA_HOME it saw at import; use ours.
    dirs = [d for d in dirs if not (d.endswith(os.sep + "include") and
                                    os.path.exists(os.path.join(os.path.dirname(d), "bin", "nvcc")) and
                                    os.path.realpath(os.path.dirname(d)) != os.path.realpath(cuda_home))]
    dirs.append(os.path.join(cuda_home, "include"))
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    return dirs, abi


def wheel_cuda_include_dirs() -> list[str]:
    """Headers of the pip CUDA wheels (nvidia/cu13/include, ...) that torch's headers expect."""
    dirs = []
    for site in sys.path:
        if not site or not os.path.isdir(site):
            continue
        dirs += glob.glob(os.path.join(site, "nvidia", "cu1*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def cxx_std_flag() -> str:
    """torch >= 2.10 headers need C++20 (ATen.h errors out otherwise); older ones build with 17."""
    try:
        import torch
        major, minor = (int(v) for v in torch.__version__.split(".")[:2])
        return "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"
    except Exception:  # pragma: no cover
        return "-std=c++17"


def find_tool(name: str, cuda_home: str) -> str | None:
    """A CUDA binary tool: $CUDA_HOME/bin, PATH, then the copy triton ships (backends/nvidia/bin);
    a minimal toolkit (nvcc + ptxas only) lacks cuobjdump."""
    cand = os.path.join(cuda_home, "bin", name)
    if os.path.exists(cand):
        return cand
    cand = shutil.which(name)
    if cand:
        return cand
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                cand = os.path.join(loc, "backends", "nvidia", "bin", name)
                if os.path.exists(cand):
                    return cand
    except (ImportError, ValueError):
        pass
    return None


def demangle(names: list[str], cuda_home: str) -> dict[str, str]:
    tool = find_tool("cu++filt", cuda_home) or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))


# ptxas -v output, per kernel:
#   ptxas info    : Compiling entry function '_Z...' for 'sm_80'
#   ptxas info    : Function properties for _Z...
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 117 registers, used 1 barriers, 30720 bytes smem, 608 bytes cmem[0]
RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
RE_PROPS = re.compile(r"Function properties for (\S+)")
RE_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
RE_USED = re.compile(r"Used (\d+) registers")
RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[tuple[str, str], dict]:
    kernels: dict[tuple[str, str], dict] = {}
    arch = None
    current = None
    props_for = None
    for line in log.splitlines():
        m = RE_ENTRY.search(line)
        if m:
            arch = m.group(2)
            current = (m.group(1), arch)
            kernels[current] = {"registers": None, "stack": None, "spill_stores": None,
                                "spill_loads": None, "smem": 0}
            props_for = None
            continue
        m = RE_PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = RE_STACK.search(line)
        if m and current is not None and props_for == current[0]:
            k = kernels[current]
            k["stack"], k["spill_stores"], k["spill_loads"] = (int(v) for v in m.groups())
            continue
        m = RE_USED.search(line)
        if m and current is not None:
            kernels[current]["registers"] = int(m.group(1))
            s = RE_SMEM.search(line)
            kernels[current]["smem"] = int(s.group(1)) if s else 0
    return kernels


def parse_sass(text: str) -> dict[tuple[str, str], dict]:
    """Per (mangled kernel, arch): instruction counts of interest from `cuobjdump -sass`."""
    out: dict[tuple[str, str], dict] = {}
    arch = None
    current = None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            current = None
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m and arch is not None:
            current = (m.group(1), arch)
            out[current] = {"hmma": 0, "ldsm": 0, "ldl_stl": 0}
            continue
        if current is None:
            continue
        if re.search(r"\bHMMA\.", line):
            out[current]["hmma"] += 1
        if re.search(r"\bLDSM\.", line):
            out[current]["ldsm"] += 1
        if re.search(r"\b(LDL|STL)(\.|\s)", line):
            out[current]["ldl_stl"] += 1
    return out


def compile_arch(path: str, arch: str, cuda_home: str, includes: list[str], abi: int,
                 workdir: str) -> dict:
    """One nvcc process per (file, arch): ptxas -v output of concurrent archs would interleave."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    base = os.path.splitext(os.path.basename(path))[0]
    fatbin = os.path.join(workdir, f"{base}.sm_{arch}.fatbin")
    cmd = [nvcc, "-fatbin", "-o", fatbin, "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", cxx_std_flag()]
    cmd += SETUP_NVCC_FLAGS + TORCH_NVCC_FLAGS
    cmd += ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += [f"-I{d}" for d in includes]
    cmd += [path]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result = {"arch": f"sm_{arch}", "seconds": round(time.time() - t0, 1),
              "returncode": proc.returncode, "command": " ".join(cmd), "ptxas": {}, "sass": {}}
    if proc.returncode != 0:
        result["log"] = (proc.stdout + proc.stderr)[-20000:]
        return result
    result["ptxas"] = {k: v for k, v in parse_ptxas(proc.stdout + proc.stderr).items()
                       if k[1] == f"sm_{arch}"}
    cuobjdump = find_tool("cuobjdump", cuda_home)
    if cuobjdump is None:
        result["sass_error"] = "cuobjdump not found ($CUDA_HOME/bin, PATH, triton)"
        return result
    sass_proc = subprocess.run([cuobjdump, "-sass", fatbin], capture_output=True, text=True)
    if sass_proc.returncode == 0:
        result["sass"] = parse_sass(sass_proc.stdout)
    else:
        result["sass_error"] = sass_proc.stderr[-4000:]
    return result


def merge_file(path: str, per_arch: list[dict], cuda_home: str) -> dict:
    """The per-arch compiles of one file as one result: kernels sorted by name, then arch."""
    result = {"file": os.path.relpath(path, ROOT),
              "seconds": round(sum(r["seconds"] for r in per_arch), 1),
              "returncode": max((r["returncode"] for r in per_arch), key=abs),
              "compiles": [{k: r[k] for k in ("arch", "seconds", "returncode", "command")}
                           for r in per_arch],
              "kernels": []}
    logs = [r["log"] for r in per_arch if "log" in r]
    if logs:
        result["log"] = "\n".join(logs)[-20000:]
    errs = [f"{r['arch']}: {r['sass_error']}" for r in per_arch if r.get("sass_error")]
    if errs:
        result["sass_error"] = "; ".join(errs)
    ptx = {k: v for r in per_arch for k, v in r["ptxas"].items()}
    sass = {k: v for r in per_arch for k, v in r["sass"].items()}
    names = demangle(sorted({k[0] for k in ptx}), cuda_home)
    for (mangled, arch), info in sorted(ptx.items(), key=lambda kv: (names[kv[0][0]], kv[0][1])):
        pretty = names[mangled]
        s = sass.get((mangled, arch), {})
        result["kernels"].append({
            "kernel": pretty, "mangled": mangled, "arch": arch, **info,
            "hmma": s.get("hmma"), "ldsm": s.get("ldsm"), "local_insts": s.get("ldl_stl"),
            "requires_hmma": any(re.search(p, pretty) for p in TENSOR_CORE_KERNELS),
        })
    return result


def short_name(name: str) -> str:
    """`void ns::kernel<T>(Params<T>)` -> `kernel<T>`."""
    name = re.sub(r"^void ", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the argument list
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    depth, start = 0, 0
    for i, ch in enumerate(name):  # drop the namespaces (outside template arguments)
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == ":" and depth == 0:
            start = i + 1
    return name[start:]


def check(results: list[dict]) -> list[str]:
    errors = []
    for r in results:
        if r["returncode"] != 0:
            errors.append(f"{r['file']}: nvcc failed (exit {r['returncode']})")
            continue
        if not r["kernels"]:
            errors.append(f"{r['file']}: no kernels found in the ptxas output")
        if r.get("sass_error"):
            errors.append(f"{r['file']}: no SASS: {r['sass_error'].strip()[:300]}")
        for k in r["kernels"]:
            tag = f"{r['file']}: {short_name(k['kernel'])} [{k['arch']}]"
            if k["spill_stores"] or k["spill_loads"]:
                errors.append(f"{tag}: spills {k['spill_stores']} B stores / {k['spill_loads']} B loads")
            if k["stack"]:
                errors.append(f"{tag}: {k['stack']} B stack frame (local memory)")
            if k["registers"] is not None and k["registers"] > 255:
                errors.append(f"{tag}: {k['registers']} registers")
            if k["requires_hmma"] and not k["hmma"] and not r.get("sass_error"):
                errors.append(f"{tag}: no HMMA instruction in SASS")
            if k["local_insts"]:
                errors.append(f"{tag}: {k['local_insts']} local-memory instructions (LDL/STL) in SASS")
    return errors


def print_table(results: list[dict]) -> None:
    rows = [("file", "kernel", "arch", "regs", "stack", "spill st/ld", "smem", "HMMA")]
    for r in results:
        for k in r["kernels"]:
            hm = "-" if k["hmma"] is None else str(k["hmma"])
            if k["requires_hmma"]:
                hm += " (req)"
            rows.append((os.path.basename(r["file"]), short_name(k["kernel"]), k["arch"],
                         str(k["registers"]), str(k["stack"]),
                         f"{k['spill_stores']}/{k['spill_loads']}", str(k["smem"]), hm))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    for r in results:
        per = ", ".join(f"{c['arch']} {c['seconds']} s" for c in r.get("compiles", []))
        print(f"{r['file']}: exit {r['returncode']}, nvcc time {per}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["80", "90"], help="SM versions (default 80 90)")
    ap.add_argument("--json", help="write the results as JSON to this path")
    ap.add_argument("--files", nargs="+", help="the .cu files (default csrc/cuda/*.cu)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="concurrent nvcc processes (one per file and arch)")
    ap.add_argument("--keep", help="keep the fatbins in this directory")
    args = ap.parse_args(argv)

    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("check_cuda_build: nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    archs = [a.replace("sm_", "").replace(".", "") for a in args.arch]
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not files:
        print("check_cuda_build: no .cu files", file=sys.stderr)
        return 2
    tinc, abi = torch_include_dirs(cuda_home)
    includes = tinc + [os.path.join(ROOT, "csrc"), sysconfig.get_paths()["include"]]
    includes += wheel_cuda_include_dirs()
    includes = list(dict.fromkeys(d for d in includes if os.path.isdir(d)))

    workdir = args.keep or tempfile.mkdtemp(prefix="cogvx_cuda_check_")
    os.makedirs(workdir, exist_ok=True)
    # every (file, arch) is its own nvcc process; they run concurrently on `--threads` CPUs
    jobs = [(os.path.abspath(f), a) for f in files for a in archs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.threads)) as pool:
        done = list(pool.map(lambda j: compile_arch(j[0], j[1], cuda_home, includes, abi, workdir), jobs))
    results = [merge_file(os.path.abspath(f), [r for (jf, _), r in zip(jobs, done)
                                               if jf == os.path.abspath(f)], cuda_home)
               for f in files]
    for r in results:
        if r["returncode"] != 0:
            print(r.get("log", ""), file=sys.stderr)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(results)
    errors = check(results)
    for e in errors:
        print("FAIL:", e)
    if not errors:
        print("OK: no spills, no local memory, HMMA in every tensor-core kernel")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cuda_home": cuda_home, "archs": archs, "results": results,
                       "errors": errors, "ok": not errors}, fh, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
