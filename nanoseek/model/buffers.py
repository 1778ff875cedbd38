"""Buffers whose dtype must survive `model.to(dtype)`."""

from __future__ import annotations

import torch
from torch import nn


class FixedDtypeBuffers(nn.Module):
    """Mixin: buffers named in `fixed_dtypes` keep their dtype (and values) through `.to()`,
    `.half()`, `.to_empty()`; only their device follows the module."""

    fixed_dtypes: dict[str, torch.dtype] = {}

    def _apply(self, fn, recurse=True):
        saved = {name: getattr(self, name) for name in self.fixed_dtypes}
        super()._apply(fn, recurse)
        for name, dtype in self.fixed_dtypes.items():
            old, new = saved[name], getattr(self, name)
            if old.is_meta or new.is_meta:  # nothing to preserve: storage only
                setattr(self, name, torch.empty(old.shape, dtype=dtype, device=new.device))
            else:
                setattr(self, name, old.to(device=new.device, dtype=dtype))
        return self
