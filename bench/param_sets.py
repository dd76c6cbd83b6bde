"""Parameter shapes the benchmarks step over, written out so that no model library is needed.

``resnet50``: the 161 parameters of torchvision's ResNet-50 (25,557,032 elements), in
``model.parameters()`` order. ``small``: 996 parameters of a narrow 62-layer transformer
(width 64), the many-small-tensors case where per-tensor overhead dominates.
"""

from __future__ import annotations

import math

Shape = tuple[int, ...]


def _batch_norm(channels: int) -> list[Shape]:
    return [(channels,), (channels,)]  # weight, bias


def _bottleneck(inplanes: int, planes: int, downsample: bool) -> list[Shape]:
    width, out = planes, planes * 4
    shapes = [(width, inplanes, 1, 1), *_batch_norm(width)]
    shapes += [(width, width, 3, 3), *_batch_norm(width)]
    shapes += [(out, width, 1, 1), *_batch_norm(out)]
    if downsample:
        shapes += [(out, inplanes, 1, 1), *_batch_norm(out)]
    return shapes


def resnet50_shapes() -> list[Shape]:
    shapes = [(64, 3, 7, 7), *_batch_norm(64)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += _bottleneck(inplanes, planes, downsample=block == 0)
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def small_transformer_shapes(width: int = 64, layers: int = 62, vocab: int = 1024, context: int = 256) -> list[Shape]:
    shapes: list[Shape] = [(vocab, width), (context, width)]  # token and position embeddings
    for _ in range(layers):
        shapes += [(width,), (width,)]  # layer norm 1
        for _ in range(4):  # q, k, v, output projections
            shapes += [(width, width), (width,)]
        shapes += [(width,), (width,)]  # layer norm 2
        shapes += [(4 * width, width), (4 * width,), (width, 4 * width), (width,)]  # MLP
    shapes += [(width,), (width,)]  # final layer norm
    return shapes


PARAM_SETS = {"resnet50": resnet50_shapes, "small": small_transformer_shapes}


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(shape) for shape in shapes)


if __name__ == "__main__":
    for name, make in PARAM_SETS.items():
        shapes = make()
        print(f"{name}: {len(shapes)} tensors, {numel(shapes):,} elements")
