"""``apparate report RUN_DIR``: the accuracy constraint checked from a run's per-request record.

Everything is recomputed from ``requests_log.csv`` and ``run.json`` (``apparate.runtime.record``):
each request's term ``observed / propensity * disagreed`` (its disagreement with the unmodified
model where every request is observed, an unbiased estimate of it otherwise), and from the terms:

- the cumulative disagreement with an anytime-valid confidence sequence (betting; it holds at
  every point of the run at once, for exchangeable requests);
- per window of ``window`` consecutive requests, its disagreement rate with an interval: exact
  (Clopper-Pearson) when every request was observed (release mode), a betting interval on the
  weighted terms otherwise (compact mode);
- how many windows stayed within the constraint, the worst window, the exits per site.

Writes ``report.json`` and ``report.png`` (windows with their intervals against epsilon above,
the cumulative rate and its confidence sequence below).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from apparate.control.guarantee import betting_bounds, betting_upper, clopper_pearson
from apparate.runtime.record import read_log


def _window_interval(terms: np.ndarray, bound: float, exact: bool, delta: float):
    if exact:
        return clopper_pearson(int(round(terms.sum())), terms.size, delta)
    upper = betting_upper(terms, bound, delta / 2)
    lower = betting_bounds(terms, bound, delta / 2, side="lower", anytime=False,
                           every=terms.size)[-1]
    return float(lower), float(upper)


def compute(run_dir, window: int = 128, delta: float = 0.05) -> dict:
    """The report's figures (module doc) as a dict."""
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    meta, log = read_log(run_dir)
    epsilon = float(meta["accuracy_constraint"])
    terms = np.where(log["observed"] & log["disagreed"], 1.0 / log["propensity"], 0.0)
    n = terms.size
    bound = float(1.0 / log["propensity"].min()) if n else 1.0
    exact = bool(n and log["observed"].all() and (log["propensity"] == 1).all())
    every = max(1, window)
    upper = betting_bounds(terms, bound, delta / 2, every=every) if n else np.zeros(0)
    lower = betting_bounds(terms, bound, delta / 2, side="lower", every=every) if n else np.zeros(0)
    marks = np.minimum(np.arange(every, n + every, every), n)
    cumulative = np.cumsum(terms)[marks - 1] / marks if n else np.zeros(0)
    windows = []
    for start in range(0, n - window + 1, window):
        part = terms[start:start + window]
        lo, hi = _window_interval(part, bound, exact, delta)
        windows.append({"start": start, "rate": float(part.mean()), "lower": lo, "upper": hi})
    rates = np.array([w["rate"] for w in windows])
    sites = meta.get("sites", [])
    exits = {("final" if s < 0 else (sites[s] if s < len(sites) else str(s))): int(c)
             for s, c in zip(*np.unique(log["exit_site"], return_counts=True))}
    return {
        "run": str(run_dir), "requests": int(n), "accuracy_constraint": epsilon,
        "guarantee": meta.get("guarantee"), "mode": meta.get("mode"), "delta": delta,
        "exact": exact, "window": window,
        "disagreement": float(terms.mean()) if n else 0.0,
        "disagreement_interval": [float(lower[-1]), float(upper[-1])] if n else [0.0, 1.0],
        "agreement": 1.0 - float(terms.mean()) if n else 1.0,
        "exit_fraction": float((log["exit_site"] >= 0).mean()) if n else 0.0,
        "exits": exits,
        "windows": len(windows),
        "windows_within_constraint": float((rates <= epsilon + 1e-12).mean()) if windows else 1.0,
        "worst_window": float(rates.max()) if windows else 0.0,
        "windows_upper_above_constraint": int(sum(w["lower"] > epsilon for w in windows)),
        "sequence": {"at": marks.tolist(), "rate": cumulative.tolist(),
                     "lower": lower.tolist(), "upper": upper.tolist()},
        "window_rates": windows,
    }


def plot(report: dict, path) -> None:
    """Windows with their intervals against epsilon, and the cumulative rate with its
    confidence sequence."""
    from apparate.demo._extra import require

    plt = require("matplotlib.pyplot")
    epsilon = report["accuracy_constraint"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    windows = report["window_rates"]
    if windows:
        x = np.array([w["start"] + report["window"] / 2 for w in windows])
        rate = np.array([w["rate"] for w in windows])
        err = np.array([[w["rate"] - w["lower"] for w in windows],
                        [w["upper"] - w["rate"] for w in windows]])
        inside = rate <= epsilon + 1e-12
        top.errorbar(x[inside], rate[inside], yerr=err[:, inside], fmt="o", ms=3, lw=0.8,
                     color="tab:blue", label="window within the constraint")
        top.errorbar(x[~inside], rate[~inside], yerr=err[:, ~inside], fmt="o", ms=3, lw=0.8,
                     color="tab:red", label="window above the constraint")
    top.axhline(epsilon, color="black", ls="--", lw=1, label=f"constraint {epsilon:g}")
    kind = "exact" if report["exact"] else "betting"
    top.set_ylabel(f"disagreement per {report['window']} requests")
    top.set_title(f"{report['requests']} requests, {report['guarantee']} mode, "
                  f"{report['mode']} mode\n{report['windows_within_constraint']:.1%} of windows "
                  f"within the constraint ({kind} {1 - report['delta']:.0%} intervals)",
                  fontsize=10)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    seq = report["sequence"]
    if seq["at"]:
        bottom.fill_between(seq["at"], seq["lower"], seq["upper"], color="tab:blue", alpha=0.2,
                            label=f"{1 - report['delta']:.0%} confidence sequence")
        bottom.plot(seq["at"], seq["rate"], color="tab:blue", label="cumulative disagreement")
    bottom.axhline(epsilon, color="black", ls="--", lw=1, label=f"constraint {epsilon:g}")
    bottom.set_xlabel("request")
    bottom.set_ylabel("cumulative disagreement")
    bottom.set_ylim(0, max(3 * epsilon, max(seq["upper"][len(seq["upper"]) // 4:], default=0)))
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(run_dir, out=None, window: int = 128, delta: float = 0.05, plots: bool = True) -> dict:
    """Compute the report of ``run_dir`` and write report.json (and report.png) to ``out``
    (default: the run directory)."""
    report = compute(run_dir, window, delta)
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if plots:
        plot(report, out / "report.png")
    return report


def summary(report: dict) -> str:
    lo, hi = report["disagreement_interval"]
    return (f"{report['requests']} requests ({report['guarantee']}, {report['mode']} mode): "
            f"disagreement {report['disagreement']:.3%} [{lo:.3%}, {hi:.3%}] against the "
            f"constraint {report['accuracy_constraint']:.2%}; "
            f"{report['windows_within_constraint']:.1%} of {report['windows']} windows of "
            f"{report['window']} within it (worst {report['worst_window']:.2%}); "
            f"{report['exit_fraction']:.1%} of requests exited early")
