"""Incremental scoring of one-patch changes: recompute only what a changed patch can reach.

Every image SAG scores differs from an image it scored before by exactly one patch (a search
candidate adds one to a beam state; minimisation and the graph remove one). In a
convolutional network's early layers an output cell depends only on a small window of the
input, so a child's early feature map equals its parent's everywhere except near the changed
patch (incremental inference for occlusion explanations, as in Krypton: Nakandala, Kumar and
Papakonstantinou, SIGMOD 2019). The network is split into

* a *prefix* of local layers, run on a small crop around the changed patch; the cells of its
  output that the patch can reach are pasted into the parent's cached prefix output, and
* a *suffix* (everything else, through the logits), run on the whole pasted map.

For efficientnet_lite0 at 224 px with 7 x 7 patches the prefix is the stem, the first stage and
the first block of the second (their 112 x 112 maps are a large share of a forward on a CPU),
run on an 88 px crop. The split is found from the layers' kernels and strides on one probe
forward, only for layouts whose forward order is known (timm EfficientNet / MobileNet-style,
torchvision and timm ResNets); anything else is scored whole. Callers verify the first
incremental scores against whole forwards.

Geometry (all in input pixels): a prefix output cell ``c`` along a side sees at most the input
``[c * J - R, c * J + J - 1 + R]`` where ``J`` is the prefix's stride and ``R`` the sum over its
convolutions and poolings of ``(kernel - 1) * dilation * (stride of their input)`` (twice the
receptive-field radius: asymmetric "same" padding included). A crop is valid for a cell when
that window lies inside it or the crop meets the image border where the window leaves it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

PrefixRun = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NetworkSplit:
    """A network cut into local ``prefix`` layers and the ``suffix`` that ends in the logits
    (both modules of the network's own layers; callers may swap in other runs of them)."""

    prefix: PrefixRun
    suffix: PrefixRun
    stride: int  # input pixels per prefix-output cell
    reach: int   # R above: how far (input pixels) beyond its own cell a prefix-output cell sees
    units: int = 0  # how many of the network's sequential units the prefix holds


class _Suffix(nn.Module):
    """The units after the prefix and the network's head, as one module (exportable)."""

    def __init__(self, units: list[nn.Module], head: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.units = nn.Sequential(*units)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.units(x))


@dataclass(frozen=True)
class Window:
    """Where one changed patch is recomputed: the input crop and the output cells pasted."""

    crop_y: int
    crop_x: int
    rows: tuple[int, int]  # prefix-output cells [start, stop) that the patch can change
    cols: tuple[int, int]


def _units(network: nn.Module) -> tuple[list[nn.Module], Callable[[torch.Tensor], torch.Tensor]] | None:
    """The network's forward as a list of sequential units (candidates for the prefix) and the
    head run after the last unit; ``None`` for layouts whose forward order is not known here."""
    names = type(network).__name__
    if all(hasattr(network, a) for a in ("conv_stem", "bn1", "blocks", "forward_head")) and names in (
            "EfficientNet", "MobileNetV3"):
        stages = [block for stage in network.blocks for block in (stage if isinstance(stage, nn.Sequential) else [stage])]
        if names == "EfficientNet":
            def head(x: torch.Tensor) -> torch.Tensor:
                return network.forward_head(network.bn2(network.conv_head(x)))
        else:
            head = network.forward_head
        return [network.conv_stem, network.bn1, *stages], head
    layers = [getattr(network, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(layer, nn.Sequential) for layer in layers) and hasattr(network, "conv1") and hasattr(network, "fc"):
        activation = getattr(network, "relu", None) or getattr(network, "act1", None)
        if activation is None or not hasattr(network, "maxpool") or not hasattr(network, "bn1"):
            return None
        if hasattr(network, "forward_head"):  # timm ResNet
            head = network.forward_head
        else:  # torchvision ResNet
            def head(x: torch.Tensor) -> torch.Tensor:
                return network.fc(torch.flatten(network.avgpool(x), 1))
        blocks = [block for layer in layers for block in layer]
        return [network.conv1, network.bn1, activation, network.maxpool, *blocks], head
    return None


def known_layout(network: nn.Module) -> bool:
    """Whether :func:`split_network` knows ``network``'s forward order (it then probes once)."""
    return _units(network) is not None


def _local_geometry(units: list[nn.Module], example: torch.Tensor) -> list[tuple[int, int]] | None:
    """(stride, reach) after each unit, measured on one forward of ``example``; ``None`` when a
    unit's output is not a feature map whose size is the input's divided by its stride."""
    height = example.shape[-2]
    seen: list[tuple[nn.Module, int]] = []
    hooks = [module.register_forward_pre_hook(lambda m, inputs: seen.append((m, inputs[0].shape[-2])))
             for unit in units for module in unit.modules()
             if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    geometry: list[tuple[int, int]] = []
    reach = 0
    try:
        x = example
        with torch.no_grad():
            for unit in units:
                seen.clear()
                x = unit(x)
                for module, size in seen:
                    jump = height // size if size else 0
                    kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,)
                    dilation = getattr(module, "dilation", 1)
                    dilation = dilation if isinstance(dilation, tuple) else (dilation,)
                    reach += (max(kernel) - 1) * max(dilation) * jump
                if x.dim() != 4 or height % x.shape[-2] or example.shape[-1] % x.shape[-1]:
                    return geometry or None
                if height // x.shape[-2] != example.shape[-1] // x.shape[-1]:
                    return geometry or None
                geometry.append((height // x.shape[-2], reach))
    finally:
        for hook in hooks:
            hook.remove()
    return geometry


def crop_side(patch: int, stride: int, reach: int) -> int:
    """Side of the input crop that recomputes every cell a ``patch``-pixel patch can change."""
    side = patch + 4 * reach + 4 * stride
    return -(-side // stride) * stride


def split_network(network: nn.Module, example: torch.Tensor, patch: int,
                  max_crop_fraction: float = 0.5) -> NetworkSplit | None:
    """The deepest prefix whose crop for a ``patch``-pixel patch is at most ``max_crop_fraction``
    of the image side; ``None`` when the layout is unknown or no prefix is worth it."""
    found = _units(network)
    if found is None:
        return None
    units, head = found
    geometry = _local_geometry(units, example[:1])
    if not geometry:
        return None
    height, width = example.shape[-2:]
    best = None
    for count, (stride, reach) in enumerate(geometry, start=1):
        side = crop_side(patch, stride, reach)
        if side > max_crop_fraction * min(height, width) or height % stride or width % stride:
            break
        best = count, stride, reach
    if best is None or best[0] < 2:
        return None
    count, stride, reach = best
    return NetworkSplit(nn.Sequential(*units[:count]), _Suffix(units[count:], head), stride, reach, count)


def window_for(box: tuple[int, int, int, int], size: tuple[int, int], split: NetworkSplit,
               side: int) -> Window | None:
    """The crop (``side`` px, aligned to the stride) and the output cells to paste for a
    changed input ``box`` = (top, left, bottom, right); ``None`` when no valid crop exists."""
    stride, reach = split.stride, split.reach
    spans = []
    for start, stop, full in ((box[0], box[2], size[0]), (box[1], box[3], size[1])):
        first = max(0, (start - reach) // stride)
        last = min(full // stride, -(-(stop + reach) // stride))  # exclusive
        origin = ((start - 2 * reach - stride) // stride) * stride
        origin = min(max(origin, 0), full - side)
        valid_low = origin == 0 or first * stride - reach >= origin
        valid_high = origin + side == full or (last - 1) * stride + stride - 1 + reach < origin + side
        if side > full or not (valid_low and valid_high):
            return None
        spans.append((origin, (first, last)))
    return Window(spans[0][0], spans[1][0], spans[0][1], spans[1][1])


Run = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]


class IncrementalForward:
    """Logits of patch sets (int bitmask keys over a ``grid x grid`` lattice) through a split
    network, keeping each set's prefix output so that a later set one patch away from it only
    runs a crop. ``run(network, batch)`` applies the caller's inference mode and precision."""

    CACHE_BYTES = 64 << 20  # prefix outputs kept (LRU); ~300 kB each for efficientnet_lite0 at 224 px

    def __init__(self, split: NetworkSplit, windows: dict[int, Window], side: int, run: Run) -> None:
        self.split = split
        self.windows = windows
        self.side = side
        self.run = run
        self.prefixes: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.limit = 0

    @classmethod
    def build(cls, network: nn.Module, example: torch.Tensor, edges_y: Sequence[int], edges_x: Sequence[int],
              run: Run) -> IncrementalForward | None:
        """For the patch lattice with pixel ``edges``; ``None`` when ``network`` cannot be split."""
        patch = max(max(b - a for a, b in zip(e, e[1:])) for e in (edges_y, edges_x))
        split = split_network(network, example, patch)
        if split is None:
            return None
        side = crop_side(patch, split.stride, split.reach)
        size = tuple(example.shape[-2:])
        grid = len(edges_x) - 1
        windows = {}
        for index in range(grid * grid):
            r, c = divmod(index, grid)
            window = window_for((edges_y[r], edges_x[c], edges_y[r + 1], edges_x[c + 1]), size, split, side)
            if window is not None:
                windows[index] = window
        return cls(split, windows, side, run) if windows else None

    def parent(self, key: int) -> int | None:
        """A set with a kept prefix output that differs from ``key`` in one patch, or ``None``."""
        for patch in self.windows:
            parent = key ^ (1 << patch)
            if parent in self.prefixes:
                self.prefixes.move_to_end(parent)
                return parent
        return None

    def _remember(self, key: int, prefix: torch.Tensor) -> None:
        self.prefixes[key] = prefix
        if not self.limit:
            self.limit = max(8, self.CACHE_BYTES // max(1, prefix.numel() * prefix.element_size()))
        while len(self.prefixes) > self.limit:
            self.prefixes.popitem(last=False)

    def whole(self, keys: list[int], images: torch.Tensor) -> torch.Tensor:
        """Logits of whole ``images`` (of ``keys``), keeping their prefix outputs."""
        prefix = self.run(self.split.prefix, images)
        for row, key in enumerate(keys):
            self._remember(key, prefix[row:row + 1].clone())
        return self.run(self.split.suffix, prefix)

    def windows_of(self, pairs: list[tuple[int, int]]) -> list[Window]:
        """The window of the one patch each (key, parent) pair differs in."""
        return [self.windows[(key ^ parent).bit_length() - 1] for key, parent in pairs]

    def changed(self, pairs: list[tuple[int, int]], windows: list[Window], crops: torch.Tensor) -> torch.Tensor:
        """Logits of the (key, parent) children, given each one's masked input cut to its
        window (``side`` pixels square): the crops run through the prefix and are pasted into
        the parents' kept prefix outputs."""
        split = self.split
        patched = self.run(split.prefix, crops)
        maps = torch.cat([self.prefixes[parent] for _, parent in pairs])
        for row, w in enumerate(windows):
            (r0, r1), (c0, c1) = w.rows, w.cols
            y, x = w.crop_y // split.stride, w.crop_x // split.stride
            maps[row, :, r0:r1, c0:c1] = patched[row, :, r0 - y:r1 - y, c0 - x:c1 - x]
        for row, (key, _) in enumerate(pairs):
            self._remember(key, maps[row:row + 1].clone())
        return self.run(split.suffix, maps.contiguous(memory_format=torch.channels_last))


__all__ = ["IncrementalForward", "NetworkSplit", "Window", "crop_side", "known_layout", "split_network",
           "window_for"]
