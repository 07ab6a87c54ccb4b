"""Self-contained HTML report of a train or benchmark run (plots embedded as base64 PNG).

Plots: NDCG@10 / Recall@10 of every model with bootstrap intervals, candidate recall by source,
LightGBM feature importance (gain), and the ranker's paired gain over the no-LLM ablation and the
baselines. Tables: every model's metrics, the cold-start slice, training groups.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METRIC_KEYS = ("ndcg@10", "recall@10", "recall@50", "mrr", "coverage@10")
RANKER_COLOR = "#1f6feb"
OTHER_COLOR = "#8c959f"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metric_bars(models: dict[str, dict[str, Any]]) -> str:
    """NDCG@10 and Recall@10 per model with 95% bootstrap intervals."""
    names = sorted(models, key=lambda n: -models[n]["ndcg@10"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("ndcg@10", "recall@10"), strict=True):
        values = [models[n][key] for n in names]
        ci = [models[n].get(f"{key}_ci95", [models[n][key]] * 2) for n in names]
        err = [
            [v - c[0] for v, c in zip(values, ci, strict=True)],
            [c[1] - v for v, c in zip(values, ci, strict=True)],
        ]
        colors = [RANKER_COLOR if n.startswith("ranker") else OTHER_COLOR for n in names]
        ax.bar(names, values, yerr=err, color=colors, capsize=3)
        ax.set_title(f"{key} (95% bootstrap CI)")
        ax.tick_params(axis="x", rotation=35)
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def recall_bars(recall: dict[str, float]) -> str:
    """Share of target items each candidate source retrieves, and the union ('all')."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(recall)
    ax.bar(
        names, [recall[n] for n in names], color=[RANKER_COLOR if n == "all" else OTHER_COLOR for n in names]
    )
    ax.set_ylim(0, 1)
    ax.set_title("candidate recall by source (test targets)")
    ax.tick_params(axis="x", rotation=35)
    plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def importance_bars(importance: dict[str, float], top: int = 25) -> str:
    """LightGBM gain share of the most important features."""
    items = list(importance.items())[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(items) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items], color=RANKER_COLOR)
    ax.set_title("feature importance (share of gain)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def gain_bars(comparisons: dict[str, dict[str, Any]]) -> str:
    """Paired gain of the ranker over each other model (mean difference with 95% interval)."""
    names = list(comparisons)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(names) + 1.5), gridspec_kw={"wspace": 0.5})
    for ax, key in zip(axes, ("ndcg@10", "recall@10"), strict=True):
        diffs = [comparisons[n][key]["diff"] for n in names]
        lo = [d - comparisons[n][key]["ci95"][0] for d, n in zip(diffs, names, strict=True)]
        hi = [comparisons[n][key]["ci95"][1] - d for d, n in zip(diffs, names, strict=True)]
        labels = [n.replace("ranker_vs_", "vs ") for n in names]
        colors = [RANKER_COLOR if "no_llm" in n else OTHER_COLOR for n in names]
        ax.barh(labels, diffs, xerr=[lo, hi], color=colors, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"ranker gain in {key} (paired, 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metrics_rows(models: dict[str, dict[str, Any]], slice_name: str | None = None) -> list[list[str]]:
    rows = []
    for name in sorted(models, key=lambda n: -models[n]["ndcg@10"]):
        m = models[name] if slice_name is None else models[name].get("slices", {}).get(slice_name)
        if not m:
            continue
        lo, hi = m.get("ndcg@10_ci95", [0.0, 0.0])
        rows.append(
            [name]
            + [f"{m[k]:.4f}" if k in m else "" for k in METRIC_KEYS]
            + [
                f"{m.get('ndcg@10_std', 0.0):.4f}",
                f"[{lo:.4f}, {hi:.4f}]",
                str(m.get("users", "")),
                str(m.get("runs", "")),
            ]
        )
    return rows


def build_report(results: dict[str, Any], title: str) -> str:
    """The HTML page for ``results`` as returned by ``train.evaluate_stages`` (plus run fields)."""
    models = results["models"]
    header = ["model", *METRIC_KEYS, "NDCG@10 std (seeds)", "NDCG@10 95% CI", "users", "seeds"]
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>protocol: <b>{html.escape(str(results.get('protocol', '')))}</b>; "
        f"test users: {results.get('training', {}).get('test_users', '')}; "
        f"{html.escape(str(results.get('dataset', results.get('windows', ''))))}</p>",
        "<h2>Models</h2>",
        _table(_metrics_rows(models), header),
        f'<img alt="metrics" src="{metric_bars(models)}">',
        "<h2>Cold-start slice (test items with few known interactions)</h2>",
        _table(_metrics_rows(models, "cold_items"), header),
    ]
    if results.get("comparisons"):
        sections += [
            "<h2>Gain of the ranker (paired over the same users)</h2>",
            f'<img alt="gain" src="{gain_bars(results["comparisons"])}">',
        ]
    recall = results.get("candidate_recall", {}).get("test")
    if recall:
        sections += ["<h2>Candidate recall</h2>", f'<img alt="candidate recall" src="{recall_bars(recall)}">']
    if results.get("feature_importance"):
        sections += [
            "<h2>Feature importance</h2>",
            f'<img alt="feature importance" src="{importance_bars(results["feature_importance"])}">',
        ]
    stages = results.get("training", {}).get("stages", {})
    if stages:
        rows = [
            [name, str(s["users"]), str(s["users_with_positive"]), str(s["rows"])]
            for name, s in stages.items()
        ]
        sections += [
            "<h2>Stages</h2>",
            _table(rows, ["stage", "users", "users with target in candidates", "rows"]),
        ]
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #d0d7de;padding:4px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>"
    )
