"""Ahead-of-time compile report: every Triton kernel variant this package launches at the
benchmark shapes, compiled for a GPU that need not be there, with its registers, spills,
shared memory and what its hot loop runs on.

    python benchmarks/compile_report.py [--arch sm_90 sm_80] [--dtype bf16] [--json FILE]
                                        [--quick] [--jobs N] [--kernel NAME ...]

How: each op's real launch code (the body of its custom op) runs on "meta" tensors under
`clasp.kernels.utils.ahead_of_time_target`, which gives the launchers the SM count and
shared memory of the target and the autotune pruner its limit. The launches are caught
before they reach a driver; each kept autotune config is bound with the JIT's own binder
(`create_function_from_signature`, `JITFunction._pack_args`) so the specialisation
(16-byte alignment of pointers, divisibility of ints by 16, ints equal to 1) is that of a
real launch (meta tensors report data_ptr 0, aligned as fresh CUDA allocations are, and
keep the offsets of views), then compiled with `triton.compile(ASTSource, GPUTarget)`.
Registers and spills come from ptxas's own -v log, the hot loop from `cuobjdump -sass`:
the loop (a backward branch) with the most tensor-core instructions (HGMMA = wgmma on
sm_90, HMMA = mma.sync), else the largest one; async copies are LDGSTS (cp.async) and
UTMALDG / UBLKCP (TMA). Configs that compile to the same SASS are marked duplicates.

--quick compiles one variant per hot kernel (fc1, act-bwd, wgrad, router forward) at its
largest kept tile and its largest accumulator per thread: the check
`tests/kernels/test_compile_report.py` runs. TRITON_INTERPRET
must not be set (the interpreter replaces the compiler); the script unsets it for itself.

Just under 500 lines: the op launches it replays, the capture and binding of launches, the
SASS reading and the table form one tool with one command line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

# Before triton is imported. The report compiles for real, reruns ptxas even for cached
# kernels (its -v log is where spill bytes are) and prints that log, into a cache of its
# own; --warm compiles into Triton's own cache, as the JIT would.
os.environ.pop("TRITON_INTERPRET", None)
WARM = "--warm" in sys.argv
if not WARM:
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault(
        "TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "clasp-aot-cache")
    )

import source_tree  # noqa: E402, F401  (clasp.kernels from this tree if not installed)
import torch  # noqa: E402
import triton  # noqa: E402
from clasp.kernels.l2norm import _l2_normalize_bwd, _l2_normalize_fwd  # noqa: E402
from clasp.kernels.moe_mlp import _moe_mlp_bwd, _moe_mlp_fwd  # noqa: E402
from clasp.kernels.patch_text import _patch_text_labels_op  # noqa: E402
from clasp.kernels.route import _route_bwd, _route_fwd  # noqa: E402
from clasp.kernels.utils import (  # noqa: E402
    DeviceProperties,
    ahead_of_time_target,
    device_properties,
)
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

# H100 SXM and A100: SMs and the opt-in shared memory per block.
TARGETS = {
    "sm_90": DeviceProperties(sm_count=132, max_shared_mem=232448, capability=90),
    "sm_80": DeviceProperties(sm_count=108, max_shared_mem=166912, capability=80),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
MMA = re.compile(r"^(HGMMA|HMMA|IMMA|QGMMA)")
ASYNC_COPY = re.compile(r"^(LDGSTS|UTMALDG|UBLKCP|UTMAPF)")
SPILL = re.compile(r"^(STL|LDL)")


# --- the launches: each op's launch code at the benchmark shapes, on meta tensors ----------


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def moe_workloads(dtype):
    """The grouped MLP at ViT-B shapes (T = 256 x 129 tokens, d 768, f 3072, top-2)."""
    for E in (8, 16):
        T, d, f, k = 256 * 129, 768, 3072, 2
        x, dy = _meta(T, d, dtype=dtype), _meta(T, d, dtype=dtype)
        w1, w2 = _meta(E, d, f, dtype=dtype), _meta(E, f, d, dtype=dtype)
        b1, b2 = _meta(E, f, dtype=dtype), _meta(E, d, dtype=dtype)
        gates, pre = _meta(T, k), _meta(T * k, f, dtype=dtype)
        offsets, slots = _meta(E + 1, dtype=torch.int32), _meta(T * k, dtype=torch.int32)
        args = (gates, w1, w2, b1, b2, offsets, slots, k, "gelu")
        yield f"moe_mlp fwd E={E}", lambda a=args, x=x: _moe_mlp_fwd._init_fn(x, *a, True)
        bwd = (dy, x, pre, gates, w1, w2, b1, b2, offsets, slots, k, "gelu")
        yield f"moe_mlp bwd E={E}", lambda a=bwd: _moe_mlp_bwd._init_fn(*a)


def route_workloads(dtype):
    """The router at ViT-B token grids (B 256, N 129, d 768), top-2."""
    B, N, d, k = 256, 129, 768, 2
    for E in (8, 16, 64):
        x, w, bias = _meta(B, N, d, dtype=dtype), _meta(d, E, dtype=dtype), _meta(B, E, dtype=dtype)
        yield f"route fwd E={E}", lambda a=(x, w, bias): _route_fwd._init_fn(*a, k, True, True)
        expert_idx, logits = _meta(B * N, k, dtype=torch.int32), _meta(B * N, E)
        bwd = (_meta(B * N, k), _meta(E), _meta(()), x, w, expert_idx, logits, True)
        yield f"route bwd E={E}", lambda a=bwd: _route_bwd._init_fn(*a, True, True, True)


def patch_text_workloads(dtype):
    """Labelling at CLIP patch grids (B 256, N 196), D 512 / 768, C 7 / 20."""
    for D in (512, 768):
        for C in (7, 20):
            patches, text = _meta(256, 196, D, dtype=dtype), _meta(C, D, dtype=dtype)
            for probs in (False, True):
                name = f"patch_text_labels D={D} C={C}{' probs' if probs else ''}"
                args = (patches, text, 0.01, 0.3, True, probs)
                yield name, lambda a=args: _patch_text_labels_op._init_fn(*a)


def l2norm_workloads(dtype):
    for D in (512, 768):
        x = _meta(256, 196, D, dtype=dtype)
        yield f"l2_normalize fwd D={D}", lambda x=x: _l2_normalize_fwd._init_fn(x, 1e-12)
        y, rnorm = _meta(256, 196, D, dtype=dtype), _meta(256 * 196)
        yield (
            f"l2_normalize bwd D={D}",
            lambda a=(x, y, rnorm): _l2_normalize_bwd._init_fn(*a, 1e-12),
        )


WORKLOADS = (moe_workloads, route_workloads, patch_text_workloads, l2norm_workloads)


def role(kernel: str, constexprs: dict) -> str:
    """What a variant is in the op, from its flags."""
    if kernel == "_grouped_mm_kernel":
        if constexprs.get("GATHER"):
            return "fc1"
        return "fc2" if constexprs.get("GATE") else "dx"
    if kernel == "_grouped_wgrad_kernel":
        return "wgrad"  # dw1 and dw2: the same specialisation
    return kernel.strip("_").removesuffix("_kernel")


# Hot kernels (role): --quick compiles one variant of each; GEMMs must use tensor cores.
HOT = ("fc1", "grouped_mm_act_bwd", "wgrad", "route_fwd")
GEMM_ROLES = ("fc1", "fc2", "dx", "wgrad", "grouped_mm_act_bwd")


class _Launch:
    def __init__(self, kernel, args, kwargs, workload):
        self.kernel, self.args, self.workload = kernel, args, workload
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}


@contextlib.contextmanager
def _caught_launches(into: list, workload: str):
    """Launches record themselves instead of reaching a driver."""
    saved = Autotuner.run, JITFunction.run

    def record(self, *args, **kwargs):
        into.append(_Launch(self, args, kwargs, workload))

    Autotuner.run = JITFunction.run = record
    try:
        yield
    finally:
        Autotuner.run, JITFunction.run = saved


def _expand(launch: _Launch):
    """(jit function, args, kwargs, config or None) for every config the pruner keeps."""
    fn, configs = launch.kernel, [None]
    if isinstance(fn, Autotuner):
        fn.nargs = dict(zip(fn.arg_names, launch.args, strict=False))
        configs = fn.prune_configs(launch.kwargs)
        fn.nargs = None
        fn = fn.fn
    for config in configs:
        kwargs = dict(launch.kwargs, **(config.all_kwargs() if config else {}))
        inner = fn
        while not isinstance(inner, JITFunction):
            if isinstance(inner, Heuristics):
                named = dict(zip(inner.arg_names, launch.args, strict=False))
                for name, heuristic in inner.values.items():
                    kwargs[name] = heuristic({**named, **kwargs})
            inner = inner.fn
        yield inner, launch.args, kwargs, config


def collect(arch: str, dtype: torch.dtype, kernels=None, workloads_like=None) -> list[dict]:
    """Bound, deduplicated compile jobs of every launch at the benchmark shapes."""
    target = GPUTarget("cuda", TARGETS[arch].capability, 32)
    backend = make_backend(target)
    jobs: dict[str, dict] = {}
    with ahead_of_time_target(TARGETS[arch]):
        for workloads in WORKLOADS:
            for name, run in workloads(dtype):
                if workloads_like and not any(w in name for w in workloads_like):
                    continue
                launches: list[_Launch] = []
                with _caught_launches(launches, name):
                    run()
                for launch in launches:
                    for fn, args, kwargs, _ in _expand(launch):
                        if kernels and fn.__name__ not in kernels:
                            continue
                        # As JITFunction.run does before binding, so options (and with
                        # them the cache keys --warm writes) equal a real launch's.
                        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
                        if hasattr(knobs.compilation, "instrumentation_mode"):
                            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
                        binder = create_function_from_signature(fn.signature, fn.params, backend)
                        bound, specialization, options = binder(*args, **kwargs)
                        options, signature, constexprs, attrs = fn._pack_args(
                            backend, kwargs, bound, specialization, options
                        )
                        named = {fn.arg_names[p[0]]: v for p, v in constexprs.items()}
                        key = repr((fn.__name__, signature, named, attrs, options.__dict__))
                        job = jobs.setdefault(
                            key,
                            dict(
                                fn=fn, signature=signature, constexprs=constexprs,
                                attrs=attrs, options=options.__dict__, arch=arch,
                                kernel=fn.__name__, named=named,
                                role=role(fn.__name__, named), workloads=[],
                                config=_config_text(named, options.__dict__),
                                tile=_tile(named), stages=options.num_stages,
                                warps=options.num_warps,
                            ),
                        )  # fmt: skip
                        if launch.workload not in job["workloads"]:
                            job["workloads"].append(launch.workload)
    return list(jobs.values())


def _config_text(named: dict, options: dict) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in named.items() if k.startswith(("BLOCK_", "GROUP_")))
    return f"{blocks} warps={options['num_warps']} stages={options['num_stages']}"


def _tile(named: dict) -> int:
    return named.get("BLOCK_M", named.get("BLOCK_T", 1)) * named.get("BLOCK_N", 1)


def variant_text(named: dict) -> str:
    """The flags that make a variant, without its block sizes."""
    flags = []
    for k, v in named.items():
        if k.startswith(("BLOCK_", "GROUP_", "stride_")) or v in (False, None):
            continue
        flags.append(k if v is True else f"{k}={v}")
    return " ".join(flags)


# --- compiling and reading the machine code ------------------------------------------------


def _tool(name: str, *args: str) -> str:
    out = subprocess.run([os.path.join(TOOLS, name), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def hot_loop(sass: str) -> dict:
    """Instructions of the loop with the most tensor-core instructions (innermost among
    equals), else of the largest loop, else of the whole kernel."""
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = []
    for addr, op, rest in code:
        target = re.match(r"\s*(0x[0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            loops.append([c for c in code if start <= c[0] <= addr])
    body = code
    if loops:

        def rank(loop):
            return (sum(bool(MMA.match(op)) for _, op, _ in loop), -len(loop))

        best = max(loops, key=rank)
        body = best if rank(best)[0] > 0 else max(loops, key=len)
    ops = [op for _, op, _ in body]
    return dict(
        loop_instructions=len(ops),
        loop_mma=sum(bool(MMA.match(op)) for op in ops),
        loop_async_copies=sum(bool(ASYNC_COPY.match(op)) for op in ops),
        loop_spills=sum(bool(SPILL.match(op)) for op in ops),
        loop_global_loads=sum(op.startswith("LDG") for op in ops),
        mma_kind=next((op.split(".")[0] for op in ops if MMA.match(op)), None),
    )


def compile_job(job: dict) -> dict:
    """Compile one job and read its resources; returns the report record (under --warm
    only the compile time: the point is the cache entry)."""
    target = GPUTarget("cuda", TARGETS[job["arch"]].capability, 32)
    source = ASTSource(job["fn"], job["signature"], job["constexprs"], job["attrs"])
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=target, options=job["options"])
    seconds = time.perf_counter() - start
    if WARM:
        return dict(kernel=job["kernel"], config=job["config"], compile_s=round(seconds, 2))
    ptxas = log.getvalue()
    numbers = re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas
    )
    regs = re.search(r"Used (\d+) registers", ptxas)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = _tool("cuobjdump", "-sass", cubin.name)
        usage = _tool("cuobjdump", "-res-usage", cubin.name)
    if regs is None:  # ptxas printed nothing: read what the cubin says
        regs = re.search(r"REG:(\d+)", usage)
    loop = hot_loop(sass)
    instructions = "\n".join(
        line.split(";")[0].split("*/", 1)[-1].strip()
        for line in sass.splitlines()
        if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)
    )
    return dict(
        kernel=job["kernel"],
        role=job["role"],
        variant=variant_text(job["named"]),
        arch=job["arch"],
        config=job["config"],
        num_warps=job["warps"],
        num_stages=job["stages"],
        regs=int(regs.group(1)) if regs else None,
        spill_bytes=int(numbers.group(2)) if numbers else None,
        spill_load_bytes=int(numbers.group(3)) if numbers else None,
        stack_bytes=int(numbers.group(1)) if numbers else None,
        shared_bytes=compiled.metadata.shared,
        tensor_cores=loop["loop_mma"] > 0,
        async_copies=loop["loop_async_copies"] > 0,
        **loop,
        sass_sha1=hashlib.sha1(instructions.encode()).hexdigest()[:12],
        workloads=job["workloads"],
        compile_s=round(seconds, 2),
    )


_JOBS: list[dict] = []


def _compile_index(i: int) -> dict:
    return compile_job(_JOBS[i])


def quick_jobs(jobs: list[dict]) -> list[dict]:
    """Per hot role and arch, the first variant at its two most register-hungry kept
    configs: the largest tile, and the largest accumulator per thread (tile / warps)."""
    picked = []
    for arch in sorted({j["arch"] for j in jobs}):
        for hot in HOT:
            candidates = [j for j in jobs if j["arch"] == arch and j["role"] == hot]
            if not candidates:
                continue
            first = variant_text(candidates[0]["named"])
            same = [j for j in candidates if variant_text(j["named"]) == first]
            largest = max(same, key=lambda j: (j["tile"], j["stages"]))
            per_thread = max(same, key=lambda j: (j["tile"] / j["warps"], j["tile"]))
            picked += [largest] + ([per_thread] if per_thread is not largest else [])
    return picked


def mark_duplicates(records: list[dict]) -> None:
    """A config whose SASS equals an earlier one's of the same variant times the same code."""
    seen: dict = {}
    for r in records:
        key = (r["kernel"], r["variant"], r["arch"], r["sass_sha1"])
        r["duplicate_of"] = seen.setdefault(key, r["config"])
        if r["duplicate_of"] == r["config"]:
            r["duplicate_of"] = None


COLUMNS = (
    ("role", "role"), ("arch", "arch"), ("config", "config"), ("regs", "regs"),
    ("spill_bytes", "spill B"), ("shared_bytes", "smem B"), ("mma_kind", "mma"),
    ("tensor_cores", "TC"), ("async_copies", "async"), ("loop_instructions", "loop"),
    ("loop_spills", "loop STL/LDL"), ("duplicate_of", "duplicate of"),
)  # fmt: skip


def print_table(records: list[dict]) -> None:
    rows = []
    last_variant = None
    for r in records:
        variant = (r["kernel"], r["variant"])
        if variant != last_variant:
            rows.append(None)
            rows.append(f"{r['kernel']} [{r['variant']}]  ({'; '.join(r['workloads'])})")
            last_variant = variant
        rows.append(["-" if r[k] is None else str(r[k]) for k, _ in COLUMNS])
    cells = [row for row in rows if isinstance(row, list)]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(COLUMNS)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(COLUMNS, widths, strict=True)))
    for row in rows:
        if row is None:
            print()
        elif isinstance(row, str):
            print(row)
        else:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def warm(args) -> int:
    if not torch.cuda.is_available():
        print("compile_report --warm: needs the CUDA device to compile for")
        return 2
    TARGETS["native"] = device_properties(torch.device("cuda"))
    jobs = [j for d in args.dtype for j in collect("native", DTYPES[d], args.kernel, args.workload)]
    _JOBS[:] = jobs
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        for done, record in enumerate(pool.imap_unordered(_compile_index, range(len(jobs))), 1):
            print(f"[{time.perf_counter() - start:5.1f} s] {done}/{len(jobs)} {record}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--json", help="write one record per kernel variant and kept config")
    parser.add_argument("--quick", action="store_true", help="one variant per hot kernel")
    parser.add_argument("--kernel", nargs="+", help="only these @triton.jit functions")
    parser.add_argument("--workload", nargs="+", help="only workloads whose name has one of these")
    parser.add_argument("--jobs", type=int, default=1, help="compile in N processes")
    parser.add_argument(
        "--warm",
        action="store_true",
        help="on a GPU machine: compile every variant and kept config for this GPU into "
        "Triton's cache (what autotuning would compile one by one), report nothing",
    )
    args = parser.parse_args(argv)
    if args.warm:
        return warm(args)
    if not os.path.exists(os.path.join(TOOLS, "cuobjdump")):
        print(f"compile_report: no cuobjdump in {TOOLS}: install triton's CUDA backend")
        return 2
    jobs = [
        j for arch in args.arch for d in args.dtype for j in collect(arch, DTYPES[d], args.kernel)
    ]
    if args.quick:
        jobs = quick_jobs(jobs)
    _JOBS[:] = jobs
    start = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            records = pool.map(_compile_index, range(len(jobs)))
    else:
        records = [compile_job(j) for j in jobs]
    mark_duplicates(records)
    print_table(records)
    print(
        f"\n{len(records)} kernel variants x configs compiled in "
        f"{time.perf_counter() - start:.0f} s (triton {triton.__version__})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
