"""The challenger-against-champion report every promotion gate publishes, passed or refused.

Pure: it takes both models' evaluations on the same data and returns markdown and one matplotlib
figure; the retrain flow stores them as a Prefect artifact and with the MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no screen on training hosts
import pandas as pd  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from components.evaluate import Evaluation, flatten_metrics  # noqa: E402

# SKUs listed in each of the "gained" and "lost" tables.
SKUS_LISTED = 5


@dataclass(frozen=True)
class Report:
    """The report as people read it: markdown (Prefect, MLflow) and one figure (MLflow)."""

    markdown: str
    figure: Figure


def sku_changes(challenger: Evaluation, champion: Evaluation, protocol: str) -> pd.DataFrame:
    """Per SKU of ``protocol`` scored by both: queries, both top-1s and the change, largest gain first."""
    columns = ["sku_id", "queries", "top1"]
    mine = challenger.by_sku.loc[challenger.by_sku["protocol"] == protocol, columns]
    theirs = champion.by_sku.loc[champion.by_sku["protocol"] == protocol, ["sku_id", "top1"]]
    both = mine.merge(theirs, on="sku_id", suffixes=("_challenger", "_champion"))
    both["change"] = both["top1_challenger"] - both["top1_champion"]
    # Ties in change: the SKU with more queries first (its change is the surer one), then by id.
    return both.sort_values(["change", "queries", "sku_id"], ascending=[False, False, True], ignore_index=True)


def _metrics_table(challenger: Evaluation, champion: Evaluation | None, champion_label: str) -> list[str]:
    ours = flatten_metrics(challenger.metrics)
    theirs = flatten_metrics(champion.metrics) if champion else {}
    if not theirs:
        return ["| metric | challenger |", "|---|---|", *(f"| {name} | {value:.4f} |" for name, value in ours.items())]
    lines = [f"| metric | challenger | {champion_label} | change |", "|---|---|---|---|"]
    for name in sorted(set(ours) | set(theirs)):
        mine, best = ours.get(name), theirs.get(name)
        change = f"{mine - best:+.4f}" if mine is not None and best is not None else "–"
        lines.append(f"| {name} | {_cell(mine)} | {_cell(best)} | {change} |")
    return lines


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _sku_table(rows: pd.DataFrame, champion_label: str) -> list[str]:
    if rows.empty:
        return ["None."]
    return [
        f"| SKU | queries | challenger top-1 | {champion_label} top-1 | change |",
        "|---|---|---|---|---|",
        *(
            f"| {row.sku_id} | {row.queries} | {row.top1_challenger:.3f} | {row.top1_champion:.3f} "
            f"| {row.change:+.3f} |"
            for row in rows.itertuples()
        ),
    ]


def _figure(challenger: Evaluation, changes: pd.DataFrame | None, protocol: str, champion_label: str) -> Figure:
    """Per-SKU top-1 change against the champion, or the challenger's per-SKU top-1 when there is none."""
    if changes is not None:
        values, title = changes["change"], f"{protocol} top-1 per SKU: challenger minus {champion_label}"
        colours = ["tab:green" if value > 0 else "tab:red" if value < 0 else "tab:gray" for value in values]
        labels = changes["sku_id"]
    else:
        mine = challenger.by_sku[challenger.by_sku["protocol"] == protocol].sort_values("top1", ascending=False)
        values, title, colours, labels = (
            mine["top1"],
            f"{protocol} top-1 per SKU (no champion)",
            "tab:blue",
            mine["sku_id"],
        )
    figure, axis = plt.subplots(figsize=(max(6.0, 0.18 * len(values)), 4))
    axis.bar(range(len(values)), values, color=colours)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set(title=title, xlabel="SKU", ylabel="top-1" if changes is None else "change in top-1")
    # Every SKU named while they fit; past that, the bars alone show the spread.
    if len(values) <= 60:
        axis.set_xticks(range(len(values)), labels, rotation=90, fontsize=6)
    else:
        axis.set_xticks([])
    figure.tight_layout()
    return figure


def challenger_report(
    challenger: Evaluation,
    champion: Evaluation | None,
    champion_version: str | None,
    verdict: str,
    protocol: str,
    listed: int = SKUS_LISTED,
) -> Report:
    """Both protocols' metrics side by side with changes, the SKUs that gained and lost most, one plot.

    Args:
        challenger: the new model's evaluation.
        champion: ``@champion``'s evaluation on the same data, None when there is no champion.
        champion_version: its registry version.
        verdict: the gate's summary line.
        protocol: the protocol the gate reads, which the SKU tables and the plot use.
        listed: SKUs in each of the gained and lost tables.
    """
    label = f"champion v{champion_version}" if champion is not None else "champion"
    lines = [
        f"# Challenger against {label if champion is not None else 'no champion'}",
        "",
        verdict,
        "",
        "## Metrics on the same data",
        "",
        *_metrics_table(challenger, champion, label),
    ]
    changes = None
    if champion is None:
        lines += ["", "No `@champion` to compare with: the gate checked the thresholds only."]
    else:
        changes = sku_changes(challenger, champion, protocol)
        gained = changes[changes["change"] > 0].head(listed)
        lost = (
            changes[changes["change"] < 0]
            .sort_values(["change", "queries", "sku_id"], ascending=[True, False, True])
            .head(listed)
        )
        lines += [
            "",
            f"## SKUs that gained most ({protocol} top-1)",
            "",
            *_sku_table(gained, label),
            "",
            f"## SKUs that lost most ({protocol} top-1)",
            "",
            *_sku_table(lost, label),
            "",
            f"{len(changes)} SKUs compared: {int((changes['change'] > 0).sum())} gained, "
            f"{int((changes['change'] < 0).sum())} lost, {int((changes['change'] == 0).sum())} unchanged.",
        ]
    return Report("\n".join(lines) + "\n", _figure(challenger, changes, protocol, label))
