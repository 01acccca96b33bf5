"""The patch lattice of patch-set methods: crisp rectangles, and patch sets as int bitmasks.

Patch ``p = row * grid + col``; pixel edges ``round(i * size / grid)``; a set of patches is the
int whose bit ``p`` is set for every patch ``p`` it keeps.
"""

from __future__ import annotations

from collections.abc import Iterable


def patch_edges(size: int, grid: int) -> tuple[int, ...]:
    """Pixel boundaries of ``grid`` crisp patches along a side of ``size`` pixels."""
    return tuple(round(i * size / grid) for i in range(grid + 1))


def patches_of(key: int) -> tuple[int, ...]:
    """The patch indices of a bitmask key, ascending."""
    out = []
    index = 0
    while key:
        if key & 1:
            out.append(index)
        key >>= 1
        index += 1
    return tuple(out)


def key_of(patches: Iterable[int]) -> int:
    """The bitmask key of a patch set."""
    key = 0
    for patch in patches:
        key |= 1 << int(patch)
    return key


__all__ = ["key_of", "patch_edges", "patches_of"]
