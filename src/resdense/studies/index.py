"""The index of a folder of studies (``resdense report FOLDER``): every study's report redrawn, and
``index.html`` / ``index.md`` with one entry per study: its title and report link, the date its
last run finished, its settings and budget (beside the paper's), every claim (the decided ones
with their decision, the measured-but-undecided ones with their difference) and a thumbnail of
its main figure."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from .._io import atomic_write_text
from ..errors import ConfigError
from ..outputs import check_new_file
from .budget import budget_text, paper_text
from .report import build_report, html_page
from .spec import get_study
from .stats import DECISION_WORDS

INDEX_TITLE = "resdense studies"
THUMBNAIL_PX = 360  # the thumbnail's longer side


def _effect(difference: Optional[float], stderr: Optional[float], n_seeds: int) -> str:
    if difference is None:
        return "no data yet"
    unc = f" ± {stderr:.2f}" if stderr is not None else ""
    return f"{difference:+.2f}{unc} points ({n_seeds} seed{'s' if n_seeds != 1 else ''})"


def _claims(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(decision, claim, effect) for every claim: decided first, then measured, not decided."""
    out = [(DECISION_WORDS[v.decision], v.text, f"{v.contrast} = {_effect(v.difference, v.stderr, v.n_seeds)}")
           for v in report["verdicts"]]
    out += [("measured, not decided", m["text"], f"{m['contrast']} = {_effect(m['difference'], m['stderr'], m['n_seeds'])}")
            for m in report["measured"]]
    return out


def _thumbnail(png: Path) -> str:
    """The figure scaled down to THUMBNAIL_PX, as a data URI (the index stands alone, as a report does)."""
    with Image.open(png) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _entry(study_dir: Path) -> dict[str, Any]:
    """What the index shows of one study (its report redrawn); a study with no finished run is
    listed with the reason."""
    try:
        report = build_report(study_dir)
    except ConfigError as e:
        return {"dir": study_dir.name, "title": study_dir.name, "note": str(e), "claims": [], "figure": None,
                "date": "–", "setup": "–", "budget": "–"}
    spec = get_study(report["study"])
    date = report["finished"].replace("T", " ").replace("+00:00", " UTC") if report["finished"] else "date unknown"
    return {"dir": study_dir.name, "title": spec.title, "note": "", "claims": _claims(report),
            "figure": Path(report["figures"][0]) if report["figures"] else None, "date": date,
            "setup": report["setup"],
            "budget": f"{budget_text(report['budget'])} ({paper_text(report['paper_budget'])})"}


def _html_row(e: dict[str, Any]) -> str:
    link = html.escape(f"{e['dir']}/report.html")
    study = (f"<td><a href='{link}'>{html.escape(e['title'])}</a><br><small>{html.escape(e['dir'])}/ · last run "
             f"finished {html.escape(e['date'])}</small></td>")
    setup = (f"<td><small>{html.escape(e['setup'])}</small><br><small><strong>Budget:</strong> "
             f"{html.escape(e['budget'])}</small></td>")
    items = "".join(f"<li><strong>{html.escape(d)}</strong> {html.escape(c)}: {html.escape(x)}</li>"
                    for d, c, x in e["claims"]) or f"<li>{html.escape(e['note'])}</li>"
    claims = f"<td><ul class='claims'>{items}</ul></td>"
    figure = (f"<td><a href='{link}'><img src='{_thumbnail(e['figure'])}' alt='{html.escape(e['figure'].name)}' "
              f"class='thumb'></a></td>" if e["figure"] else "<td>–</td>")
    return "<tr>" + study + setup + claims + figure + "</tr>"


def _md_entry(e: dict[str, Any]) -> list[str]:
    md = [f"## [{e['title']}]({e['dir']}/report.html)", "", f"Last run finished {e['date']}. Settings: {e['setup']}. "
          f"Budget: {e['budget']}.", ""]
    md += [f"- **{d}** {c}: {x}" for d, c, x in e["claims"]] or [f"- {e['note']}"]
    if e["figure"]:
        md += ["", f"![{e['figure'].name}]({e['dir']}/{e['figure'].name})"]
    return md + [""]


INDEX_STYLE = ("<style>table.index td{vertical-align:top}table.index small{color:#333}"
               "ul.claims{margin:0;padding-left:1.1em}img.thumb{width:240px;height:auto}</style>")


def build_index(folder: str | Path) -> dict[str, Any]:
    """Redraw the report of every study directly inside ``folder`` and write ``folder/index.html``
    (and ``index.md``)."""
    root = Path(folder)
    studies = sorted(p.parent for p in root.glob("*/study.json"))
    if not studies:
        raise ConfigError(f"{root} holds no study folders (none has a study.json); run `resdense study NAME --out "
                          f"{root}/NAME` first")
    for name, signature in (("index.md", INDEX_TITLE), ("index.html", f"<title>{INDEX_TITLE}</title>")):
        check_new_file(root / name, "the index", signature)  # before any report is redrawn
    entries = [_entry(d) for d in studies]
    md = [f"# {INDEX_TITLE}", ""]
    for e in entries:
        md += _md_entry(e)
    atomic_write_text(root / "index.md", "\n".join(md))
    body = (f"{INDEX_STYLE}<h1>{INDEX_TITLE}</h1><table class='index'><thead><tr><th>study</th>"
            "<th>settings and budget</th><th>claims (decided, then measured)</th><th>main figure</th></tr></thead>"
            "<tbody>" + "".join(_html_row(e) for e in entries) + "</tbody></table>")
    atomic_write_text(root / "index.html", html_page(INDEX_TITLE, body))
    return {"studies": [e["dir"] for e in entries], "index": str(root / "index.html")}
