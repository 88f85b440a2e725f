"""Run reports: the stage table printed to the terminal, and ``report.html`` with tables and plots (PNG,
embedded), readable offline in any browser."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from posttrain.stages import STAGES

# Stage-table columns: the target task's strict, lenient and fair accuracy, the retention tasks' strict and fair
# accuracy, perplexity (rules of the three accuracies: posttrain.tasks.answers).
COLUMNS = [
    ("accuracy", "strict acc"),
    ("accuracy_lenient", "lenient acc"),
    ("accuracy_fair", "fair acc"),
    ("retention_accuracy", "retention acc"),
    ("retention_accuracy_fair", "retention fair"),
    ("perplexity", "perplexity"),
    ("params", "params"),
    ("size_mb", "size MB"),
    ("tokens_per_s", "gen tok/s"),
]
NOT_ACCURACY = ("perplexity", "params", "size_mb", "tokens_per_s")
ACCURACY_COLUMNS = [c for c in COLUMNS if c[0] not in NOT_ACCURACY]  # the bars of "accuracy by stage"


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key == "params":
        return f"{value / 1e6:.2f}M"
    if key in ("size_mb", "tokens_per_s"):
        return f"{value:.1f}" if key == "size_mb" else f"{value:.0f}"
    return f"{value:.2f}" if key == "perplexity" else f"{100 * value:.1f}%"


def stage_rows(stages: list[dict[str, Any]]) -> list[list[str]]:
    """The stage table's cells, one row per stage ("-" where a stage has no such figure).

    >>> ev = {"accuracy": 0.1, "accuracy_lenient": 0.5, "accuracy_fair": 0.25, "retention_accuracy": 0.028,
    ...       "retention_accuracy_fair": 0.02, "perplexity": 12.345}
    >>> stage_rows([{"name": "sft", "source": "trained", "eval": ev, "train_wall_s": 1, "wall_s": 2}])
    [['sft', 'trained', '10.0%', '50.0%', '25.0%', '2.8%', '2.0%', '12.35', '-', '-', '-', '1.0s', '2.0s']]
    """
    rows = []
    for s in stages:
        ev = s.get("eval", {})
        rows.append(
            [s["name"], s.get("source", "")]
            + [_fmt(ev.get(k), k) for k, _ in COLUMNS]
            + [f"{s.get('train_wall_s', 0):.1f}s", f"{s.get('wall_s', 0):.1f}s"]
        )
    return rows


HEADER = ["stage", "source"] + [label for _, label in COLUMNS] + ["train time", "wall time"]


def _print_table(header: list[str], body: list[list[str]]) -> None:
    rows = [header] + body
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print()
    for j, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(flush=True)


def print_stage_table(stages: list[dict[str, Any]]) -> None:
    """Print the stage table (held-out strict/lenient/fair accuracy, retention strict/fair, perplexity, wall time)."""
    _print_table(HEADER, stage_rows(stages))


SEARCH_HEADER = [
    "strategy",
    "n",
    "strict acc",
    "fair acc",
    "oracle pass@n",
    "tokens/question",
    "forward passes/q",
    "s/question",
]


def search_rows(points: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            p["strategy"],
            str(p["n"]),
            f"{100 * p['accuracy']:.1f}%",
            _fmt(p.get("accuracy_fair"), "accuracy_fair"),
            f"{100 * p['oracle_pass_at_n']:.1f}%",
            f"{p['tokens_per_question']:.0f}",
            f"{p['forward_passes_per_question']:.0f}",
            f"{p['wall_s_per_question']:.3f}",
        ]
        for p in points
    ]


def print_search_table(points: list[dict[str, Any]]) -> None:
    """Print the search table: accuracy and compute per (strategy, n) on the final model."""
    _print_table(SEARCH_HEADER, search_rows(points))


def _search_figure(plt: Any, points: list[dict[str, Any]]) -> Any:
    """Accuracy against generated tokens per question, one line per strategy (the accuracy-vs-compute curve)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for strategy in dict.fromkeys(p["strategy"] for p in points):
        mine = sorted((p for p in points if p["strategy"] == strategy), key=lambda p: p["tokens_per_question"])
        xs = [p["tokens_per_question"] for p in mine]
        ax.plot(xs, [100 * p["accuracy"] for p in mine], "o-", label=strategy)
        for p in mine:
            ax.annotate(f"n={p['n']}", (p["tokens_per_question"], 100 * p["accuracy"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per question (log)")
    ax.set_ylabel("strict accuracy, %")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title("Inference-time search on the final model: accuracy against compute")
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _read_metrics(run_dir: str | None) -> list[dict[str, Any]]:
    path = Path(run_dir or "") / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _curves_figure(plt: Any, stage: dict[str, Any], title: str, series: list[tuple[str, str, str]]) -> Any:
    """The stage's own metrics against steps (whatever of ``series`` its metrics.jsonl holds)."""
    metrics = _read_metrics(stage["run_dir"])
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for key, label, style in series:
        points = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    lengths = [(m["step"], m["completion_length"]) for m in metrics if m.get("completion_length") is not None]
    if lengths:  # RL stages: how long the samples are, on the right axis
        right = ax.twinx()
        right.plot(*zip(*lengths), color="grey", alpha=0.6, label="completion length (tokens)")
        right.set_ylabel("tokens")
        right.legend(loc="lower right", fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.12 if lengths else 1.0, 1.0), fontsize=8)
    ax.set_title(f"{stage['name']}: {title}")
    return fig


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``report.html``: stage table, loss curves of every trained stage, reward and accuracy against steps
    for RL stages, accuracy per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = summary["stages"]
    images = []
    trained = [s for s in stages if s.get("run_dir")]
    if trained:
        fig, axes = plt.subplots(1, len(trained), figsize=(5 * len(trained), 3.2), squeeze=False)
        for ax, s in zip(axes[0], trained):
            metrics = _read_metrics(s["run_dir"])
            key = "loss" if any(m.get("loss") is not None for m in metrics) else "pg_loss"  # PPO logs pg_loss
            train = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
            held = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
            if train:
                ax.plot(*zip(*train), label="train loss")
            if held:
                ax.plot(*zip(*held), "o-", label="held-out loss (task val split)")
            ax.set_title(f"{s['name']}: loss")
            ax.set_xlabel("step")
            if train or held:
                ax.legend()
        images.append(("Loss curves", _png(fig)))
        plt.close(fig)
    for s in trained:
        info = STAGES.get(s.get("type", ""))
        if info is not None and info.curves:
            title, series = info.curves
            images.append((f"{html.escape(s['name'])}: {title}", _png(_curves_figure(plt, s, title, series))))
        plt.close("all")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [s["name"] for s in stages]
    width = 0.8 / len(ACCURACY_COLUMNS)
    for j, (key, label) in enumerate(ACCURACY_COLUMNS):
        values = [100 * (s.get("eval", {}).get(key) or 0) for s in stages]
        offset = (j - (len(ACCURACY_COLUMNS) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(stages))], values, width, label=label)
    ax.set_xticks(range(len(stages)), names)
    ax.set_ylabel("% of held-out problems")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Held-out accuracy after each stage")
    images.append(("Accuracy by stage", _png(fig)))
    plt.close(fig)

    table = "".join(
        "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row) + "</tr>"
        for tag, row in [("th", HEADER)] + [("td", r) for r in stage_rows(stages)]
    )
    points = summary.get("search") or []
    if points:
        images.append(("Search: accuracy against compute", _png(_search_figure(plt, points))))
        plt.close("all")
        rows = "".join(
            "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row) + "</tr>"
            for tag, row in [("th", SEARCH_HEADER)] + [("td", r) for r in search_rows(points)]
        )
        table += (
            "</table><h2>Search on the final model (held-out test problems; oracle pass@n looks at the gold answer,"
            f" the strategies do not)</h2><table>{rows}"
        )
    body = "".join(f"<h2>{t}</h2><img src='data:image/png;base64,{b}'/>" for t, b in images)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>posttrain report</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}</style></head><body>"
        f"<h1>posttrain run: {html.escape(str(summary.get('recipe', '')))}</h1>"
        f"<p>total wall time {summary.get('wall_s', 0):.1f}s; final model "
        f"<code>{html.escape(str(summary.get('final_model')))}</code></p>"
        f"<h2>Stages</h2><table>{table}</table>{body}</body></html>"
    )
    path = Path(run_dir) / "report.html"
    path.write_text(page)
    return path


def write_search_report(path: Path, points: list[dict[str, Any]], *, title: str = "posttrain search") -> Path:
    """A standalone HTML page with the search table and the accuracy-vs-compute plot (``posttrain eval
    --scaling``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = _png(_search_figure(plt, points))
    plt.close("all")
    rows = "".join(
        "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row) + "</tr>"
        for tag, row in [("th", SEARCH_HEADER)] + [("td", r) for r in search_rows(points)]
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>posttrain search</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>oracle pass@n looks at the gold answer; the strategies do not.</p>"
        f"<table>{rows}</table><img src='data:image/png;base64,{image}'/></body></html>"
    )
    path.write_text(page)
    return path
