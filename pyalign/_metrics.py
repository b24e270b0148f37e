"""The metrics a loss returns (preference losses, policy-gradient losses), named as TRL logs them."""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


class Metrics(Mapping):
    """Detached batch metrics, named as TRL logs them; values are 0-d tensors on the loss's device.

    Unpaired losses (KTO, BCO) give NaN for the means of an empty class.
    """

    __slots__ = ("values", "_index")

    def __init__(self, values: Tensor, index: dict):
        self.values = values
        self._index = index

    def __getitem__(self, name: str) -> Tensor:
        return self.values[self._index[name]]

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def to_floats(self) -> dict:
        """All metrics as Python floats (one device-to-host copy)."""
        v = self.values.tolist()
        return {k: v[i] for k, i in self._index.items()}

    def __repr__(self) -> str:
        return f"Metrics({self.to_floats()})"
