"""A study's results and report, drawn from its run folders and result files alone
(``resdense report STUDY_DIR`` redraws it without training).

``results.jsonl``: one row per finished run. ``table.json``: mean ± std per group and one
verdict object per claim (``{claim, difference, stderr, n_seeds, decision, ...}``), also copied
into ``study.json``. ``report.md`` and ``report.html`` (figures embedded) say the same in words.
"""

from __future__ import annotations

import base64
import html
import json
import re
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from .._io import atomic_write_text
from ..errors import ConfigError
from ..outputs import check_new_file
from .spec import METRICS, UNCALIBRATED, StudyConfig, StudySpec, get_study
from .budget import budget_text, count_of, decided_at, effect_sentences, paper_text, runs_budget
from .stats import CONFIDENCE, DECISION_WORDS, FAMILY_ALPHA, Verdict, decide_all, measure, summary_line


def load_study(out: str | Path) -> tuple[StudySpec, StudyConfig]:
    path = Path(out) / "study.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: {out} is not a study folder (run `resdense study NAME --out {out}` first)")
    try:
        doc = json.loads(path.read_text())
        cfg = doc["config"] if "config" in doc else doc
        study = StudyConfig(**{k: v for k, v in cfg.items() if k in StudyConfig.__dataclass_fields__})
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{path} is not a resdense study file ({type(e).__name__}); was it edited by hand?") from None
    if "depths" in cfg and not study.options:  # a study.json of resdense 0.1
        study.options = {"depths": cfg["depths"], "shortcut": cfg.get("shortcut", "A")}
    study.out = str(out)
    return get_study(study.study), study


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def collect_rows(spec: StudySpec, study: StudyConfig) -> list[dict[str, Any]]:
    """One row per finished run of the study (its runs as the spec names them; other folders in
    the study directory, e.g. an extra DenseNet for ``analyze reuse``, are not rows). A run whose
    folder is gone keeps its row from ``results.jsonl``: a report can be redrawn from the result
    files alone."""
    saved = {r["run"]: r for r in _read_jsonl(Path(study.out) / "results.jsonl") if "run" in r}
    rows = []
    for run in spec.runs(study):
        run_dir = Path(study.out) / run.name
        if not (run_dir / "summary.json").is_file():
            if run.name in saved:
                rows.append(saved[run.name])
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = _read_jsonl(run_dir / "metrics.jsonl")
        rows.append({
            "run": run.name, "group": run.group, "seed": run.seed, **run.labels,
            # The claims' metric: the final model on its training images (eval mode). Runs of
            # resdense 0.1 lack it and fall back to the running error, which the row says.
            "train_error": summary.get("train_error_eval", summary["final_train_error"]),
            "train_error_kind": "eval" if "train_error_eval" in summary else "running",
            "running_train_error": summary["final_train_error"], "val_error": summary["final_val_error"],
            "test_error": summary["test_error_last"], "test_error_best": summary.get("test_error_best"),
            "test_images": summary.get("test_images"), "wall_time": summary["wall_time"],
            "images_per_s": summary.get("images_per_s"), "steps": summary.get("steps"),
            "params": summary.get("params"), "macs": summary.get("macs"), "diverged": summary.get("diverged"),
            "input_size": summary.get("input_size"), "finished": summary.get("finished"),
            "train_images": summary.get("train_images"),
            "curve": _read_jsonl(run_dir / "curve.jsonl"),
            "epochs": [{k: m[k] for k in ("step", "train_error", "val_error")} for m in metrics],
            "config": summary["config"],
        })
    return rows


def group_table(spec: StudySpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of every metric, per group."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    table = []
    for group, rs in groups.items():
        entry = {"group": group, **{k: rs[0][k] for k in spec.label_columns}, "seeds": len(rs),
                 "wall_time": statistics.fmean(r["wall_time"] for r in rs),
                 # The same model in every seed: its size and cost per image (None for runs of 0.1).
                 "params": rs[0].get("params"), "macs": rs[0].get("macs"), "input_size": rs[0].get("input_size")}
        for key in METRICS:
            values = [r[key] for r in rs if r.get(key) is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return sorted(table, key=spec.group_order)


def _values(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> group -> seed -> value."""
    values: dict[str, dict[str, dict[int, float]]] = {}
    for r in rows:
        for key in METRICS:
            if r.get(key) is not None:
                values.setdefault(key, {}).setdefault(r["group"], {})[r["seed"]] = r[key]
    return values


def verdicts(spec: StudySpec, study: StudyConfig, rows: list[dict[str, Any]],
             table: Optional[list[dict[str, Any]]] = None) -> list[Verdict]:
    """The decisions of the claims this preset tests, controlled together (Holm), each with the
    budget of its runs and the paper's (``table``: the rows' group table, if at hand)."""
    claims = [c for c in spec.claims(study, table if table is not None else group_table(spec, rows)) if c.tested]
    paper = spec.paper_budget.to_dict() if spec.paper_budget else {}
    return [replace(v, budget=runs_budget(rows, (g for g, _ in c.terms)), paper_budget=paper)
            for v, c in zip(decide_all(claims, _values(rows)), claims)]


def measurements(spec: StudySpec, study: StudyConfig, rows: list[dict[str, Any]],
                 table: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """The contrasts of the claims this preset cannot test: measured, not decided."""
    values = _values(rows)
    claims = spec.claims(study, table if table is not None else group_table(spec, rows))
    paper = spec.paper_budget.to_dict() if spec.paper_budget else {}
    return [{**measure(c, values.get(c.metric, {})), "budget": runs_budget(rows, (g for g, _ in c.terms)),
             "paper_budget": paper} for c in claims if not c.tested]


def verdict_text(vs: list[Verdict]) -> str:
    """The study's verdict in one paragraph: each claim's decision and effect."""
    parts = []
    for v in vs:
        effect = (f"{v.contrast} = {v.difference:+.2f} ± {v.stderr:.2f} points, {v.n_seeds} seeds"
                  if v.difference is not None and v.stderr is not None else
                  f"{v.contrast} = {v.difference:+.2f} points, one seed" if v.difference is not None else "no data")
        parts.append(f"{v.text}: {decided_at(DECISION_WORDS[v.decision], v.budget, v.paper_budget)} ({effect}).")
    return " ".join(parts)


def _pct(mean: Any, std: float, seeds: int) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if seeds > 1 else f"{100 * mean:.2f}"


def count_text(n: Any, unit: str = "") -> str:
    """1234567 -> '1.23M' (parameters, MACs); '–' when unknown."""
    if n is None:
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n}{unit}"


def size_text(size: Any) -> str:
    """[1, 28, 28] -> '1×28×28' (an image's channels × height × width); '' when unknown."""
    return "×".join(str(v) for v in size) if size else ""


def _macs(entry: dict[str, Any]) -> str:
    return count_text(entry.get("macs"))


def _macs_at_size(entry: dict[str, Any]) -> str:
    return f"{count_text(entry.get('macs'))} ({size_text(entry.get('input_size')) or '?'})"


def macs_column(table: list[dict[str, Any]]) -> tuple[str, Callable[[dict[str, Any]], str]]:
    """The MACs column's header and cell: the input size they were counted at in the header when
    every net shares it ('MACs / image (1×28×28)'), else in each cell."""
    sizes = {size_text(t.get("input_size")) for t in table}
    if len(sizes) == 1:
        (size,) = sizes
        return f"MACs / image ({size})" if size else "MACs / image", _macs
    return "MACs / image", _macs_at_size


def _table_rows(spec: StudySpec, table: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    macs_header, macs_cell = macs_column(table)
    header = [*spec.label_columns, "params", macs_header, "seeds", "train error % (eval)", "running train error %",
              "val error %", "test error %", "wall s / run"]
    body = [[str(t[c]) for c in spec.label_columns] + [count_text(t.get("params")), macs_cell(t), str(t["seeds"])]
            + [_pct(t[k], t[k + "_std"], t["seeds"]) for k in METRICS] + [f"{t['wall_time']:.0f}"] for t in table]
    return header, body


def _verdict_rows(vs: list[Verdict]) -> tuple[list[str], list[list[str]]]:
    header = ["claim", "metric", "difference (points)", "± stderr", f"{int(CONFIDENCE * 100)}% interval (unadjusted)",
              "seeds", "one-sided p", "Holm level", "decision alone", "decision (Holm)", "budget"]
    body = []
    for v in vs:
        body.append([f"{v.text} [{v.contrast} {v.predicted}]" + ("" if v.headline else " (reported, not in the verdict)"),
                     METRIC_SHORT.get(v.metric, v.metric),
                     "–" if v.difference is None else f"{v.difference:+.2f}",
                     "–" if v.stderr is None else f"{v.stderr:.2f}",
                     "–" if v.ci_low is None else f"[{v.ci_low:+.2f}, {v.ci_high:+.2f}]",
                     str(v.n_seeds), "–" if v.p_value is None else f"{v.p_value:.4f}",
                     "–" if v.holm_level is None else f"{v.holm_level:.4f}",
                     DECISION_WORDS[v.decision_alone or v.decision], DECISION_WORDS[v.decision],
                     f"{budget_text(v.budget)} ({paper_text(v.paper_budget)})"])
    return header, body


def measured_line(m: dict[str, Any]) -> str:
    if m["difference"] is None:
        return f"{m['text']}: no data yet."
    unc = f" ± {m['stderr']:.2f}" if m["stderr"] is not None else ""
    return (f"{m['text']}: {m['contrast']} = {m['difference']:+.2f}{unc} points ({m['n_seeds']} seed{'s' if m['n_seeds'] != 1 else ''}) "
            f"at {budget_text(m.get('budget', {}))} ({paper_text(m.get('paper_budget', {}))}); "
            f"not decided: {m['why_not_decided']}.")


def _emphasis(text: str) -> str:
    """Markdown's *word* as HTML emphasis (the rule is written once, for both pages)."""
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def _html_table(header: list[str], body: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


METRIC_SHORT = {"train_error": "train error (eval)", "running_train_error": "running train error",
                "val_error": "val error", "test_error": "test error"}

RULE = ("Decision rule: each claim is a difference of group means of its metric (the table's metric column: the "
        "final model's training error in eval mode on its training images, or its test error), in points of "
        "percent, predicted to lie above or below a threshold: 0, or the margin the claim names (a claim such as "
        "'at most 1 point worse' is a difference predicted < +1). Runs of one seed share their data, so the "
        "difference is taken per seed; its standard error is the between-seed standard deviation over √seeds "
        "(Welch's, over independent groups, where the seeds differ). Each claim is a one-sided t test at the 5% "
        "level, i.e. the 90% two-sided Student-t interval decides: *reproduced* when it lies wholly on the predicted "
        "side of the threshold, *not reproduced* when it lies wholly on the other side, *inconclusive* when it "
        "contains the threshold. One seed is always inconclusive. "
        f"The study's decided claims are then controlled together (Holm–Bonferroni, family-wise {FAMILY_ALPHA:.0%}): "
        "each claim's one-sided p-value (in the direction its estimate points) is ranked among the k decided claims; "
        "the smallest must be below 5%/k, the next below 5%/(k−1), and so on, stopping at the first that is not. A "
        "claim stays reproduced or not reproduced only if it is decided alone and passes its Holm level; otherwise it "
        "is inconclusive. The table keeps each claim's unadjusted interval and its decision alone beside the "
        "controlled one, and the seeds hint for an undecided claim is at the level its rank faces. Claims measured, "
        "not decided, are not in the family. Every decision holds or fails at the budget it names (steps × batch on "
        "training images, from the runs' results), beside the paper's budget: far below it, the effects are not the "
        "paper's.")


def _setup(spec: StudySpec, study: StudyConfig, rows: list[dict[str, Any]]) -> str:
    cfg = rows[0]["config"] if rows else {}
    length = count_of(cfg.get("epochs"), "epoch") if cfg.get("epochs") else count_of(cfg.get("iterations"), "iteration")
    precision = sorted({r["config"].get("precision", "auto") for r in rows})
    note = spec.setup_note.format(**{**spec.default_options, **study.options}) if spec.setup_note else ""
    test = rows[0].get("test_images") if rows else None
    uncalibrated = UNCALIBRATED.get(study.preset)
    return (f"{study.data} ({cfg.get('train_subset') or 'all'} training images), preset {study.preset} "
            + (f"[not yet calibrated: {uncalibrated}] " if uncalibrated else "") +
            f"(recipe {cfg.get('recipe')}, {length}, batch {cfg.get('batch_size')}, lr {cfg.get('lr')} "
            f"{cfg.get('schedule')}), seeds {', '.join(map(str, sorted({r['seed'] for r in rows})))}, "
            f"precision {'/'.join(precision)}" + (f", test error on {test} test images" if test else "")
            + (f"; {note}" if note else ""))


Tables = list[tuple[str, list[str], list[list[str]]]]
COMPARED = "At this budget and the paper's:"


def _paper_tables(spec: StudySpec) -> Tables:
    return [spec.paper_numbers.table()] if spec.paper_numbers else []


def _paper_comparison(spec: StudySpec, rows: list[dict[str, Any]], doc: dict[str, Any]) -> list[str]:
    """How this budget's effects compare in size with the paper's, one sentence per claim it measures."""
    budget = budget_text(runs_budget(rows, {r["group"] for r in rows}))
    return effect_sentences(spec.paper_numbers, doc["verdicts"], doc["measured"], budget)


def _after_table_md(papers: Tables, compared: list[str], extras: Tables) -> list[str]:
    """What follows the study's table in report.md: the paper's table, the comparison, the extras."""
    md: list[str] = []
    for title, header, body_rows in papers:
        md += [f"**{title}**", "", *_md_table(header, body_rows), ""]
    for line in compared:
        md += [f"*{COMPARED}* {line}", ""]
    for title, header, body_rows in extras:
        md += [f"**{title}**", "", *_md_table(header, body_rows), ""]
    return md


def _after_table_html(papers: Tables, compared: list[str], extras: Tables) -> list[str]:
    """The same in report.html."""
    body = [f"<p><strong>{html.escape(t)}</strong></p>" + _html_table(h, b, "paper") for t, h, b in papers]
    body += [f"<p><em>{html.escape(COMPARED)}</em> {html.escape(line)}</p>" for line in compared]
    body += [f"<p><strong>{html.escape(t)}</strong></p>" + _html_table(h, b, "extra") for t, h, b in extras]
    return body


PAGE_STYLE = ("body{font-family:sans-serif;line-height:1.4;max-width:1100px;margin:auto;padding:0 1em}h1{line-height:1.2}"
              "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #999;padding:4px 8px}"
              "td{font-variant-numeric:tabular-nums}figure{margin:1.5em 0}figure img{max-width:100%;height:auto}")

# Run once the page has loaded; it changes nothing on screen and fetches nothing. It writes on
# <body> how many figures decoded (data-images-loaded of data-images) and, for each table with
# a class (named by its first class), whether it is laid out visibly (data-table-CLASS="visible",
# data-table-CLASS-top in px), and whether the page is wider than the window (data-hscroll), so
# a headless browser's --dump-dom shows a test what a reader would see (tests/test_render.py).
PAGE_CHECK = (
    "addEventListener('load',function(){var b=document.body,d=document.documentElement,n=0,"
    "im=document.images;for(var i=0;i<im.length;i++)if(im[i].complete&&im[i].naturalWidth>0)n++;"
    "b.setAttribute('data-images',im.length);b.setAttribute('data-images-loaded',n);"
    "var ts=document.querySelectorAll('table[class]');for(var j=0;j<ts.length;j++){var t=ts[j],c=t.classList[0],"
    "r=t.getBoundingClientRect(),s=getComputedStyle(t),top=r.top+scrollY,v=r.width>0&&r.height>0&&"
    "top>=0&&r.left+scrollX>=0&&top<d.scrollHeight&&s.display!='none'&&s.visibility=='visible'&&"
    "(!t.checkVisibility||t.checkVisibility({opacityProperty:true,visibilityProperty:true}));"
    "if(c){b.setAttribute('data-table-'+c,v?'visible':'hidden');"
    "b.setAttribute('data-table-'+c+'-top',Math.round(top))}}"
    "b.setAttribute('data-hscroll',d.scrollWidth>d.clientWidth?'yes':'no');b.setAttribute('data-checked','yes')})")


def html_page(title: str, body: str) -> str:
    """A report page: the shared style, the body, and the load check above."""
    return (f"<!doctype html><html><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body>{body}<script>{PAGE_CHECK}</script></body></html>")


def build_report(study_dir: str | Path) -> dict[str, Any]:
    """(Re)draw every figure and write results.jsonl, table.json, report.md and report.html."""
    out = Path(study_dir)
    spec, study = load_study(out)
    rows = collect_rows(spec, study)
    if not rows:
        raise ConfigError(f"{out} holds no finished runs yet; run `resdense study {spec.name} --out {out}`")
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    table = group_table(spec, rows)
    vs = verdicts(spec, study, rows, table)
    measured = measurements(spec, study, rows, table)
    figures = spec.figures(rows, table, out)
    text = verdict_text([v for v in vs if v.headline])
    doc = {"study": spec.name, "table": table, "verdicts": [v.to_dict() for v in vs], "measured": measured,
           "verdict_text": text}
    atomic_write_text(out / "table.json", json.dumps(doc, indent=2))
    study_doc = json.loads((out / "study.json").read_text())
    study_doc["verdicts"] = doc["verdicts"]
    atomic_write_text(out / "study.json", json.dumps(study_doc, indent=2))

    setup = _setup(spec, study, rows)
    th, tb = _table_rows(spec, table)
    vh, vb = _verdict_rows(vs)
    notes = [measured_line(m) for m in measured]
    diverged = [f"{r['run']} ({r['diverged']})" for r in rows if r.get("diverged")]
    remarks = []
    if diverged:
        remarks.append("Diverged runs, evaluated with their weights at that step (their errors are in the table): "
                     + "; ".join(diverged) + ".")
    md = [f"# {spec.title}", "", f"**Verdict.** {text}", "", *_md_table(vh, vb), "", *[f"*Measured, not decided:* {n}"
          for n in notes], *remarks, "", RULE, "", f"Setup: {setup}.", "", *_md_table(th, tb), ""]
    # The paper's numbers for the same comparison come right after the study's own table.
    papers, compared = _paper_tables(spec), _paper_comparison(spec, rows, doc)
    extras = spec.extra_tables(study, rows, table) if spec.extra_tables else []
    md += _after_table_md(papers, compared, extras)
    for name, caption in figures:
        md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    md.append(f"Regenerate with `resdense report {out}`.")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")

    body = [f"<h1>{html.escape(spec.title)}</h1>", f"<p id='verdict'><strong>Verdict.</strong> {html.escape(text)}</p>",
            _html_table(vh, vb, "verdicts"), *[f"<p><em>Measured, not decided:</em> {html.escape(n)}</p>" for n in notes],
            *[f"<p>{html.escape(n)}</p>" for n in remarks],
            f"<p>{_emphasis(html.escape(RULE))}</p>", f"<p>Setup: {html.escape(setup)}.</p>",
            _html_table(th, tb, "groups")]
    body += _after_table_html(papers, compared, extras)
    for name, caption in figures:
        data = base64.b64encode((out / name).read_bytes()).decode()
        body.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(name)}' style='max-width:100%'>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    atomic_write_text(out / "report.html", html_page(f"resdense {spec.name} study", "\n".join(body)))
    return {"study": spec.name, "table": table, "verdicts": vs, "measured": measured, "verdict_text": text,
            "compared": compared, "setup": setup, "finished": max((r["finished"] for r in rows if r.get("finished")),
                                                                  default=None),
            "budget": runs_budget(rows, {r["group"] for r in rows}),
            "paper_budget": spec.paper_budget.to_dict() if spec.paper_budget else {},
            "lines": [summary_line(v) for v in vs], "figures": [str(out / n) for n, _ in figures]}
