"""Independent float64 numpy references for the statistics (written from the definitions)."""

from __future__ import annotations

import numpy as np


def np64(t) -> np.ndarray:
    return t.detach().double().cpu().numpy() if hasattr(t, "detach") else np.asarray(t, float)


def summary(g: np.ndarray) -> tuple[float, float, float, float]:
    """(sum of squares over finite, max |.| over finite, non-finite count, numel)."""
    g = np.asarray(g, dtype=np.float64).ravel()
    fin = np.isfinite(g)
    x = g[fin]
    return (float(np.sum(x * x)), float(np.max(np.abs(x))) if x.size else 0.0,
            float((~fin).sum()), float(g.size))


def units(g: np.ndarray, layout: str) -> np.ndarray:
    """(units, fan) matrix, written out per layout (not via gradlens.roles)."""
    if layout in ("conv1d", "embedding"):
        return g.T
    if layout == "other":
        return g.reshape(g.shape[0], -1)
    return g


def rms_rows(m: np.ndarray) -> np.ndarray:
    out = []
    for row in m:
        x = row[np.isfinite(row)]
        out.append(np.sqrt(np.mean(x * x)) if x.size else np.nan)
    return np.array(out)


def gini(x: np.ndarray) -> float:
    """Mean absolute difference over twice the mean (population form)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if x.sum() == 0:
        return 0.0
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * x.mean()))


def spread(r: np.ndarray) -> np.ndarray:
    x = np.asarray(r, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.full(4, np.nan)

    def ratio(a: float, b: float) -> float:
        if a == b:
            return 1.0
        return a / b if b != 0 else np.inf

    mean = x.mean()
    std = x.std()
    cv = 0.0 if std == 0 else std / mean
    return np.array([
        cv,
        ratio(x.max(), x.min()),
        ratio(np.percentile(x, 99), np.percentile(x, 50)),
        gini(x),
    ])


def ema_zscore(xs: list[list[float]], alpha: float, threshold: float, warmup: int,
               min_std: float, clip: bool):
    """Scalar python loop of the z-score detector, one series per column."""
    L = len(xs[0])
    mean = [0.0] * L
    var = [0.0] * L
    count = [0] * L
    zs, flags = [], []
    for row in xs:
        zr, fr = [], []
        for i, x in enumerate(row):
            s = max(np.sqrt(max(var[i], 0.0)), min_std)
            armed = count[i] >= warmup
            if not np.isfinite(x):
                zr.append(np.nan)
                fr.append(False)
                continue
            z = (x - mean[i]) / s
            zr.append(z if armed else np.nan)
            fr.append(bool(armed and z > threshold))
            v = x
            if clip and armed:
                v = min(max(v, mean[i] - threshold * s), mean[i] + threshold * s)
            w = max(1.0 / (count[i] + 1), 1 - alpha)
            delta = v - mean[i]
            mean[i] += w * delta
            var[i] = (1 - w) * (var[i] + w * delta * delta)
            count[i] += 1
        zs.append(zr)
        flags.append(fr)
    return np.array(zs), np.array(flags)
