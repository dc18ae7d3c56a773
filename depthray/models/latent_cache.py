"""A small LRU of VAE-encoded views for the Marigold engine (models/marigold.py), so the
members of a view that arrive in different calls still encode once."""

from __future__ import annotations

from collections import OrderedDict

import torch


class LatentCache:
    """Small LRU of encoded views, so members split across calls still encode once.

    Keys are cheap fingerprints; a hit is confirmed with an exact comparison, so a
    fingerprint collision can only cost an extra encode, never a wrong latent.
    """

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._items: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @staticmethod
    def key(view: torch.Tensor) -> tuple:
        flat = view.reshape(-1)
        return (tuple(view.shape), float(flat.sum()), float(flat[:: 97].sum()), float(flat[1::13].square().sum()))

    def get(self, key: tuple, view: torch.Tensor) -> torch.Tensor | None:
        hit = self._items.get(key)
        if hit is None or not torch.equal(hit[0], view):
            return None
        self._items.move_to_end(key)
        return hit[1]

    def put(self, key: tuple, view: torch.Tensor, latent: torch.Tensor) -> None:
        self._items[key] = (view, latent)
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
