"""The bytes autograd saves for backward during a forward, counted by storage: a tensor that several operations
save (the normed input that q, k and v read) counts once, as it does in memory."""

from __future__ import annotations

import torch


class saved_bytes:
    """`with saved_bytes(model) as saved: <forward>`, then `saved.total`: the bytes of the distinct storages saved
    inside, the parameters of `model` (when given) left out."""

    def __init__(self, model: torch.nn.Module | None = None):
        self.parameters = {p.data_ptr() for p in model.parameters()} if model is not None else set()
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in self.parameters:
            self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
