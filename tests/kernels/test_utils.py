"""The shared launch helpers: the derived-operand cache and the autotune pruner."""

import pytest
import torch
import triton
from clasp.kernels import grouped_matmul_configs as gmk
from clasp.kernels.utils import DeviceProperties, ahead_of_time_target, derived_operand


def test_derived_operand_is_rebuilt_when_its_source_changes():
    builds = []

    def build():
        builds.append(1)
        return source.sum().item()

    source = torch.randn(4, 3)
    first = derived_operand(source, ("test",), build)
    assert derived_operand(source, ("test",), build) == first and len(builds) == 1
    source.mul_(2)  # in place: the version counter moves
    assert derived_operand(source, ("test",), build) == pytest.approx(2 * first, rel=1e-5)
    assert derived_operand(source, ("other tag",), build) and len(builds) == 3
    twin = source.clone()  # equal content, another tensor: never served the first's value
    assert derived_operand(twin, ("test",), build) and len(builds) == 4
    with torch.inference_mode():
        frozen = torch.randn(2)
    derived_operand(frozen, ("test",), lambda: builds.append(1))
    derived_operand(frozen, ("test",), lambda: builds.append(1))
    assert len(builds) == 6, "inference tensors have no version counter: never cached"


# (stages, buffers on sm_80, buffers on sm_90)
@pytest.mark.parametrize("stages,sm80,sm90", [(2, 1, 2), (3, 2, 3), (4, 3, 4)])
def test_pipeline_buffers_follow_what_triton_allocates(stages, sm80, sm90):
    assert gmk.pipeline_buffers(stages, 80) == sm80
    assert gmk.pipeline_buffers(stages, 90) == sm90


CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_stages=4, num_warps=4),
]


@pytest.mark.parametrize(
    "capability,limit,dtype,kept",
    [
        # bf16 128x256x64: 48 KiB per stage; 4 stages are 3 buffers (144 KiB) on an A100.
        pytest.param(80, 166912, torch.bfloat16, [0, 1, 2], id="a100-bf16"),
        pytest.param(90, 232448, torch.bfloat16, [0, 1, 2], id="h100-bf16"),
        # fp32: 96 KiB per stage, 2 buffers already too many for an A100.
        pytest.param(80, 166912, torch.float32, [2], id="a100-fp32"),
        pytest.param(90, 232448, torch.float32, [2], id="h100-fp32"),
    ],
)
def test_pruner_keeps_the_configs_whose_pipeline_fits(capability, limit, dtype, kept, monkeypatch):
    monkeypatch.delenv("CLASP_AUTOTUNE", raising=False)
    operand = torch.empty(8, 8, dtype=dtype, device="meta")
    with ahead_of_time_target(DeviceProperties(100, limit, capability)):
        fitting = gmk._fits_shared_memory(CONFIGS, {"a_ptr": operand})
        assert fitting == [CONFIGS[i] for i in kept]
        monkeypatch.setenv("CLASP_AUTOTUNE", "0")
        assert gmk._fits_shared_memory(CONFIGS, {"a_ptr": operand}) == fitting[:1]
