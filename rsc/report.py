"""The report of ``python -m rsc.evaluate``: ``report.md`` (figures beside it) and a self-contained ``report.html``.

Contents: the trade-off summary (one row per method), a table per metric (methods x groups and
methods x prompts, best in bold), per-group bar charts, the trade-off scatters (stereotype reduction
against preservation and against facial quality, one point per method), cost bars, and per method a
before/after grid (``none`` above the method, the same seeds).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402

from rsc.atomic import atomic_path  # noqa: E402
from rsc.callbacks.measures import HIGHER_IS_BETTER  # noqa: E402
from rsc.images import labelled_grid  # noqa: E402

SUMMARY_COLUMNS = (
    ("targeted_stereotype_rate", "targeted stereotype rate", False),
    ("non_targeted_ssim", "non-targeted SSIM", True),
    ("targeted_gender_consistency", "targeted gender consistency", True),
    ("quality", "facial quality", True),
    ("diversity_ratio", "diversity vs none", True),
)
COST_COLUMNS = (("seconds_per_image", "s/image", False), ("ratio_to_none", "x none", False),
                ("unet_passes_per_image", "UNet passes/image", False), ("peak_memory_mb", "peak MB", False))


def _format(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[tuple[str, list[Any]]], higher: list[bool | None]) -> list[list[str]]:
    """Cells with the best value of every column in bold (``higher[i]`` None: no best)."""
    best: list[Any] = []
    for column, direction in enumerate(higher):
        values = [row[column] for _, row in rows if isinstance(row[column], (int, float))]
        best.append(None if direction is None or not values else (max(values) if direction else min(values)))
    cells = [header]
    for name, row in rows:
        cells.append([name] + [f"**{_format(v)}**" if v is not None and v == best[i] and len(rows) > 1 else _format(v)
                               for i, v in enumerate(row)])
    return cells


def _markdown(cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells[0]) + " |", "| " + " | ".join("---" for _ in cells[0]) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells[1:]])


def _html_table(cells: list[list[str]]) -> str:
    def cell(text: str, tag: str) -> str:
        bold = text.startswith("**")
        text = html.escape(text.strip("*"))
        return f"<{tag}>{'<b>' + text + '</b>' if bold else text}</{tag}>"

    head = "<tr>" + "".join(cell(c, "th") for c in cells[0]) + "</tr>"
    body = "".join("<tr>" + "".join(cell(c, "td") for c in row) + "</tr>" for row in cells[1:])
    return f"<table>{head}{body}</table>"


def _save_figure(figure: Any, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def _bars(results: dict[str, Any], metric: str, path: Path) -> bool:
    methods = results["methods"]
    groups = results["settings"]["groups"]
    if not any(methods[m]["metrics"]["per_group"][g].get(metric) is not None for m in methods for g in groups):
        return False
    figure, axes = plt.subplots(figsize=(1.6 + 1.3 * len(groups), 3.2))
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        values = [methods[method]["metrics"]["per_group"][g].get(metric) for g in groups]
        axes.bar([g + index * width for g in range(len(groups))], [v if v is not None else 0 for v in values],
                 width, label=method)
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    axes.set_title(metric.replace("_", " ") + " per group")
    axes.legend(fontsize=7, ncol=2)
    _save_figure(figure, path)
    return True


def _scatter(results: dict[str, Any], y_key: str, y_label: str, path: Path) -> bool:
    methods, baseline = results["methods"], results["baseline"]
    base = methods[baseline]["summary"]["targeted_stereotype_rate"]
    points = [(m, row["summary"]) for m, row in methods.items()]
    points = [(m, base - s["targeted_stereotype_rate"], s[y_key]) for m, s in points
              if base is not None and s["targeted_stereotype_rate"] is not None and s[y_key] is not None]
    if not points:
        return False
    figure, axes = plt.subplots(figsize=(4.6, 3.4))
    for name, x, y in points:
        axes.scatter([x], [y], s=40)
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("targeted stereotype reduction (none - method)")
    axes.set_ylabel(y_label)
    axes.set_title(f"trade-off: reduction vs {y_label}")
    axes.grid(alpha=0.3)
    _save_figure(figure, path)
    return True


def _cost(results: dict[str, Any], path: Path) -> bool:
    rows = [(m, row["cost"]) for m, row in results["methods"].items() if row.get("cost")]
    if not rows:
        return False
    figure, axes = plt.subplots(figsize=(1.5 + 0.9 * len(rows), 3.2))
    axes.bar([m for m, _ in rows], [c["seconds_per_image"] for _, c in rows], color="tab:gray")
    for index, (_, c) in enumerate(rows):
        if c.get("ratio_to_none") is not None:
            axes.annotate(f"{c['ratio_to_none']:.2f}x", (index, c["seconds_per_image"]), ha="center", va="bottom", fontsize=8)
    axes.set_ylabel("seconds per image")
    axes.set_title("cost (interleaved timing)")
    axes.tick_params(axis="x", rotation=30, labelsize=8)
    _save_figure(figure, path)
    return True


def _grid(baseline: Tensor, method: Tensor, prompt_keys: list[str], path: Path) -> None:
    rows, labels = [], []
    for key in dict.fromkeys(prompt_keys):
        picks = [i for i, k in enumerate(prompt_keys) if k == key]
        rows += [baseline[picks], method[picks]]
        short = key.removeprefix("a_photo_of_a_")[:18]
        labels += [f"{short} before", f"{short} after"]
    image: Image.Image = labelled_grid(rows, labels, label_width=150)
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def write_report(results: dict[str, Any], grid_images: dict[str, Tensor], grid_prompts: list[str], out: Path) -> None:
    """Write ``report.md``, ``figures/*.png`` and ``report.html`` (figures embedded as base64) to ``out``."""
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    methods, baseline = results["methods"], results["baseline"]
    settings = results["settings"]
    sections: list[tuple[str, Any]] = []  # ("text" | "table" | "figure", payload)

    sections.append(("heading", "rsc evaluation"))
    sections.append(("text", f"Backbone `{settings['backbone']}`, {len(settings['prompts'])} prompts x "
                             f"{len(settings['seeds'])} seeds, {settings['sampling']['steps']} steps, guidance "
                             f"{settings['sampling']['guidance_scale']}; targeted groups: "
                             f"{', '.join(settings['targeted_groups']) or '-'}. Versions: "
                             + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + "."))
    sections.append(("heading2", "Trade-off summary"))
    header = ["method"] + [label for _, label, _ in SUMMARY_COLUMNS] + [label for _, label, _ in COST_COLUMNS]
    rows = [(m, [row["summary"].get(key) for key, _, _ in SUMMARY_COLUMNS]
             + [(row.get("cost") or {}).get(key) for key, _, _ in COST_COLUMNS]) for m, row in methods.items()]
    sections.append(("table", _table(header, rows, [h for _, _, h in SUMMARY_COLUMNS] + [h for _, _, h in COST_COLUMNS])))
    for name, figure, caption in (("tradeoff_ssim.png", lambda p: _scatter(results, "non_targeted_ssim", "non-targeted SSIM", p), "stereotype reduction vs preservation"),
                                  ("tradeoff_quality.png", lambda p: _scatter(results, "quality", "facial quality", p), "stereotype reduction vs facial quality"),
                                  ("cost.png", lambda p: _cost(results, p), "cost")):
        if figure(figures / name):
            sections.append(("figure", (name, caption)))

    metric_names = [m for m in HIGHER_IS_BETTER if any(
        row["metrics"]["per_group"][g].get(m) is not None or row["metrics"]["all"].get(m) is not None
        for row in methods.values() for g in settings["groups"])]
    for metric in metric_names:
        higher = HIGHER_IS_BETTER[metric]
        sections.append(("heading2", metric.replace("_", " ")))
        groups = settings["groups"]
        header = ["method"] + groups + ["all", "gap"]
        rows = [(m, [row["metrics"]["per_group"][g].get(metric) for g in groups]
                 + [row["metrics"]["all"].get(metric), row["metrics"]["gap"].get(metric)]) for m, row in methods.items()]
        sections.append(("table", _table(header, rows, [higher] * (len(groups) + 1) + [False])))
        prompt_keys = [p["key"] for p in settings["prompts"]]
        rows = [(m, [row["metrics"]["per_prompt"][k].get(metric) for k in prompt_keys]) for m, row in methods.items()]
        if any(v is not None for _, r in rows for v in r):
            sections.append(("text", "Per prompt:"))
            sections.append(("table", _table(["method"] + prompt_keys, rows, [higher] * len(prompt_keys))))
        if _bars(results, metric, figures / f"bars_{metric}.png"):
            sections.append(("figure", (f"bars_{metric}.png", f"{metric} per group")))

    sections.append(("heading2", "Before / after (same seeds; none above each method)"))
    for method in methods:
        if method == baseline or method not in grid_images or not len(grid_images[method]):
            continue
        name = f"grid_{method}.png"
        _grid(grid_images[baseline], grid_images[method], grid_prompts, figures / name)
        sections.append(("figure", (name, f"{method}: before / after")))

    markdown, body = [], []
    for kind, payload in sections:
        if kind == "heading":
            markdown.append(f"# {payload}")
            body.append(f"<h1>{html.escape(payload)}</h1>")
        elif kind == "heading2":
            markdown.append(f"## {payload}")
            body.append(f"<h2>{html.escape(payload)}</h2>")
        elif kind == "text":
            markdown.append(payload)
            body.append(f"<p>{html.escape(payload)}</p>")
        elif kind == "table":
            markdown.append(_markdown(payload))
            body.append(_html_table(payload))
        else:
            name, caption = payload
            markdown.append(f"![{caption}](figures/{name})")
            encoded = base64.b64encode((figures / name).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(caption)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    with atomic_path(out / "report.md") as temporary:
        temporary.write_text("\n\n".join(markdown) + "\n", encoding="utf-8")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>rsc evaluation</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
    with atomic_path(out / "report.html") as temporary:
        temporary.write_text(page, encoding="utf-8")
