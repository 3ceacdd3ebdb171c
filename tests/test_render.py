"""The reports as a reader sees them: the index and each study's report rendered in headless
Chromium (Debian's ``chromium``; ``make browser`` installs it, ``make test`` runs that first).
Every figure must decode, the verdict table must be laid out visibly near the top, the page must
fit the window's width, and the screenshot must be a real picture of the requested size.

The pages carry a small load check (``resdense.studies.report.PAGE_CHECK``) that writes what it
saw on ``<body>`` as data attributes; ``chromium --dump-dom`` prints the DOM after it ran.
Screenshots are left in each test's tmp_path (index.png, NAME.png) to look at.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from conftest import SPEC_ARGS, build_tiny_studies, build_tiny_study, run_cli, small_test_split

CHROMIUM = shutil.which("chromium")
WINDOW = (1280, 1000)  # width, height of the window and of the screenshots
TIMEOUT_S = 60


def _tiny_degradation(base: Path) -> Path:
    with small_test_split():
        return build_tiny_study(base / "tiny-degradation-study")[0]


def _tiny_spec_study(name: str, base: Path) -> Path:
    with small_test_split():
        return build_tiny_studies(base / "tiny-studies") / name


# Study name -> a function that trains (or finds) a tiny finished study and returns its folder.
# Another study's report is rendered by adding its tiny builder here.
STUDIES: dict[str, Callable[[Path], Path]] = {
    "degradation": _tiny_degradation,
    **{name: functools.partial(_tiny_spec_study, name) for name in SPEC_ARGS},
}


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    """Headless Chromium with ARGS; killed with its whole process group after TIMEOUT_S."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=5000", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {TIMEOUT_S} s: {' '.join(cmd)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class _Body(HTMLParser):
    """The attributes of <body> and every link's href."""

    def __init__(self) -> None:
        super().__init__()
        self.attrs: dict[str, str] = {}
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self.attrs = {k: v or "" for k, v in attrs}
        elif tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]


def rendered(page: Path, tmp: Path) -> _Body:
    """The page's DOM after load, as chromium dumps it."""
    proc = chromium(["--dump-dom", page.resolve().as_uri()], tmp / "profile")
    assert proc.returncode == 0 and "<body" in proc.stdout, f"chromium --dump-dom {page}: {proc.stderr[-2000:]}"
    body = _Body()
    body.feed(proc.stdout)
    assert body.attrs.get("data-checked") == "yes", f"the page's load check did not run: {body.attrs}"
    return body


def screenshot(page: Path, png: Path, tmp: Path) -> Image.Image:
    """A screenshot of the page's first WINDOW, checked to be a PNG of that size with something on it."""
    proc = chromium([f"--screenshot={png}", page.resolve().as_uri()], tmp / "profile")
    assert proc.returncode == 0 and png.is_file(), f"chromium --screenshot {page}: {proc.stderr[-2000:]}"
    image = Image.open(png)
    assert image.format == "PNG" and image.size == WINDOW
    ink = image.convert("L").point(lambda v: 255 if v < 250 else 0)  # whatever is not the white page
    drawn, box = sum(ink.histogram()[1:]), ink.getbbox()
    assert drawn > 0.005 * WINDOW[0] * WINDOW[1], f"{png} is (nearly) blank: {drawn} pixels drawn"
    assert box is not None and box[2] - box[0] > WINDOW[0] // 2, f"{png}: nothing drawn across the page ({box})"
    return image


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium not installed: make browser installs it (Debian's chromium package)")
    tmp = tmp_path_factory.mktemp("probe")
    (tmp / "probe.html").write_text("<!doctype html><body data-checked=yes>ok</body>")
    proc = chromium(["--dump-dom", (tmp / "probe.html").as_uri()], tmp / "profile")
    if proc.returncode != 0 or "ok" not in proc.stdout:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"chromium is installed but cannot render a page here: {last}")


@pytest.fixture(scope="module")
def reports(browser, tmp_path_factory) -> Path:
    """A folder with one tiny finished study per entry of STUDIES, indexed by `resdense report`."""
    base = tmp_path_factory.getbasetemp()
    root = tmp_path_factory.mktemp("reports")
    for name, build in STUDIES.items():
        study = build(base)
        (root / name).mkdir()
        for f in ("study.json", "results.jsonl"):  # the report is redrawn from the result files alone
            shutil.copy(study / f, root / name / f)
    code, _, err = run_cli(["report", str(root)])
    assert code == 0, err
    return root


def test_index_renders_with_a_visible_table_and_links_to_every_report(reports, tmp_path):
    index = reports / "index.html"
    body = rendered(index, tmp_path)
    assert body.attrs["data-table-index"] == "visible", body.attrs
    assert int(body.attrs["data-table-index-top"]) < WINDOW[1]
    # One thumbnail of its main figure per study, each decoded.
    assert body.attrs["data-images"] == body.attrs["data-images-loaded"] == str(len(STUDIES))
    assert body.attrs["data-hscroll"] == "no", "the index is wider than the window"
    assert set(body.links) == {f"{name}/report.html" for name in STUDIES}  # title and thumbnail, each linked
    for link in body.links:
        assert (reports / link).is_file(), f"the index links {link}, which does not exist"
    screenshot(index, tmp_path / "index.png", tmp_path)


def test_index_shows_each_studys_settings_budget_date_and_every_claim(reports):
    page = html.unescape((reports / "index.html").read_text())
    for name in STUDIES:
        doc = json.loads((reports / name / "table.json").read_text())
        row = page[page.index(f"href='{name}/report.html'"):]
        row = row[:row.index("</tr>")]
        assert re.search(r"last run finished \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", row), row[:300]
        assert re.search(r"preset \w+ \(recipe \w+, .* seeds [\d, ]+, precision", row), "the study's settings"
        assert re.search(r"Budget:</strong> [\d,]+ steps? × \d+ on [\d,]+ images? .*\(paper: ", row), "its budget"
        claims = [v["text"] for v in doc["verdicts"]] + [m["text"] for m in doc["measured"]]
        assert claims and all(c in row for c in claims), f"{name}: a claim is missing from the index"
        assert ("measured, not decided" in row) == bool(doc["measured"])
        assert "<img src='data:image/png;base64," in row


@pytest.mark.parametrize("name", list(STUDIES))
def test_report_says_the_input_size_of_its_macs(reports, name):
    page = html.unescape((reports / name / "report.html").read_text())
    rows = [json.loads(line) for line in (reports / name / "results.jsonl").read_text().splitlines()]
    size = "×".join(map(str, rows[0]["input_size"]))
    assert f"<th>MACs / image ({size})</th>" in page


@pytest.mark.parametrize("name", list(STUDIES))
def test_report_renders_every_figure_and_the_verdict_table(reports, name, tmp_path):
    page = reports / name / "report.html"
    body = rendered(page, tmp_path)
    images, loaded = int(body.attrs["data-images"]), int(body.attrs["data-images-loaded"])
    assert images > 0 and loaded == images, f"{loaded} of {images} figures loaded"
    assert body.attrs["data-table-verdicts"] == "visible", body.attrs
    assert int(body.attrs["data-table-verdicts-top"]) < WINDOW[1], "the verdict table is below the first screen"
    assert body.attrs["data-table-groups"] == "visible", body.attrs
    assert body.attrs["data-hscroll"] == "no", "the report is wider than the window"
    screenshot(page, tmp_path / f"{name}.png", tmp_path)


def test_a_broken_figure_or_a_hidden_table_is_seen(browser, tmp_path):
    """The load check can fail: a figure that does not decode and a hidden verdict table are reported."""
    from resdense.studies.report import html_page

    good = Image.new("RGB", (4, 4), "black")
    good.save(tmp_path / "good.png")
    page = tmp_path / "broken.html"
    page.write_text(html_page("broken", "<img src='good.png'><img src='data:image/png;base64,AAAA'>"
                                        "<img src='missing.png'><table class='verdicts' style='display:none'>"
                                        "<tr><td>x</td></tr></table><table class='groups'><tr><td>y</td></tr></table>"
                                        "<table class='index' style='visibility:hidden'><tr><td>z</td></tr></table>"
                                        f"<div style='width:{2 * WINDOW[0]}px'>wide</div>"))
    body = rendered(page, tmp_path)
    assert (body.attrs["data-images"], body.attrs["data-images-loaded"]) == ("3", "1")
    assert body.attrs["data-table-verdicts"] == "hidden" and body.attrs["data-table-index"] == "hidden"
    assert body.attrs["data-table-groups"] == "visible"
    assert body.attrs["data-hscroll"] == "yes"
    # A blank page is not a screenshot of a report.
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><body></body>")
    with pytest.raises(AssertionError, match="blank"):
        screenshot(blank, tmp_path / "blank.png", tmp_path)


def _figures_drawn(name: str, base: Path, out: Path, monkeypatch) -> list:
    """The matplotlib figures of study NAME's report, drawn from its tiny study's results."""
    from resdense import plots
    from resdense.studies import figures as study_figures
    from resdense.studies.report import collect_rows, group_table, load_study

    drawn = []

    def keep(fig, path):
        drawn.append(fig)
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    monkeypatch.setattr(study_figures, "_save", keep)
    spec, study = load_study(STUDIES[name](base))
    rows = collect_rows(spec, study)
    spec.figures(rows, group_table(spec, rows), out)
    return drawn


def _hue(artist) -> float:
    import colorsys

    from matplotlib.colors import to_rgb
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    colour = (artist.get_color() if isinstance(artist, Line2D) else artist.get_facecolor() if isinstance(artist, Patch)
              else artist.get_edgecolor()[0])
    return round(colorsys.rgb_to_hsv(*to_rgb(colour))[0], 3)


@pytest.mark.parametrize("name", list(STUDIES))
def test_every_figure_of_a_study_gives_a_net_one_colour_and_errors_start_at_0(name, tmp_path_factory, tmp_path,
                                                                               monkeypatch):
    drawn = _figures_drawn(name, tmp_path_factory.getbasetemp(), tmp_path, monkeypatch)
    assert drawn
    hues: dict[str, set[float]] = {}
    for fig in drawn:
        for artist in fig.findobj(lambda a: a.get_gid() is not None):
            hues.setdefault(artist.get_gid(), set()).add(_hue(artist))
        for ax in fig.axes:
            if "error" in ax.get_ylabel() and ax.get_yscale() == "linear":
                assert ax.get_ylim()[0] == 0, f"{name}: {ax.get_ylabel()!r} starts at {ax.get_ylim()[0]}"
    assert hues and all(len(h) == 1 for h in hues.values()), f"{name}: a net drawn in several colours: {hues}"
    if name == "degradation":  # plain and residual nets: two colours, the same in both figures
        assert len(drawn) == 2 and hues["plain"] != hues["resnet"]
