"""``repsr``: a re-parameterisable fast SR family (RepVGG / ECBSR style).

Each :class:`RepBlock` trains with parallel linear branches and folds into a single 3^d conv for
inference (:meth:`RepSR.reparameterize`), so the deployed net is a plain stack of convs:

* 3^d conv, 1^d conv, identity (when ``cin == cout``);
* ``axial``: one 3-tap conv along each spatial axis (1x3 and 3x1 in 2D);
* ``expand``: 1^d conv to ``expand * cout`` channels followed by a 3^d conv (ECBSR's
  expand-squeeze); the intermediate map is padded with its bias, not zeros, so that folding is
  exact at the image border too;
* ``edge``: 1^d conv followed by a fixed Sobel mask per axis and a Laplacian mask, each with a
  learned per-channel scale and bias (ECBSR's edge branches), padded the same way.

There are no activations or normalisations inside a block, so the sum of branches is one linear
map: fused weight = sum of the branch kernels placed in a 3^d kernel. Training therefore also runs
the folded kernel, built differentiably from the branch parameters at each step (the same
function and the same gradients as summing the branches, at the cost of one conv);
:meth:`RepBlock.forward_branches` is the explicit branch sum the tests compare against.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainsr.errors import ModelError
from domainsr.models.baselines import default_base, interpolator
from domainsr.models.layers import (
    SRModule,
    activation,
    branch_radius,
    chain_radius,
    conv,
    conv_nd,
    memory_format,
    pixel_shuffle_nd,
    up,
)

_CONVF = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _edge_masks(dims: int) -> torch.Tensor:
    """Sobel derivative along each axis (smoothing [1, 2, 1] along the others) and a Laplacian."""
    masks = []
    diff, smooth = torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 1.0])
    for a in range(dims):
        m = torch.ones((1,) * dims)
        for b in range(dims):
            v = (diff if a == b else smooth).reshape([3 if i == b else 1 for i in range(dims)])
            m = m * v
        masks.append(m)
    lap = torch.zeros((3,) * dims)
    centre = (1,) * dims
    lap[centre] = -2.0 * dims
    for a in range(dims):
        for o in (0, 2):
            idx = list(centre)
            idx[a] = o
            lap[tuple(idx)] = 1.0
    masks.append(lap)
    return torch.stack(masks)  # (n_masks, 3, ..., 3)


class _SeqBranch(nn.Module):
    """1^d conv (``cin -> mid``, bias b0) then a 3^d kernel K (``mid -> cout``, bias b1) applied to
    the b0-padded intermediate. K is learned (``mask=None``) or ``scale * mask`` per channel."""

    def __init__(self, dims: int, cin: int, cout: int, mid: int | None = None,
                 mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.dims = dims
        self.pre = conv_nd(dims, cin, cout if mask is not None else mid, 1)
        if mask is None:
            self.k = nn.Parameter(torch.empty(cout, mid, *(3,) * dims))
            nn.init.kaiming_uniform_(self.k, a=math.sqrt(5))
            self.mask = None
        else:
            self.register_buffer("mask", mask.clone(), persistent=False)
            self.scale = nn.Parameter(torch.randn(cout) * 1e-3)
        self.bias = nn.Parameter(torch.randn(cout) * 1e-3)

    def kernel(self) -> torch.Tensor:
        """The 3^d kernel ``(cout, mid, 3, ...)`` applied after the 1^d conv."""
        if self.mask is None:
            return self.k
        cout = self.scale.numel()
        eye = torch.eye(cout, dtype=self.scale.dtype, device=self.scale.device)
        return (eye * self.scale[:, None]).reshape(cout, cout, *(1,) * self.dims) * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        b0 = self.pre.bias.view(1, -1, *(1,) * self.dims)
        y = F.pad(y - b0, (1, 1) * self.dims) + b0  # pad with the bias value
        if self.mask is None:
            return _CONVF[self.dims](y, self.k, self.bias)
        cout = self.scale.numel()
        w = self.scale.view(-1, 1, *(1,) * self.dims) * self.mask.reshape(1, 1, *self.mask.shape)
        return _CONVF[self.dims](y, w, self.bias, groups=cout)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.kernel()
        a = self.pre.weight.flatten(1)  # (mid, cin)
        w = torch.einsum("om...,mi->oi...", k, a)
        b = self.bias + torch.einsum("om,m->o", k.flatten(2).sum(2), self.pre.bias)
        return w, b


class RepBlock(nn.Module):
    """A multi-branch linear block that :meth:`reparameterize` folds into one 3^d conv."""

    def __init__(self, dims: int, cin: int, cout: int, *, axial: bool = True, expand: int = 2,
                 edge: bool = True, deploy: bool = False) -> None:
        super().__init__()
        self.dims, self.cin, self.cout = dims, cin, cout
        if deploy:
            self.fused = conv_nd(dims, cin, cout, 3)
            return
        self.fused = None
        self.conv3 = conv_nd(dims, cin, cout, 3)
        self.conv1 = conv_nd(dims, cin, cout, 1)
        self.identity = cin == cout
        self.axial = nn.ModuleList(
            conv_nd(dims, cin, cout, tuple(3 if i == a else 1 for i in range(dims)))
            for a in range(dims)) if axial else nn.ModuleList()
        seq = [_SeqBranch(dims, cin, cout, mid=expand * cout)] if expand else []
        if edge:
            seq += [_SeqBranch(dims, cin, cout, mask=m) for m in _edge_masks(dims)]
        self.seq = nn.ModuleList(seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        w, b = self.fused_kernel()
        return _CONVF[self.dims](x, w, b, padding=1)

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The multi-branch sum, branch by branch (the definition the folded kernel must equal)."""
        y = self.conv3(x) + self.conv1(x)
        if self.identity:
            y = y + x
        for branch in (*self.axial, *self.seq):
            y = y + branch(x)
        return y

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 3^d conv ``(weight, bias)`` equal to the sum of the branches (differentiable)."""
        d, c = self.dims, (1,) * self.dims
        w = self.conv3.weight.clone()
        b = self.conv3.bias.clone()
        w[(slice(None), slice(None)) + c] += self.conv1.weight[(slice(None), slice(None)) + (0,) * d]
        b += self.conv1.bias
        if self.identity:
            w[(torch.arange(self.cout), torch.arange(self.cin)) + c] += 1.0
        for a, conv_ in enumerate(self.axial):
            idx = [slice(None), slice(None)] + [slice(None) if i == a else 1 for i in range(d)]
            src = [slice(None), slice(None)] + [slice(None) if i == a else 0 for i in range(d)]
            w[tuple(idx)] += conv_.weight[tuple(src)]
            b += conv_.bias
        for branch in self.seq:
            wb, bb = branch.fused()
            w += wb
            b += bb
        return w, b

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.fused is not None:
            return
        w, b = self.fused_kernel()
        fused = conv_nd(self.dims, self.cin, self.cout, 3).to(device=w.device, dtype=w.dtype)
        fused.weight.data.copy_(w)
        fused.bias.data.copy_(b)
        for name in ("conv3", "conv1", "axial", "seq"):
            delattr(self, name)
        self.fused = fused


class RepSR(SRModule):
    """``y = interp(x) + shuffle(tail(act(block(... act(head(x))))))`` with RepBlocks throughout.

    ``deploy=True`` builds the folded (single-conv) form directly, to load folded weights.
    """

    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, n_blocks: int = 4, n_feats: int = 16,
                 act: str = "prelu", axial: bool = True, expand: int = 2, edge: bool = True,
                 base: str | None = None, deploy: bool = False) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, scale)
        d = self.spatial_dims
        kw = {"axial": axial, "expand": expand, "edge": edge, "deploy": deploy}
        self.base = interpolator(base or default_base(d), d, self.in_channels, self.scale)
        if self.out_channels != self.in_channels:
            raise ModelError(f"repsr adds its output to the interpolated input: out_channels "
                             f"({self.out_channels}) must equal in_channels ({self.in_channels})")
        layers: list[nn.Module] = [RepBlock(d, self.in_channels, n_feats, **kw), activation(act, n_feats)]
        for _ in range(n_blocks):
            layers += [RepBlock(d, n_feats, n_feats, **kw), activation(act, n_feats)]
        layers.append(RepBlock(d, n_feats, self.out_channels * math.prod(self.scale), **kw))
        self.body = nn.Sequential(*layers)
        net = chain_radius([conv(1)] * (n_blocks + 2) + [up(self.scale)], d)
        self.receptive_radius = branch_radius(self.base.receptive_radius, net)
        self._format = memory_format(d)
        self.to(memory_format=self._format)

    @property
    def is_fused(self) -> bool:
        return all(m.fused is not None for m in self.modules() if isinstance(m, RepBlock))

    def reparameterize(self) -> RepSR:
        """Fold every block into one conv, in place (same outputs; state_dict as ``deploy=True``)."""
        for m in [m for m in self.modules() if isinstance(m, RepBlock)]:
            m.reparameterize()
        return self.to(memory_format=self._format)

    fuse = reparameterize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x.contiguous(memory_format=self._format))
        return pixel_shuffle_nd(y, self.scale).add_(self.base(x))
