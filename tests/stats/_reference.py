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


def forecast_zscore(xs: list[list[float]], threshold: float, alpha: float, level_alpha: float,
                    trend: float, warmup: int, min_std: float, clip: bool):
    """Scalar python loop of the detector (Holt level + slope, residual z-score), per column."""
    L = len(xs[0])
    level, slope, var, count = [0.0] * L, [0.0] * L, [0.0] * L, [0] * L
    zs, flags = [], []
    for row in xs:
        zr, fr = [], []
        for i, x in enumerate(row):
            if not np.isfinite(x):
                zr.append(np.nan)
                fr.append(False)
                continue
            s = max(np.sqrt(max(var[i], 0.0)), min_std) + (1e-12 if min_std == 0 else 0.0)
            pred = level[i] + slope[i]
            r = x - pred
            armed = count[i] >= warmup
            zr.append(r / s if armed else np.nan)
            fr.append(bool(armed and r / s > threshold))
            if count[i] == 0:
                level[i], slope[i], var[i] = x, 0.0, 0.0
            else:
                if clip and armed:
                    r = min(max(r, -threshold * s), threshold * s)
                wv = max(1.0 / count[i], 1 - alpha)
                wl = max(1.0 / (count[i] + 1), 1 - level_alpha)
                var[i] = (1 - wv) * var[i] + wv * r * r
                new_level = pred + wl * r
                slope[i] += trend * ((new_level - level[i]) - slope[i])
                level[i] = new_level
            count[i] += 1
        zs.append(zr)
        flags.append(fr)
    return np.array(zs), np.array(flags)


def scale_normalize(g: np.ndarray, layout: str) -> np.ndarray:
    m = g.T if layout == "embedding" else g
    r = np.maximum(np.sqrt((m**2).mean(1, keepdims=True)), 1e-8)
    out = m / r
    return out.T if layout == "embedding" else out


def temporal_reference(gs, beta: float, unbiased: bool):
    """Weighted mean/variance over the finite steps, weights beta^(age)."""
    gs = [g for g in gs if np.isfinite(g).all()]
    n = len(gs)
    w = np.array([beta ** (n - 1 - i) for i in range(n)]) * (1 - beta)
    w = w / w.sum()
    m = sum(wi * g for wi, g in zip(w, gs, strict=True))
    var = sum(wi * ((g - m) ** 2).sum() for wi, g in zip(w, gs, strict=True))
    msq = (m**2).sum()
    if unbiased:
        s2 = (w**2).sum()
        var = var / (1 - s2)
        msq = msq - s2 * var
    return var, msq
