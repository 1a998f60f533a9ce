"""Re-parameterisation folds every multi-branch block into one conv without changing outputs."""
from __future__ import annotations

import pytest
import torch

from domainsr.models import build_model
from domainsr.models.repsr import RepBlock, _SeqBranch


def _randomise(m: torch.nn.Module) -> None:
    with torch.no_grad():  # edge-branch scales/biases start near zero: make every branch count
        for mod in m.modules():
            if isinstance(mod, _SeqBranch):
                mod.bias.normal_(0, 0.1)
                if mod.mask is not None:
                    mod.scale.normal_(0, 0.1)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("cin,cout", [(6, 6), (3, 8)])
def test_block_fusion_is_exact(dims, cin, cout):
    torch.manual_seed(0)
    block = RepBlock(dims, cin, cout)
    _randomise(block)
    x = torch.randn(2, cin, *(9,) * dims)
    y0 = block.forward_branches(x)  # the explicit sum of the branches
    assert (block(x) - y0).abs().max() < 1e-5  # training runs the kernel folded on the fly
    block.reparameterize()
    assert block.fused is not None and not hasattr(block, "conv3")
    assert (block(x) - y0).abs().max() < 1e-5


def test_on_the_fly_folding_gives_the_branch_gradients():
    torch.manual_seed(0)
    block = RepBlock(2, 4, 4).double()
    _randomise(block)
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    g = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    grads = []
    for fn in (block.forward_branches, block.forward):
        block.zero_grad()
        (fn(x) * g).sum().backward()
        grads.append({n: p.grad.clone() for n, p in block.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-12)


def _branch_forward(net):
    """The model's output with every block evaluated branch by branch."""
    from domainsr.models.layers import pixel_shuffle_nd

    def run(x):
        y = x
        for m in net.body:
            y = m.forward_branches(y) if isinstance(m, RepBlock) else m(y)
        return pixel_shuffle_nd(y, net.scale) + net.base(x)
    return run


@pytest.mark.parametrize("dims,scale", [(2, (2, 2)), (2, (1, 3)), (3, (2, 2, 2)), (3, (1, 1, 4))])
def test_model_fusion_is_exact_and_loads_in_deploy_form(dims, scale):
    torch.manual_seed(0)
    kw = {"n_blocks": 2, "n_feats": 8}
    net = build_model("repsr", spatial_dims=dims, in_channels=2, scale=scale, **kw).double()
    _randomise(net)
    x = torch.rand(1, 2, *(8,) * dims, dtype=torch.float64)
    y0 = _branch_forward(net)(x)
    assert (net(x) - y0).abs().max() < 1e-10
    n_train = sum(p.numel() for p in net.parameters())
    net.reparameterize()
    assert net.is_fused and sum(p.numel() for p in net.parameters()) < n_train
    assert (net(x) - y0).abs().max() < 1e-10  # exact up to rounding
    deploy = build_model("repsr", spatial_dims=dims, in_channels=2, scale=scale, deploy=True, **kw).double()
    deploy.load_state_dict(net.state_dict(), strict=True)
    assert (deploy(x) - y0).abs().max() < 1e-10
    # float32: the folded net agrees to rounding relative to the output size
    net32 = build_model("repsr", spatial_dims=dims, in_channels=2, scale=scale, **kw)
    _randomise(net32)
    x32 = x.float()
    with torch.no_grad():
        y32 = _branch_forward(net32)(x32)
        assert (net32.fuse()(x32) - y32).abs().max() < 1e-6 * max(1.0, float(y32.abs().max()))
