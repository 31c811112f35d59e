"""The state dict a tensor table reads from: every name taken once, so leftovers show.

Each table (:mod:`.native`, :mod:`.original`, :mod:`.experts`) pops the tensors it maps;
what none of them took is a tensor the config does not describe, reported with one line
instead of being dropped. Derived buffers (``rotary_emb.inv_freq``, Transformer Engine's
``_extra_state``) are rebuilt from the config, so they are never asked for nor reported.
"""

from __future__ import annotations

from typing import Mapping, Optional

from torch import Tensor

from megatron_mpo.errors import UserError

__all__ = ["TensorSource"]

_DERIVED_SUFFIXES = ("inv_freq", "_extra_state")


class TensorSource:
    """Pops tensors by name (``side`` names the checkpoint in messages)."""

    def __init__(self, sd: Mapping[str, Tensor], side: str):
        self.sd = {k: v for k, v in sd.items() if not k.endswith(_DERIVED_SUFFIXES)}
        self.side = side

    def pop(self, key: str, shape: Optional[tuple] = None) -> Tensor:
        """The tensor ``key``; with ``shape``, it must have that shape."""
        if key not in self.sd:
            raise UserError(f"{self.side} checkpoint lacks tensor {key!r}; checkpoint and config do not match")
        t = self.sd.pop(key)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise UserError(
                f"{self.side} tensor {key!r} has shape {list(t.shape)} but the config implies {list(shape)}"
            )
        return t

    def maybe(self, key: str) -> Optional[Tensor]:
        return self.sd.pop(key, None)

    def finish(self) -> None:
        """Refuse what no table entry took."""
        if self.sd:
            left = sorted(self.sd)
            more = f" (+{len(left) - 5} more)" if len(left) > 5 else ""
            raise UserError(f"{self.side} checkpoint has unmapped tensors: {', '.join(left[:5])}{more}; "
                            "checkpoint and config do not match")
