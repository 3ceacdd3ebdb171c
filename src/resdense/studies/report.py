"""The study report: figures, the table of final errors and the verdict, drawn from the result
files alone (``resdense report STUDY_DIR`` redraws it without training)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from .degradation import final_table, load_rows, verdict


def _pct(mean: float, std: float, seeds: int) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if seeds > 1 else f"{100 * mean:.2f}"


def build_report(study_dir: str | Path) -> dict[str, Any]:
    """(Re)draw every figure and write report.md, report.html and table.json into ``study_dir``."""
    from .. import plots

    out = Path(study_dir)
    rows = load_rows(out)
    table = final_table(rows)
    judged = verdict(table)
    figures = [("curves.png", "Training error (thin, dashed) and validation error (bold) vs iterations; "
                              "plain nets left, residual nets right (after He et al. 2015, Fig. 6).")]
    plots.plot_degradation_curves(rows, out / "curves.png")
    if len({t["depth"] for t in table}) > 1:
        plots.plot_error_vs_depth(table, out / "error_vs_depth.png")
        figures.append(("error_vs_depth.png", "Final training and test error vs depth (mean ± std over seeds)."))
    atomic_write_text(out / "table.json", json.dumps({"table": table, "verdict": judged}, indent=2))

    header = "| net | depth | seeds | train error % | val error % | test error % |"
    lines = [header, "|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['kind']} | {t['depth']} | {t['seeds']} | {_pct(t['final_train_error'], t['final_train_error_std'], t['seeds'])} "
                     f"| {_pct(t['final_val_error'], t['final_val_error_std'], t['seeds'])} "
                     f"| {_pct(t['test_error'], t['test_error_std'], t['seeds'])} |")
    # A residual run's config: only those carry the shortcut option (the plain twins have none).
    cfg = next((r["config"] for r in rows if r["kind"] == "resnet"), rows[0]["config"] if rows else {})
    setup = (f"{cfg.get('data')} ({cfg.get('train_subset') or 'all'} training images), recipe {cfg.get('recipe')}, "
             f"{cfg.get('epochs') or cfg.get('iterations')} {'epochs' if cfg.get('epochs') else 'iterations'}, "
             f"batch {cfg.get('batch_size')}, lr {cfg.get('lr')} ({cfg.get('schedule')}), shortcut "
             f"{cfg.get('model_kwargs', {}).get('shortcut', 'A')} for the residual nets")
    md = ["# Degradation study: plain vs residual networks", "",
          f"**Verdict.** {judged['text']}", "", f"Setup: {setup}. Training error is the running error of the "
          "last epoch (with augmentation); test error is measured once, after training.", "", *lines, ""]
    for name, caption in figures:
        md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    md.append("Regenerate with `resdense report " + str(out) + "`.")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")

    body = ["<h1>Degradation study: plain vs residual networks</h1>",
            f"<p><strong>Verdict.</strong> {html.escape(judged['text'])}</p>",
            f"<p>Setup: {html.escape(setup)}.</p>", "<table border='1' cellpadding='4'>",
            "<tr><th>net</th><th>depth</th><th>seeds</th><th>train error %</th><th>val error %</th><th>test error %</th></tr>"]
    for t in table:
        cells = [t["kind"], t["depth"], t["seeds"], _pct(t["final_train_error"], t["final_train_error_std"], t["seeds"]),
                 _pct(t["final_val_error"], t["final_val_error_std"], t["seeds"]),
                 _pct(t["test_error"], t["test_error_std"], t["seeds"])]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    body.append("</table>")
    for name, caption in figures:
        data = base64.b64encode((out / name).read_bytes()).decode()
        body.append(f"<figure><img src='data:image/png;base64,{data}' style='max-width:100%'>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>resdense degradation study</title></head>"
            "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>" + "\n".join(body) + "</body></html>")
    atomic_write_text(out / "report.html", page)
    return {"table": table, "verdict": judged, "figures": [str(out / n) for n, _ in figures]}
