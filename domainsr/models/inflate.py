"""Inflating a 2D network's weights into the same network in 3D (I3D-style, Carreira & Zisserman 2017).

A 2D kernel ``(O, I, k_a, k_b)`` becomes a 3D kernel that is zero except on the centre plane of the
inserted axis, so the inflated 3D net computes exactly what the 2D net computes on every plane
spanned by the two kept axes. A slice-wise thick-slice model (2D scale ``(1, s)``) starts a 3D model
of scale ``(1, 1, s)`` this way: it begins at the 2D model's quality on one orientation, and 3D
training then only has to learn what the third axis adds (the continuity of a surface between
neighbouring planes, which a 2D net never sees).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from domainsr.errors import ModelError


def inserted_axis(scale_2d: Sequence[int], scale_3d: Sequence[int]) -> int:
    """The 3D axis a 2D scale lacks: the first axis of factor 1 whose removal leaves ``scale_2d``."""
    s2, s3 = tuple(int(v) for v in scale_2d), tuple(int(v) for v in scale_3d)
    if len(s2) != 2 or len(s3) != 3:
        raise ModelError(f"inflation maps a 2D scale to a 3D one, got {s2} -> {s3}")
    for a in range(3):
        if s3[a] == 1 and s3[:a] + s3[a + 1:] == s2:
            return a
    raise ModelError(f"a 2D model of scale {s2} cannot be inflated to scale {s3}: the 3D scale must be "
                     "the 2D one with a factor-1 axis inserted")


def inflate_state_dict(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                       axis: int) -> dict[str, torch.Tensor]:
    """``state`` (2D) shaped like ``target`` (3D): 4D conv kernels placed on the centre plane of
    ``axis`` (a spatial axis, 0-2), every other tensor copied as it is."""
    if set(state) != set(target):
        missing, extra = sorted(set(target) - set(state)), sorted(set(state) - set(target))
        raise ModelError(f"the 2D and 3D networks differ: missing {missing[:4]}, unexpected {extra[:4]}")
    out: dict[str, torch.Tensor] = {}
    for key, want in target.items():
        got = state[key]
        if got.ndim == 4 and want.ndim == 5:
            k = want.shape[2 + axis]
            kept = [want.shape[2 + a] for a in range(3) if a != axis]
            if tuple(got.shape) != (*want.shape[:2], *kept) or k % 2 == 0:
                raise ModelError(f"{key}: a 2D kernel {tuple(got.shape)} does not inflate to {tuple(want.shape)}")
            w = torch.zeros(want.shape, dtype=got.dtype)
            index = [slice(None)] * 5
            index[2 + axis] = k // 2
            w[tuple(index)] = got
            out[key] = w
        elif got.shape == want.shape:
            out[key] = got.clone()
        else:
            raise ModelError(f"{key}: shape {tuple(got.shape)} does not match {tuple(want.shape)}")
    return out


__all__ = ["inflate_state_dict", "inserted_axis"]
