"""The router z-loss: the mean over routers."""

import torch

from clasp.losses import router_z_loss
from tests.utils import assert_close


def test_router_z_loss_is_the_mean_over_routers():
    z = torch.tensor([1.0, 2.0, 6.0])
    assert_close(router_z_loss(z), torch.tensor(3.0))
