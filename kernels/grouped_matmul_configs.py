"""Autotune configurations of the grouped GEMMs (`grouped_matmul_kernels.py`,
`moe_mlp_kernels.py`), the shared-memory pruner that keeps those that fit the device, and the
epilogue chunking rule. Every number here was checked by compiling for sm_90 and sm_80
(`benchmarks/compile_report.py`): a config whose build spills registers is not kept.
"""

from __future__ import annotations

import triton

from .utils import autotune_enabled, device_properties, interpreter_active

# Configs that only Hopper keeps (their A100 build spilled registers: compile report), by
# id: equal configs of other kernels' lists are not marked.
_MIN_CAPABILITY: dict[int, int] = {}


def _configs(tiles, block_m=None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps[, minimum capability]) rows as autotune
    configs; under the interpreter, which runs one config (autotuning needs a device) and
    pays per program and K step, a single large-block one (64 still leaves several tiles
    for the tests' d, f)."""
    if interpreter_active():
        tiles = [(64, 64, 64, 1, 4)]
    configs = []
    for bm, bn, bk, stages, warps, *capability in tiles:
        config = triton.Config(
            {"BLOCK_M": block_m or bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_stages=stages,
            num_warps=warps,
        )
        if capability:
            _MIN_CAPABILITY[id(config)] = capability[0]
        configs.append(config)
    return configs


# Forward-type grouped GEMMs (fc1 with its gather, bias, activation and pre-activation
# epilogue; fc2 with bias, gate and scatter; dx): 64/128-row tiles, 128/256-column tiles,
# 64-deep K steps, 3-4 stages; the 32-deep ones fit fp32 operands into an A100's shared
# memory.
GEMM_CONFIGS = _configs(
    [
        (128, 256, 64, 3, 8),
        (128, 256, 64, 4, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4, 90),
        (64, 256, 64, 4, 8),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 3, 8),
        (64, 128, 32, 4, 4),
    ]
)
# The activation backward sums d(bias) per M-tile, so its row tile is fixed (the launcher
# sums those partials per expert with the same tiling).
ACT_BWD_BLOCK_M = GEMM_CONFIGS[0].kwargs["BLOCK_M"] if interpreter_active() else 128
ACT_BWD_CONFIGS = _configs(
    [
        (128, 256, 64, 3, 8, 90),
        (128, 256, 64, 4, 8, 90),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4),
        (128, 128, 32, 3, 8),
    ],
    block_m=ACT_BWD_BLOCK_M,
)
# Weight gradients (rows are the reduction axis, both operands streamed).
WGRAD_CONFIGS = _configs(
    [
        (128, 256, 64, 3, 8),
        (128, 256, 64, 4, 8, 90),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4, 90),
        (64, 256, 64, 4, 8),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 3, 8),
        (64, 128, 32, 4, 4, 90),
    ]
)
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in ACT_BWD_CONFIGS)


def epilogue_split(block_m: int, block_n: int, num_warps: int, values: int = 32) -> int:
    """Column chunks (a power of 2) of a GEMM epilogue, so that its temporaries (bias,
    pre-activation, activation and its derivative) are live for at most `values`
    accumulator elements per thread at a time: a 128 x 256 fp32 accumulator at 8 warps
    already takes 128 registers per thread of the 255, and whole-tile epilogues spilled
    there (compile report)."""
    if interpreter_active():
        return 4  # the tests' small tiles still run the chunked path
    per_thread = block_m * block_n // (32 * num_warps)
    return max(1, min(block_n // 16, per_thread // values))


def pipeline_buffers(num_stages: int, capability: int) -> int:
    """Operand buffers Triton allocates in shared memory for a num_stages-deep software
    pipeline: num_stages on Hopper (capability 90), num_stages - 1 on earlier GPUs, whose
    pipeline loads one stage straight into registers (compiled and read off the cubin:
    `benchmarks/compile_report.py`)."""
    return num_stages if capability >= 90 else max(1, num_stages - 1)


def operand_footprint(config: triton.Config, element_size: int, capability: int) -> int:
    """Shared-memory bytes of a GEMM config's pipelined A and B tiles."""
    kw = config.kwargs
    tiles = kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]
    return tiles * element_size * pipeline_buffers(config.num_stages, capability)


def _fits_shared_memory(configs, named_args, **kwargs):
    """Drop configs whose operand pipeline exceeds the device's shared memory for this dtype,
    instead of timing launches that cannot start, and those marked for newer GPUs. With
    CLASP_AUTOTUNE=0 keep only the first that fits: one compile per kernel variant, no
    timing (the compiled tests' setting)."""
    operand = next(iter(named_args.values()))
    element_size = operand.element_size()
    device = device_properties(operand.device)

    def footprint(c):
        return operand_footprint(c, element_size, device.capability)

    fitting = [
        c
        for c in configs
        if footprint(c) <= device.max_shared_mem
        and _MIN_CAPABILITY.get(id(c), 0) <= device.capability
    ]
    fitting = fitting or [min(configs, key=footprint)]
    return fitting if autotune_enabled() else fitting[:1]


PRUNE = {"early_config_prune": _fits_shared_memory}
