"""The MoE load-balancing loss at its two extremes."""

import torch

from clasp.losses import load_balance_loss
from tests.utils import assert_close


def test_load_balance_is_one_when_uniform_and_E_when_collapsed():
    E = 4
    uniform = load_balance_loss(torch.full((2, E), 1 / E), torch.full((2, E), 10))
    assert_close(uniform, torch.tensor(1.0))
    probs = torch.tensor([[1.0, 0, 0, 0]], requires_grad=True)
    collapsed = load_balance_loss(probs, torch.tensor([[40, 0, 0, 0]]))
    assert_close(collapsed, torch.tensor(float(E)))
    collapsed.backward()
    # Only probs_mean carries a gradient: E * fraction, pushing mass off the loaded expert.
    assert_close(probs.grad, torch.tensor([[4.0, 0, 0, 0]]))
    empty = load_balance_loss(torch.full((1, E), 1 / E), torch.zeros(1, E, dtype=torch.int32))
    assert empty == 0
