"""A subsampled per-example estimate: m of each micro-batch's b examples (``per_example_sample``).

The per-example estimators read, per micro-batch, ``S = sum_b q_b`` (``q_b`` an example's
squared gradient norm in the hooks' scale, :mod:`gradlens.families.per_example`). Drawing m of
the b examples uniformly without replacement (the set ``I``) and taking

    S_hat = (b / m) sum_{i in I} q_i,        E S_hat = S

(each example is in ``I`` with probability m/b) keeps every estimator linear in ``S``
unbiased: ``pe_trace`` and ``pe_signal`` (their ratio ``pe_noise_scale`` and the EMA ratio
``critical_batch_size`` are ratios, biased as before). The price is the sampling variance of a
without-replacement total,

    Var S_hat = b^2 (1 - m/b) s_q^2 / m,     s_q^2 = sum_b (q_b - S/b)^2 / (b - 1),

which adds ``(sum_k f_k^2 Var S_hat_k) / (n^2 (1 - c)^2)`` to ``pe_trace``'s variance (``f_k``
the micro-batch's scale factor, ``n`` the step's examples, ``c`` as in the family): zero at
m = b, and about ``b/m - 1`` times the within-batch spread of the ``q_b`` otherwise. The saving:
the Gram matrices and products of m examples instead of b (``m/b`` of the per-example FLOPs;
the decomposition self-check still reads all b).

One draw per micro-batch (keyed by its index in the step), shared by every layer and by every
call of a repeated module, so cross terms pair an example with itself. The draws come from a
generator on the gradients' device (seeded with ``seed``; no host sync, the same draws for the
same run).
"""

from __future__ import annotations

from typing import Any

import torch


class ExampleSample:
    """Which ``m`` examples of a micro-batch of ``b`` are read (None: all of them)."""

    def __init__(self, m: int, seed: int = 0) -> None:
        self.m, self.seed = m, seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._draws: dict[tuple[int, int], torch.Tensor] = {}

    def reset(self) -> None:
        self._draws.clear()

    def indices(self, micro: int, b: int, device: torch.device) -> torch.Tensor | None:
        """The examples of micro-batch ``micro`` (of ``b``) to read, on ``device``."""
        if self.m <= 0 or self.m >= b:
            return None
        idx = self._draws.get((micro, b))
        if idx is None:
            gen = self._generators.get(device)
            if gen is None:
                gen = self._generators[device] = torch.Generator(device=device)
                gen.manual_seed(self.seed)
            idx = torch.randperm(b, generator=gen, device=device)[:self.m]
            self._draws[(micro, b)] = idx
        return idx


def take(factors: Any, idx: torch.Tensor, lead: int) -> Any:
    """The per-example factors (batch dimension first) of the examples ``idx`` only."""
    return type(factors)(*(t.index_select(0, idx) if torch.is_tensor(t) and t.ndim
                           and t.shape[0] == lead else t for t in factors))
