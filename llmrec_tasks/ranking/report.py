"""Self-contained HTML report of a train or benchmark run (plots embedded as base64 PNG).

From the evaluation results (train and benchmark): the LLM ablation in words with its interval,
every model's metrics, NDCG@10 / Recall@10 by segment (cold items, history length) with
intervals, plots (metrics, paired gain, candidate recall, feature importance) and the training
stages. Publish renders the page again with two more sections: the new version next to the bundle
it replaces and over earlier versions (:class:`Trend`), and what serving recommends to a few users
with its reasons (:class:`Example`).

No table shows a raw dict, and a column with the same value in every row is stated once above
its table instead.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from llmrec_tasks.ranking.baselines import PARAM_LABELS, VALID_KEY, describe_params, describe_value
from llmrec_tasks.ranking.evaluate import COLD_ITEMS, NEW_ITEMS, PRIMARY, WARM_ITEMS
from llmrec_tasks.ranking.features import ABLATIONS
from llmrec_tasks.ranking.protocols import ABLATION, ALL_WARM, RANKER, SASREC, SEQMODEL

METRIC_KEYS = ("ndcg@10", "recall@10", "recall@50", "mrr", "coverage@10")
PRIMARY_KEYS = ("ndcg@10", "recall@10")
LABELS = {
    "ndcg@10": "NDCG@10",
    "recall@10": "Recall@10",
    "recall@50": "Recall@50",
    "mrr": "MRR",
    "coverage@10": "coverage@10",
}
RANKER_COLOR = "#1f6feb"
OTHER_COLOR = "#8c959f"
MINUS = "\u2212"


@dataclass(frozen=True)
class VersionPoint:
    """One published version's ranker metrics (each measured on its own run's test window)."""

    version: str
    logical_date: str
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Trend:
    """The new version, the bundle it replaces (the current one, None if nothing was promoted),
    and earlier published versions of the namespace (oldest first)."""

    new: VersionPoint
    replaces: VersionPoint | None
    previous: Sequence[VersionPoint]


@dataclass(frozen=True)
class Example:
    """What serving recommends to one user: recent history titles (newest first) and
    ``(title, reason)`` per recommended item, as ``Recommender.recommend`` returned them."""

    user_id: str
    history_length: int
    segment: str
    history: Sequence[str]
    recommendations: Sequence[tuple[str, str]]
    strategy: str


def report_title(version: str) -> str:
    """Title of a train run's report (train and publish render the same page)."""
    return f"llmrec ranker {version}"


# --- numbers in words ----------------------------------------------------------------------------


def _num(value: float, digits: int = 4) -> str:
    """Fixed-point with a real minus sign."""
    text = f"{value:.{digits}f}"
    return MINUS + text[1:] if text.startswith("-") else text


def _signed(value: float, digits: int = 4) -> str:
    return ("+" if value >= 0 else "") + _num(value, digits)


def _interval(ci: Sequence[float], digits: int = 4) -> str:
    return f"{_num(ci[0], digits)} to {_num(ci[1], digits)}"


def ablation_sentence(
    comparison: Mapping[str, Any], metric: str = "ndcg@10", what: str = "the LLM features"
) -> str:
    """The paired ranker-minus-ablation difference in words, e.g. "Without the LLM features NDCG@10
    drops by 0.007 (95% CI −0.002 to 0.016): not significant at this sample size."; ``what`` names
    the dropped features."""
    entry = comparison[metric]
    diff, (lo, hi) = float(entry["diff"]), (float(entry["ci95"][0]), float(entry["ci95"][1]))
    label = LABELS.get(metric, metric)
    if diff >= 0:
        change, size, ci = "drops", diff, (lo, hi)
    else:  # the ablation is better: its change is the negated difference, interval flipped
        change, size, ci = "rises", -diff, (-hi, -lo)
    sentence = f"Without {what} {label} {change} by {_num(size, 3)} (95% CI {_interval(ci, 3)})"
    if lo > 0:
        verdict = f"significant, {what} improve {label}."
    elif hi < 0:
        verdict = f"significant, {what} make {label} worse."
    else:
        verdict = "not significant at this sample size."
    return f"{sentence}: {verdict}"


# --- plots ---------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metric_bars(models: dict[str, dict[str, Any]]) -> str:
    """NDCG@10 and Recall@10 per model with 95% bootstrap intervals."""
    names = sorted(models, key=lambda n: -models[n]["ndcg@10"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, PRIMARY_KEYS, strict=True):
        values = [models[n][key] for n in names]
        ci = [models[n].get(f"{key}_ci95", [models[n][key]] * 2) for n in names]
        err = [
            [v - c[0] for v, c in zip(values, ci, strict=True)],
            [c[1] - v for v, c in zip(values, ci, strict=True)],
        ]
        colors = [RANKER_COLOR if n.startswith(RANKER) else OTHER_COLOR for n in names]
        ax.bar(names, values, yerr=err, color=colors, capsize=3)
        ax.set_title(f"{LABELS[key]} (95% bootstrap CI)")
        ax.tick_params(axis="x", rotation=35)
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def recall_bars(recall: dict[str, float], targets: str = "test targets") -> str:
    """Share of target items each candidate source retrieves, and the union ('all')."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(recall)
    ax.bar(
        names, [recall[n] for n in names], color=[RANKER_COLOR if n == "all" else OTHER_COLOR for n in names]
    )
    ax.set_ylim(0, 1)
    ax.set_title(f"candidate recall by source ({targets})")
    ax.tick_params(axis="x", rotation=35)
    plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def new_item_bars(models: dict[str, dict[str, Any]]) -> str:
    """NDCG@10 per model on the new-item and warm-item targets and in total, with 95% intervals."""
    names = sorted(models, key=lambda n: -models[n]["ndcg@10"])
    parts = (("new items", NEW_ITEMS), ("warm items", WARM_ITEMS), ("total", None))
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(parts)
    for j, (label, sliced) in enumerate(parts):
        blocks = [models[n] if sliced is None else models[n].get("slices", {}).get(sliced, {}) for n in names]
        values = [b.get("ndcg@10", 0.0) for b in blocks]
        ci = [b.get("ndcg@10_ci95", [v, v]) for b, v in zip(blocks, values, strict=True)]
        err = [
            [v - c[0] for v, c in zip(values, ci, strict=True)],
            [c[1] - v for v, c in zip(values, ci, strict=True)],
        ]
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(
            xs,
            values,
            width,
            yerr=err,
            capsize=2,
            label=label,
            color=("#d1242f", OTHER_COLOR, RANKER_COLOR)[j],
        )
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_title("NDCG@10 on new-item targets, warm targets and in total (95% bootstrap CI)")
    ax.legend()
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
    for ax, key in zip(axes, PRIMARY_KEYS, strict=True):
        diffs = [comparisons[n][key]["diff"] for n in names]
        lo = [d - comparisons[n][key]["ci95"][0] for d, n in zip(diffs, names, strict=True)]
        hi = [comparisons[n][key]["ci95"][1] - d for d, n in zip(diffs, names, strict=True)]
        labels = [n.replace(f"{RANKER}_vs_", "vs ") for n in names]
        colors = [
            RANKER_COLOR if n.removeprefix(f"{RANKER}_vs_") in ABLATIONS else OTHER_COLOR for n in names
        ]
        ax.barh(labels, diffs, xerr=[lo, hi], color=colors, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"ranker gain in {LABELS[key]} (paired, 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def trend_lines(points: Sequence[VersionPoint]) -> str:
    """NDCG@10 and Recall@10 of the ranker per published version, the new one last."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    labels = [f"{p.logical_date[:10]} {p.version.rsplit('-', 1)[-1]}" for p in points]  # date + params hash
    for ax, key in zip(axes, PRIMARY_KEYS, strict=True):
        xs = [i for i, p in enumerate(points) if key in p.metrics]
        ax.plot(xs, [points[i].metrics[key] for i in xs], marker="o", color=OTHER_COLOR)
        if xs and xs[-1] == len(points) - 1:
            ax.plot([xs[-1]], [points[-1].metrics[key]], marker="o", ms=9, color=RANKER_COLOR)
        ax.set_xticks(range(len(points)), labels, rotation=35, ha="right", rotation_mode="anchor")
        ax.set_title(f"ranker {LABELS[key]} by version (new version in blue)")
        ax.grid(alpha=0.3)
    return _png(fig)


# --- tables --------------------------------------------------------------------------------------


def _table(rows: list[list[str]], header: list[str]) -> str:
    """An HTML table; a column (other than the first) with one value in all of several rows is
    stated once above the table instead."""
    keep = list(range(len(header)))
    constant: list[str] = []
    if len(rows) > 1:
        same = [j for j in keep[1:] if len({row[j] for row in rows}) == 1]
        constant = [f"{header[j]} {rows[0][j]}" for j in same if rows[0][j]]
        keep = [j for j in keep if j not in same]
    head = "".join(f"<th>{html.escape(header[j])}</th>" for j in keep)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(row[j])}</td>" for j in keep) + "</tr>" for row in rows
    )
    note = f"<p class='note'>In every row: {html.escape('; '.join(constant))}.</p>" if constant else ""
    return f"{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ci_cell(m: Mapping[str, Any], key: str) -> str:
    ci = m.get(f"{key}_ci95")
    return f"{_num(m[key])} ({_interval(ci)})" if ci else _num(m[key])


def _models_table(models: dict[str, dict[str, Any]]) -> str:
    header = ["model", *(LABELS[k] for k in METRIC_KEYS), "NDCG@10 95% CI", "NDCG@10 std over seeds"]
    header += ["users", "seeds"]
    rows = []
    for name in sorted(models, key=lambda n: -models[n]["ndcg@10"]):
        m = models[name]
        row = [name, *(_num(m[k]) if k in m else "" for k in METRIC_KEYS)]
        row.append(_interval(m["ndcg@10_ci95"]) if "ndcg@10_ci95" in m else "")
        row.append(_num(m["ndcg@10_std"]) if "ndcg@10_std" in m else "")
        rows.append([*row, str(m.get("users", "")), str(m.get("runs", ""))])
    return _table(rows, header)


SLICE_LABELS = {
    COLD_ITEMS: "cold target items (few interactions known)",
    NEW_ITEMS: "new target items (no interaction known)",
    WARM_ITEMS: "warm target items",
}


def _segment_label(name: str) -> str:
    return SLICE_LABELS.get(name, name.replace("history", "history length"))


def segments_table(models: dict[str, dict[str, Any]]) -> str:
    """NDCG@10 and Recall@10 (95% intervals) of the ranker per slice, with the ablation and
    popularity NDCG@10 beside; slices without users are left out."""
    ranker = models.get(RANKER, {})
    others = [name for name in (ABLATION, "popularity") if name in models]
    header = ["segment", "users", "ranker NDCG@10 (95% CI)", "ranker Recall@10 (95% CI)"]
    header += [f"{name} NDCG@10" for name in others]
    rows = []
    for name, m in ranker.get("slices", {}).items():
        if not m.get("users"):
            continue
        row = [_segment_label(name), str(m["users"]), _ci_cell(m, "ndcg@10"), _ci_cell(m, "recall@10")]
        row += [_num(models[o].get("slices", {}).get(name, {}).get("ndcg@10", 0.0)) for o in others]
        rows.append(row)
    return _table(rows, header) if rows else ""


def new_items_section(results: Mapping[str, Any]) -> list[str]:
    """The new-item protocol: new, warm and total NDCG@10 / Recall@10 per model (95% intervals),
    the plot, and the candidate sources' recall of the new targets."""
    info, models = results["new_items"], results["models"]
    rows = []
    for name in sorted(models, key=lambda n: -models[n]["ndcg@10"]):
        m, sl = models[name], models[name].get("slices", {})
        row = [name]
        for block in (sl.get(NEW_ITEMS, {}), sl.get(WARM_ITEMS, {}), m):
            row += [_ci_cell(block, key) if key in block else "" for key in PRIMARY_KEYS]
        rows.append(row)
    header = ["model"] + [
        f"{part} {LABELS[k]} (95% CI)" for part in ("new", "warm", "total") for k in PRIMARY_KEYS
    ]
    recall = info["candidate_recall"]
    return [
        "<h2>New items</h2>",
        f"<p>The newest {info['items']} of {info['catalog']} items (by first interaction) have no event "
        "in any training statistic, history, validation or baseline: they can only be recommended from "
        f"their text. {info['test_targets']} of {info['test_users']} test targets are new items. "
        f"<code>{ALL_WARM}</code> is the same ranker with its lists restricted to warm items. Ranker "
        f"new/warm NDCG@10: {_num(info['ranker_new_vs_warm'], 3)}.</p>",
        _table(rows, header),
        f'<img alt="new items" src="{new_item_bars(models)}">',
        f"<p>Candidate recall of the new targets ({info['num_candidates']} candidates per user): "
        f"{_num(recall.get('all', 0.0), 3)}.</p>",
        f'<img alt="new-item candidate recall" src="{recall_bars(recall, "new-item test targets")}">',
    ]


def tuned_section(
    tuned: Mapping[str, Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """What each baseline's tuning chose (with its validation and test metrics), then every grid
    point's validation metric, best first, per baseline (folded)."""
    label = LABELS.get(PRIMARY, PRIMARY)
    seconds = sum(float(t.get("seconds", 0.0)) for t in tuned.values())
    rows = []
    for name, t in tuned.items():
        m = models.get(name, {})
        rows.append(
            [
                name,
                describe_params(t["params"]),
                str(len(t["grid"])),
                _num(t[VALID_KEY]),
                _num(m[PRIMARY]) if PRIMARY in m else "",
                _num(m["recall@10"]) if "recall@10" in m else "",
                f"{float(t.get('seconds', 0.0)):.1f}",
            ]
        )
    header = ["baseline", "chosen values", "grid points", f"validation {label}", f"test {label}"]
    out = [
        "<h2>Baselines, tuned on validation</h2>",
        f"<p>Each baseline's hyper-parameters are chosen on the validation stage by {html.escape(label)} "
        "over a small grid (every combination; the first in grid order on a tie); the test stage is then "
        f"ranked once with the chosen values. Tuning took {seconds:.1f} s in all.</p>",
        _table(rows, [*header, "test Recall@10", "seconds"]),
    ]
    for name, t in tuned.items():
        names = list(t["grid"][0]["params"]) if t["grid"] else []
        grid = sorted(t["grid"], key=lambda g: -float(g[VALID_KEY]))
        grid_rows = [[*(describe_value(k, g["params"][k]) for k in names), _num(g[VALID_KEY])] for g in grid]
        out.append(
            f"<details><summary>{html.escape(name)}: validation {html.escape(label)} of its "
            f"{len(grid)} grid points, best first</summary>"
            f"{_table(grid_rows, [*(PARAM_LABELS.get(k, k) for k in names), f'validation {label}'])}</details>"
        )
    return out


def _run_summary(results: Mapping[str, Any]) -> str:
    parts = []
    if results.get("protocol"):
        parts.append(f"protocol: <b>{html.escape(str(results['protocol']))}</b>")
    test_users = results.get("training", {}).get("test_users")
    if test_users is not None:
        parts.append(f"{int(test_users)} test users")
    dataset = results.get("dataset")
    if isinstance(dataset, Mapping):
        parts.append(", ".join(f"{int(v)} {html.escape(str(k))}" for k, v in dataset.items()))
    window = results.get("windows", {}).get("test")
    if window:
        parts.append(f"test window {html.escape(str(window[0]))} to {html.escape(str(window[1]))}")
    return f"<p>{'; '.join(parts)}.</p>" if parts else ""


def sasrec_section(info: Mapping[str, Any]) -> list[str]:
    """SASRec's grid (one row per configuration, early-stopped on validation NDCG@10) and the choice."""
    chosen = info["chosen"]
    point = ", ".join(f"{k} {chosen[k]:g}" for k in ("hidden", "layers", "max_len", "dropout"))
    header = ["max length", "dropout", "hidden", "layers", "best epoch", "epochs run", "valid NDCG@10"]
    header.append("seconds")
    rows = [
        [
            str(t["max_len"]),
            f"{t['dropout']:g}",
            str(t["hidden"]),
            str(t["layers"]),
            str(t["best_epoch"]),
            str(t["epochs"]),
            _num(t["valid_ndcg@10"]),
            f"{t['seconds']:.0f}",
        ]
        for t in info["grid"]
    ]
    return [
        "<h2>SASRec (sequential baseline)</h2>",
        f"<p>Chosen on validation NDCG@10: {html.escape(point)} (best epoch {chosen['best_epoch']}, "
        f"valid NDCG@10 {_num(chosen['valid_ndcg@10'])}). The grid took {info['seconds']:.0f} s on "
        f"{html.escape(str(info['device']))} with {info['threads']} thread(s), seed {info['seed']}.</p>",
        _table(rows, header),
    ]


def seq_curve(curve: Sequence[float], best_epoch: int) -> str:
    """The sequence model's validation NDCG@10 per epoch, the kept epoch marked."""
    fig, ax = plt.subplots(figsize=(6, 2.8))
    epochs = list(range(1, len(curve) + 1))
    ax.plot(epochs, curve, marker="o", color=RANKER_COLOR)
    ax.axvline(best_epoch, color="black", lw=0.8, ls="--")
    ax.set_xlabel("epoch")
    ax.set_title("sequence model: validation NDCG@10 per epoch (kept epoch dashed)")
    ax.grid(alpha=0.3)
    return _png(fig)


def seq_section(
    info: Mapping[str, Any], models: Mapping[str, Any], comparisons: Mapping[str, Any]
) -> list[str]:
    """The text-aware sequence model: its training, its validation curve, what it adds to the ranker."""
    if "skipped" in info:
        return ["<h2>Text-aware sequence model</h2>", f"<p>Not trained: {html.escape(info['skipped'])}.</p>"]
    point = ", ".join(f"{k} {v:g}" for k, v in info["params"].items())
    out = [
        "<h2>Text-aware sequence model</h2>",
        f"<p>{html.escape(point)}; trained on {info['train_events']} events of {info['train_users']} users "
        f"known before the first training target, {info['items_with_delta']} items with a learned delta. "
        f"Best epoch {info['best_epoch']} of {info['epochs']} (stopped by {html.escape(info['stopped'])}), "
        f"valid NDCG@10 {_num(info['valid_ndcg@10'])}, {info['seconds']:.0f} s on "
        f"{html.escape(str(info['device']))} with {info['threads']} thread(s), seed {info['seed']}.</p>",
    ]
    if SEQMODEL in models:
        m = models[SEQMODEL]
        out.append(
            f"<p>On its own (test): NDCG@10 {_num(m['ndcg@10'])}, Recall@10 {_num(m['recall@10'])}.</p>"
        )
    ablation = comparisons.get(f"{RANKER}_vs_ranker_no_seq")
    if ablation:
        sentences = " ".join(
            ablation_sentence(ablation, key, "the sequence-model features")
            for key in PRIMARY_KEYS
            if key in ablation
        )
        out.append(f"<p>{html.escape(sentences)}</p>")
    if info.get("curve"):
        out.append(f'<img alt="sequence model curve" src="{seq_curve(info["curve"], info["best_epoch"])}">')
    return out


# --- publish sections ----------------------------------------------------------------------------


def trend_section(trend: Trend) -> list[str]:
    """The new version next to the bundle it replaces (with the difference), and over earlier versions."""
    out = ["<h2>Against the published versions</h2>"]
    new, old = trend.new, trend.replaces
    if old is None:
        out.append("<p>Nothing is promoted in this namespace yet: no bundle to compare against.</p>")
    else:
        keys = [k for k in PRIMARY_KEYS if k in new.metrics and k in old.metrics]
        rows = [
            [f"this version {new.version}", *(_num(new.metrics[k]) for k in keys)],
            [f"replaced {old.version}", *(_num(old.metrics[k]) for k in keys)],
            ["difference", *(_signed(new.metrics[k] - old.metrics[k]) for k in keys)],
        ]
        out += [
            f"<p>Compared with the current bundle <b>{html.escape(old.version)}</b> (logical date "
            f"{html.escape(old.logical_date)}), which this version replaces if it is promoted. Each version "
            "is measured on its own test window; the quality gate compares both rankers on this run's test "
            "data.</p>",
            _table(rows, ["ranker", *(LABELS[k] for k in keys)]),
        ]
    if trend.previous:
        points = [*trend.previous, new]
        out += [
            f"<p>{len(trend.previous)} earlier published version(s), oldest first.</p>",
            f'<img alt="trend" src="{trend_lines(points)}">',
        ]
    else:
        out.append("<p>No earlier version is published in this namespace: no trend yet.</p>")
    return out


def examples_section(examples: Sequence[Example]) -> list[str]:
    """Recent history and recommendations with reasons per example user (what serving returns)."""
    out = [
        "<h2>Example recommendations</h2>",
        "<p>What the serving code returns for a few users, from the least to the most active.</p>",
    ]
    for ex in examples:
        recent = ", ".join(f"“{t}”" for t in ex.history) or "none"
        items = "".join(
            f"<li>{html.escape(title)} <span class='reason'>({html.escape(reason)})</span></li>"
            for title, reason in ex.recommendations
        )
        out += [
            f"<h3>User {html.escape(ex.user_id)} ({ex.history_length} interactions: {html.escape(ex.segment)}; "
            f"{html.escape(ex.strategy)})</h3>",
            f"<p>Recently: {html.escape(recent)}</p>",
            f"<ol>{items}</ol>",
        ]
    return out


# --- the page ------------------------------------------------------------------------------------


def build_report(
    results: dict[str, Any],
    title: str,
    *,
    trend: Trend | None = None,
    examples: Sequence[Example] = (),
) -> str:
    """The HTML page for ``results`` as returned by ``train.evaluate_stages`` (plus run fields);
    publish adds ``trend`` and ``examples``."""
    models = results["models"]
    comparisons = results.get("comparisons", {})
    sections = [f"<h1>{html.escape(title)}</h1>", _run_summary(results)]
    ablation = comparisons.get(f"{RANKER}_vs_{ABLATION}")
    if ablation:
        sentences = " ".join(ablation_sentence(ablation, key) for key in PRIMARY_KEYS if key in ablation)
        sections += ["<h2>What the LLM features add</h2>", f"<p>{html.escape(sentences)}</p>"]
    if trend is not None:
        sections += trend_section(trend)
    sections += ["<h2>Models</h2>", _models_table(models), f'<img alt="metrics" src="{metric_bars(models)}">']
    if results.get("baselines_tuned"):
        sections += tuned_section(results["baselines_tuned"], models)
    if results.get(SASREC):
        sections += sasrec_section(results[SASREC])
    if results.get(SEQMODEL):
        sections += seq_section(results[SEQMODEL], models, comparisons)
    if results.get("new_items"):
        sections += new_items_section(results)
    segments = segments_table(models)
    if segments:
        sections += ["<h2>By segment</h2>", segments]
    if examples:
        sections += examples_section(examples)
    if comparisons:
        sections += [
            "<h2>Gain of the ranker (paired over the same users)</h2>",
            f'<img alt="gain" src="{gain_bars(comparisons)}">',
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
        ".note,.reason{color:#57606a}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>"
    )
