"""Specification of dirio.viz.html_report: the per-pair thumbnail and the static HTML page of a run.

The page is checked as text (every referenced file exists inside the run folder, one table row
per pair, text from the run folder escaped, nothing fetched from the network) and in headless
Chromium (the DOM after the page's script ran holds the table, a click on a header sorts it,
the console stays silent). The browser tests skip when no Chromium binary is found: set
DIRIO_CHROMIUM to one, or run ``make test``, which installs Debian's chromium-headless-shell
when it runs as root with apt-get.
"""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from chromium_cdp import BROWSER_NAMES, find_chromium
from dirio.viz import html_report
from dirio.errors import DirioError

SHAPE_3D = (12, 14, 16)
FOLD_RGB = np.array([0.0, 1.0, 0.0])  # report.FOLD_COLOR, "lime"

# --- synthetic data ----------------------------------------------------------------------------


def _blob(shape, centre_shift=0.0):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    grid[0] -= centre_shift
    return np.exp(-4.0 * (grid**2).sum(0)).astype(np.float32)


def _smooth_disp(shape, amplitude=1.0):
    """``(ndim, *S)`` smooth displacement in voxels, no folds (|du/dx| well below 1)."""
    grid = np.stack(np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij"))
    return (amplitude * np.sin(grid)).astype(np.float32)


def _folding_disp(shape):
    """``(ndim, *S)`` displacement with a fold: ``u_0 = -2 x_0`` near the centre gives det < 0."""
    disp = np.zeros((len(shape), *shape), dtype=np.float32)
    centre = [n // 2 for n in shape]
    region = tuple(slice(c - 2, c + 3) for c in centre)
    axis0 = np.arange(shape[0], dtype=np.float32).reshape(-1, *([1] * (len(shape) - 1)))
    disp[0][region] = np.broadcast_to(-2.0 * (axis0 - centre[0]), shape)[region]
    return disp


def _read_png(path):
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path, format="png")
    return image[..., :3]


# A run folder as the runner writes it: 4 pairs in dataset order, one failed, one with an undefined
# Dice, no keypoints (TRE columns empty), and text that must be escaped in the page.
PAIRS = [
    # pair, status, dice, hd95, sdlogj, fold_percent, dice_before, seconds, error
    ("0003_0004", "done", "0.81", "2.5", "0.061", "0.0", "0.55", "11.5", ""),
    ("0001_0002", "done", "0.72", "3.75", "0.071", "0.012", "0.5", "9.25", ""),
    ("0005_0006", "done", "nan", "", "0.05", "0.0", "", "10.0", ""),
    ("0007_0008", "failed", "", "", "", "", "", "0.5", 'cannot read <moving> & "imagesTr/x.nii.gz"'),
    ("0009_0010", "done", "0.9", "1.5", "0.04", "0.0", "0.6", "12.0", ""),
]
CASE_COLUMNS = [
    "pair", "fixed", "moving", "status", "seconds", "dice", "hd95", "sdlogj", "fold_percent", "ndv_percent",
    "tre_mm", "dice_before", "tre_mm_before", "error",
]  # fmt: skip
HOSTILE = "<script>window.injected = 1</script>"


def _fake_run(out: Path, labels=True, summary=True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "thumbnails").mkdir()
    rows = []
    for number, (pair, status, dice, hd95, sdlogj, fold, dice_before, seconds, error) in enumerate(PAIRS):
        fixed_id, moving_id = pair.split("_")
        rows.append({
            "pair": pair, "fixed": f"./imagesTr/CASE_{fixed_id}_0000.nii.gz",
            "moving": f"./imagesTr/CASE_{moving_id}_0000.nii.gz", "status": status, "seconds": seconds,
            "dice": dice, "hd95": hd95, "sdlogj": sdlogj, "fold_percent": fold, "ndv_percent": fold,
            "tre_mm": "", "dice_before": dice_before, "tre_mm_before": "", "error": error,
        })  # fmt: skip
        if status == "done":
            fixed = _blob(SHAPE_3D)
            warped = _blob(SHAPE_3D, centre_shift=0.1 * number)
            html_report.pair_thumbnail(out / "thumbnails" / f"{pair}.png", fixed, warped, _smooth_disp(SHAPE_3D))
    with (out / "cases.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CASE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if labels:
        with (out / "labels.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["pair", "label", "dice", "hd95"])
            for pair, status, *_ in PAIRS:
                if status == "done":
                    for label, dice in ((1, 0.8), (2, 0.7), (10, float("nan"))):
                        writer.writerow([pair, label, dice, 2.0 * label])
    if summary:
        aggregates = {
            "DSC": {"mean": 0.81, "std": 0.07, "30": 0.76},
            "HD95": {"mean": 2.58, "std": 0.9, "30": 2.2},
            "LogJacDetStd": {"mean": 0.057, "std": 0.01, "30": 0.05},
        }
        failed = [{"pair": "0007_0008", "error": 'cannot read <moving> & "imagesTr/x.nii.gz"'}]
        (out / "summary.json").write_text(json.dumps({"name": "TEST", "aggregates": aggregates, "failed": failed}))
    info = {
        "dataset": "/data/TEST_dataset.json", "split": "val",
        "config": {"method": "instance", "similarity": "ncc", "note": HOSTILE, "levels": [4, 2, 1]},
        "config_file": "config.toml", "config_hash": "ab" * 32,
        "versions": {"dirio": "0.1.0", "torch": "2.13.0", "python": "3.11"},
        "world_size": 2, "started": "2025-01-01T10:00:00", "finished": "2025-01-01T10:01:00", "seconds": 60.0,
        "pairs": 5, "done": 4, "failed": 1, "device": "cpu",
    }  # fmt: skip
    (out / "run.json").write_text(json.dumps(info))
    return out


class _Links(HTMLParser):
    """Every src / href of a page, and the text of the per-pair table's rows."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.rows: list[list[str]] = []
        self._in_cases = self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if attrs.get(name):
                self.links.append(attrs[name])
        if tag == "table":
            self._in_cases = attrs.get("id") == "cases"
        elif tag == "tbody" and self._in_cases:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _assert_links_resolve(page: Path, run_folder: Path) -> None:
    """Every link is relative, points inside the run folder, and names an existing file."""
    from urllib.parse import unquote

    links = _parse(page).links
    assert links
    for link in links:
        assert not re.match(r"^[a-z]+:|^//", link), f"absolute or remote reference {link}"
        if link.startswith("#"):
            continue
        target = (page.parent / unquote(link)).resolve()
        assert target.is_file(), f"{link} does not exist"
        assert run_folder.resolve() in target.parents, f"{link} leaves the run folder"


# --- thumbnails --------------------------------------------------------------------------------


def test_thumbnail_shows_overlay_on_top_and_jacobian_below(tmp_path):
    """Top half: fixed magenta (R = B), warped green; bottom half: the Jacobian map with folds in lime."""
    fixed = _blob(SHAPE_3D)
    path = html_report.pair_thumbnail(tmp_path / "t.png", fixed, np.zeros_like(fixed), _folding_disp(SHAPE_3D))
    image = _read_png(path)
    height, width = image.shape[:2]
    assert 150 < width < 600 and 100 < height < 500
    top, bottom = image[: height // 2], image[height // 2 :]
    magenta = (top[..., 0] > 0.5) & (top[..., 2] > 0.5) & (top[..., 1] < 0.1)
    assert magenta.sum() > 50  # the fixed blob, with nothing of warped over it
    is_fold = np.all(np.abs(image - FOLD_RGB) < 0.05, axis=-1)
    assert is_fold[height // 2 :].sum() > 10 and is_fold[: height // 2].sum() == 0
    assert not np.any(np.all(np.abs(bottom - FOLD_RGB) < 0.05, axis=-1)[:, :2])  # not along the border


def test_thumbnail_of_identical_images_and_zero_field_is_grey_and_white(tmp_path):
    """Aligned images overlay to grey (R = G = B); det = 1 everywhere is drawn white-ish, no folds."""
    fixed = _blob(SHAPE_3D)
    image = _read_png(html_report.pair_thumbnail(tmp_path / "t.png", fixed, fixed, np.zeros((3, *SHAPE_3D))))
    assert np.allclose(image[..., 0], image[..., 1], atol=0.02) and np.allclose(image[..., 0], image[..., 2], atol=0.02)
    assert image[image.shape[0] // 2 :].min() > 0.9


def test_thumbnail_accepts_channels_first_and_learn2reg_layouts_alike(tmp_path):
    fixed, warped, disp = _blob(SHAPE_3D), _blob(SHAPE_3D, 0.2), _smooth_disp(SHAPE_3D, 2.0)
    first = html_report.pair_thumbnail(tmp_path / "first.png", fixed, warped, disp)
    last = html_report.pair_thumbnail(tmp_path / "last.png", fixed, warped, np.moveaxis(disp, 0, -1))
    assert np.array_equal(_read_png(first), _read_png(last))


def test_thumbnail_of_2d_pair_has_one_column(tmp_path):
    shape = (20, 30)
    image = _read_png(html_report.pair_thumbnail(tmp_path / "t.png", _blob(shape), _blob(shape), _folding_disp(shape)))
    height, width = image.shape[:2]
    assert width < 200 and height > width  # one overlay above one Jacobian panel


def test_thumbnail_replaces_by_default_and_refuses_when_asked_not_to(tmp_path):
    """The runner redraws a redone pair's thumbnail; overwrite=False keeps dirio's refuse-to-replace rule."""
    path = tmp_path / "t.png"
    path.write_bytes(b"old")
    html_report.pair_thumbnail(path, _blob(SHAPE_3D), _blob(SHAPE_3D), _smooth_disp(SHAPE_3D))
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(DirioError, match="exists"):
        html_report.pair_thumbnail(path, _blob(SHAPE_3D), _blob(SHAPE_3D), _smooth_disp(SHAPE_3D), overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png"]  # no temporary file left


@pytest.mark.parametrize(
    "disp_shape, match",
    [((2, *SHAPE_3D), "displacement must have shape"), ((*SHAPE_3D, 2), "displacement must have shape")],
)
def test_thumbnail_rejects_a_field_of_the_wrong_shape(tmp_path, disp_shape, match):
    with pytest.raises(DirioError, match=match):
        html_report.pair_thumbnail(tmp_path / "t.png", _blob(SHAPE_3D), _blob(SHAPE_3D), np.zeros(disp_shape))


# --- the page as text --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(OUT, page)``: the fake run folder and its report, built once for the tests that only read
    them; tests that change a run folder copy it first."""
    out = _fake_run(tmp_path_factory.mktemp("built") / "OUT")
    return out, html_report.write_report(out)


def _copy(built, tmp_path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "OUT"))


def test_report_has_one_row_per_pair_and_every_referenced_file_exists(built):
    out, page = built
    assert page == out / "report" / "index.html"
    _assert_links_resolve(page, out)
    parsed = _parse(page)
    assert [row[0] for row in parsed.rows] == [p[0] for p in PAIRS]  # dataset order
    assert {"report/metrics.png", "report/labels.png"} <= {
        str(p.relative_to(out)) for p in (out / "report").iterdir()
    }
    done = [p[0] for p in PAIRS if p[1] == "done"]
    for pair in done:
        assert f"../thumbnails/{pair}.png" in parsed.links
    text = page.read_text()
    assert "dirio run: TEST_dataset, val" in text  # title: dataset and split
    assert '<table id="aggregates"' in text and "30th percentile" in text


def test_report_lists_failed_pairs_with_their_error_and_leaves_out_empty_columns(built):
    _, page = built
    text = page.read_text()
    failed_row = next(row for row in _parse(page).rows if row[0] == "0007_0008")
    assert failed_row[1] == "failed" and failed_row[-1] == 'cannot read <moving> & "imagesTr/x.nii.gz"'
    assert 'id="failures"' in text and "Failures (1)" in text
    assert 'data-key="tre_mm"' not in text  # no keypoints in this run: no TRE column
    assert 'data-key="dice"' in text and 'data-key="seconds"' in text


def test_report_escapes_text_from_the_run_folder(built):
    text = built[1].read_text()
    assert HOSTILE not in text and html.escape(HOSTILE) in text
    assert "<moving>" not in text and "&lt;moving&gt; &amp; &quot;imagesTr/x.nii.gz&quot;" in text


def test_report_works_after_the_run_folder_is_moved(built, tmp_path):
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(_copy(built, tmp_path), moved)
    _assert_links_resolve(moved / "report" / "index.html", moved)


def test_report_of_a_run_without_labels_summary_or_thumbnails(tmp_path):
    """Optional inputs leave out what needs them; a stale per-label plot of an earlier build goes."""
    out = _fake_run(tmp_path / "OUT", labels=False, summary=False)
    shutil.rmtree(out / "thumbnails")
    (out / "report").mkdir()
    (out / "report" / "labels.png").write_bytes(b"stale")
    page = html_report.write_report(out)
    _assert_links_resolve(page, out)
    text = page.read_text()
    assert not (out / "report" / "labels.png").exists()
    assert 'id="aggregates"' not in text and 'id="thumbnails"' not in text
    assert len(_parse(page).rows) == len(PAIRS)
    assert "Failures (1)" in text  # from cases.csv when summary.json is missing


def test_report_names_an_unreadable_file_instead_of_failing(built, tmp_path):
    out = _copy(built, tmp_path)
    (out / "summary.json").write_text('{"aggregates": ')  # truncated
    text = html_report.write_report(out).read_text()
    assert "summary.json could not be read" in text
    assert len(_parse(out / "report" / "index.html").rows) == len(PAIRS)


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(DirioError, match="not a dirio run folder"):
        html_report.write_report(tmp_path)
    with pytest.raises(DirioError, match="no such run folder"):
        html_report.write_report(tmp_path / "missing")


def test_report_is_rebuilt_in_place_without_temporary_files(built, tmp_path):
    out = _copy(built, tmp_path)
    first = (out / "report" / "index.html").read_bytes()
    assert html_report.write_report(out).read_bytes() == first  # deterministic, replaced
    assert not [p for p in out.rglob(".tmp-*")]


# --- the page in headless Chromium -------------------------------------------------------------

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no headless Chromium on PATH (looked for DIRIO_CHROMIUM, " + ", ".join(BROWSER_NAMES) + "); "
    "`make test` installs chromium-headless-shell when run as root with apt-get",
)
# Chromium logs every console message of a page (log, warn, error, uncaught exceptions) to
# stderr with --enable-logging=stderr, as `[...:INFO:CONSOLE:12] "message", source: URL (12)`
# (older versions: `INFO:CONSOLE(12)]`), whatever the message's level.
CONSOLE_LINE = re.compile(r":CONSOLE[:(]|Uncaught")


def _load_in_chromium(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The page's DOM after its scripts ran, and the console lines Chromium logged for it."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, [line for line in result.stderr.splitlines() if CONSOLE_LINE.search(line)]


# Scripts appended to a copy of a page (beside it, so relative links resolve) record what they
# see in the body attribute data-probe, read back from the dumped DOM. IMAGES_PROBE loads every
# image now (lazy ones included) and records, once all have loaded, each image's decoded width.
IMAGES_PROBE = """
Array.from(document.images, function (image) { image.loading = "eager"; });
window.addEventListener("load", function () {
  probe(Array.from(document.images, function (image) { return [image.getAttribute("src"), image.naturalWidth]; }));
});
"""


def _probe(page: Path, script: str, profile: Path, name: str) -> tuple[object, list[str]]:
    """Run ``script`` (which calls ``probe(value)``) after the page's own scripts, in a copy of
    the page named ``probe-<name>.html``; return the JSON value it recorded and the console lines."""
    helper = 'function probe(value) { document.body.setAttribute("data-probe", JSON.stringify(value)); }'
    copy = page.with_name(f"probe-{name}.html")
    copy.write_text(page.read_text().replace("</body>", f"<script>{helper}{script}</script></body>"))
    dom, console = _load_in_chromium(copy, profile)
    found = re.search(r'data-probe="([^"]*)"', dom)
    return (json.loads(html.unescape(found.group(1))) if found else None), console


@needs_chromium
def test_browser_checks_catch_console_errors_and_broken_images(tmp_path):
    """The checks below are only meaningful if they can fail: a page with a deliberate script
    error, a console.error call and a missing image is caught by each of them."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><body><p id="p">x</p><img src="missing.png" alt="missing">'
        '<script>console.error("deliberate console error"); undefinedFunction();</script></body></html>'
    )
    dom, console = _load_in_chromium(page, tmp_path / "profile")
    assert '<p id="p">x</p>' in dom
    assert any("deliberate console error" in line for line in console)
    assert any("Uncaught ReferenceError" in line for line in console)
    images, _ = _probe(page, IMAGES_PROBE, tmp_path / "profile", "images")
    assert images == [["missing.png", 0]]


@needs_chromium
def test_page_in_chromium_shows_the_table_and_logs_nothing_to_the_console(built, tmp_path):
    page = built[1]
    dom, console = _load_in_chromium(page, tmp_path / "profile")
    assert console == []
    for pair, *_ in PAIRS:
        assert f">{pair}<" in dom
    assert len(re.findall(r"<tr[ >]", dom.split('id="cases"')[1].split("</table>")[0])) == len(PAIRS) + 1
    assert "window.injected" not in dom.replace(html.escape(HOSTILE), "")  # the hostile text stayed text
    images, console = _probe(page, IMAGES_PROBE, tmp_path / "profile", "images")
    assert console == []
    assert len(images) == 2 + sum(p[1] == "done" for p in PAIRS)  # box plots per metric and label, thumbnails
    assert all(width > 0 for _, width in images), images


@needs_chromium
def test_clicking_a_header_sorts_numerically_with_empty_cells_last(built, tmp_path):
    """The page's own click handler runs: a script clicks the Dice header twice, then the pair
    header, and records the row order after each click."""
    page = built[1]
    clicks = """
    function order() { return Array.from(document.querySelectorAll("#cases tbody tr"), r => r.cells[0].textContent); }
    function click(key) { document.querySelector('#cases th[data-key="' + key + '"] button').click(); return order(); }
    probe({ascending: click("dice"), descending: click("dice"), pair: click("pair"),
           sort: document.querySelector('#cases th[data-key="pair"]').getAttribute("aria-sort")});
    """
    result, console = _probe(page, clicks, tmp_path / "profile", "clicks")
    assert console == []
    # Dice: 0.72 < 0.81 < 0.9, then nan (done) and empty (failed) in their previous order
    assert result["ascending"] == ["0001_0002", "0003_0004", "0009_0010", "0005_0006", "0007_0008"]
    assert result["descending"] == ["0009_0010", "0003_0004", "0001_0002", "0005_0006", "0007_0008"]
    assert result["pair"] == sorted(p[0] for p in PAIRS) and result["sort"] == "ascending"
