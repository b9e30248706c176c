"""Device constants the collector and its families reuse: made once, never per step (made
from Python data each step they would be a host-to-device copy in the hot path)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class DeviceConstants:
    """Mixed into :class:`gradlens.GradLens`; needs ``device``, ``dtype``, ``layers``,
    ``numel`` and a ``_consts`` dict."""

    device: torch.device | None
    dtype: torch.dtype
    numel: list[int]
    _consts: dict[str | tuple, torch.Tensor]

    def const(self, key: str) -> torch.Tensor:
        """``zero``, ``nan`` (0-d), ``nan_vec`` and ``numel`` (one entry per layer)."""
        t = self._consts.get(key)
        if t is None:
            L, kw = len(self.layers), {"device": self.device, "dtype": self.dtype}
            t = {"zero": lambda: torch.zeros((), **kw),
                 "nan": lambda: torch.full((), math.nan, **kw),
                 "nan_vec": lambda: torch.full((L,), math.nan, **kw),
                 "numel": lambda: torch.tensor(self.numel, **kw)}[key]()
            self._consts[key] = t
        return t

    def mask(self, flags: Sequence[bool]) -> torch.Tensor:
        """A device bool vector, made once per pattern (keyed by the tuple: no string built
        per call, this runs at every step)."""
        key = ("mask", tuple(flags))
        t = self._consts.get(key)
        if t is None:
            t = self._consts[key] = torch.tensor(list(flags), device=self.device)
        return t

    def flags(self, flags: Sequence[bool]) -> torch.Tensor:
        """A device 0/1 vector (accumulation dtype), made once per pattern."""
        key = "flags:" + "".join(["1" if f else "0" for f in flags])
        if key not in self._consts:
            self._consts[key] = torch.tensor(list(flags), device=self.device, dtype=self.dtype)
        return self._consts[key]

    def const_index(self, ks: tuple[int, ...]) -> torch.Tensor:
        key = "index:" + ",".join(map(str, ks))
        if key not in self._consts:
            self._consts[key] = torch.tensor(ks, device=self.device, dtype=torch.long)
        return self._consts[key]

    def const_values(self, values: tuple[float, ...]) -> torch.Tensor:
        """A device vector (accumulation dtype) of these values, made once per tuple."""
        key = "values:" + ",".join(map(repr, values))
        if key not in self._consts:
            self._consts[key] = torch.tensor(values, device=self.device, dtype=self.dtype)
        return self._consts[key]
