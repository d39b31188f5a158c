"""Specification of the documentation site (mkdocs.yml, docs/, docs/hooks/dirio_docs.py).

- ``mkdocs build --strict`` succeeds: no warning, so no broken link between pages, no missing
  anchor, no docstring the API reference cannot read.
- The command-line reference is generated from the parsers: every option of every subcommand (those
  of ``dirio register --help`` first) appears in it with its help text, and the presets table is
  what :func:`dirio.config.settings.make_settings` resolves.
- Every internal link and image of the built site resolves (checked on the HTML files, and a
  deliberately broken page is caught).
- In headless Chromium, the site served from 127.0.0.1 (the search runs in a web worker, which
  browsers refuse from ``file://``): every page of the navigation loads without a console error and
  with every image decoded, a click on a navigation tab opens its page, and typing in the search box
  finds a page by a word of its text.

The build is skipped, with its reason, only when the ``docs`` extra is not installed (CI installs
it); the browser tests also when no Chromium is found (see tests/test_html_report.py).
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

from chromium_cdp import Browser, StaticServer, find_chromium

REPOSITORY = Path(__file__).resolve().parents[1]
MISSING = next((name for name in ("mkdocs", "material", "mkdocstrings_handlers.python")
                if importlib.util.find_spec(name.split(".")[0]) is None
                or importlib.util.find_spec(name) is None), None)  # fmt: skip
needs_docs = pytest.mark.skipif(
    MISSING is not None,
    reason=f"{MISSING} is not installed: the 'docs' extra (pip install -c constraints.txt -e '.[docs]') builds the site",
)
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no headless Chromium on PATH (DIRIO_CHROMIUM, chromium-headless-shell, chromium, ...); "
    "`make test` installs chromium-headless-shell when run as root with apt-get",
)


def _hooks():
    """docs/hooks/dirio_docs.py as a module (it is not part of the package)."""
    if "dirio_docs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("dirio_docs", REPOSITORY / "docs" / "hooks" / "dirio_docs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["dirio_docs"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["dirio_docs"]


# --- the build -----------------------------------------------------------------------------------


_BUILD_FAILED: list[str] = []  # a failed build fails every test that needs it once, without building again


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built by ``mkdocs build --strict`` into a temporary folder; the build's log is checked."""
    if MISSING is not None:
        pytest.skip(f"{MISSING} is not installed (the 'docs' extra)")
    if _BUILD_FAILED:
        pytest.fail(f"the site did not build (see the first failing test):\n{_BUILD_FAILED[0][-1500:]}")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    config = os.environ.get("DIRIO_MKDOCS_CONFIG") or str(REPOSITORY / "mkdocs.yml")  # another copy, when writing docs
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out), "-f", config],
        capture_output=True, text=True, timeout=600, cwd=REPOSITORY, env=env,
    )  # fmt: skip
    log = result.stdout + result.stderr
    if result.returncode != 0 or "WARNING" in log:
        _BUILD_FAILED.append(log)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    assert "WARNING" not in log, log[-6000:]
    return out


def _page(site: Path, url: str) -> str:
    return (site / url / "index.html").read_text(encoding="utf-8")


@needs_docs
def test_strict_build_makes_every_section_of_the_navigation(site):
    for section in ("getting-started", "how-to/brain-mri", "how-to/datasets", "how-to/training", "how-to/itk",
                    "how-to/distributed", "concepts/engine", "concepts/presets", "concepts/methods", "reference/cli",
                    "reference/api", "reference/formats", "reference/metrics", "benchmarks", "benchmarks/results",
                    "development/architecture", "development/testing", "development/extending"):
        assert (site / section / "index.html").is_file(), section
    assert (site / "index.html").is_file() and (site / "search" / "search_index.json").is_file()


# --- generated content ---------------------------------------------------------------------------


def _commands():
    from dirio.apps.cli import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    return action.choices


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]  # noqa: SLF001


def test_generated_cli_reference_lists_every_option_of_every_command_with_its_help():
    markdown = _hooks().cli_reference_markdown()
    commands = _commands()
    assert "register" in commands and len(_options(commands["register"])) > 60
    for name, parser in commands.items():
        section = markdown.split(f"## `dirio {name}`", 1)[1].split("\n## ", 1)[0]
        for action in _options(parser):
            for flag in action.option_strings:
                assert f"`{flag}`" in section, f"dirio {name} {flag}"
            if action.help:
                words = " ".join(action.help.split())
                assert html.unescape(words[:40]) in html.unescape(section.replace("\\|", "|")), (name, action.dest)


@needs_docs
def test_every_option_of_dirio_register_help_appears_in_the_built_cli_reference(site):
    """The options as ``dirio register --help`` prints them, read from its text, in the built page."""
    help_text = subprocess.run([sys.executable, "-m", "dirio", "register", "--help"], capture_output=True, text=True,
                               timeout=120, cwd=REPOSITORY).stdout
    # the option lines of --help: "  -o OUTPUT, --output OUTPUT", "  --preset {brain-mri,...}"
    flags = {flag for line in help_text.splitlines() if re.match(r"^ {2}-", line)
             for flag in re.findall(r"(?:^|, )(--?[a-zA-Z][\w-]*)", line.strip())} - {"-h", "--help"}
    assert {"--preset", "--similarity", "--levels", "--method", "--itk-field", "--overwrite", "-o"} <= flags
    page = html.unescape(re.sub(r"<[^>]+>", "", _page(site, "reference/cli").split('id="register"', 1)[1]
                                .split('id="warp"', 1)[0]))
    missing = sorted(flag for flag in flags if flag not in page)
    assert not missing, f"options of dirio register --help missing from the CLI reference: {missing}"


def test_presets_table_is_what_make_settings_resolves():
    from dirio.config.presets import PRESETS
    from dirio.config.settings import make_settings

    hooks = _hooks()
    rows = [line.split(" | ") for line in hooks.presets_markdown().splitlines()[2:]]
    table = {row[0].strip("| "): [cell.strip(" |") for cell in row[1:]] for row in rows}
    assert len(table["iterations per level"]) == len(PRESETS) + 1
    for column, name in enumerate([None, *PRESETS]):
        settings = make_settings(name)
        assert table["iterations per level"][column] == ", ".join(map(str, settings.pyramid.iterations))
        assert table["levels (shrink factors)"][column] == ", ".join(map(str, settings.pyramid.levels))
        assert table["similarity"][column].startswith(settings.terms.similarity)
        assert table["stages"][column] == " → ".join(settings.stages)


def test_plot_tables_read_the_table_below_the_comment_and_draw_a_png():
    hooks = _hooks()
    markdown = ("text\n\n<!-- dirio:plot demo.png columns=1,3 A title -->\n| set | a | b | c |\n|---|---|---|---|\n"
                "| x | **0.5** (2 %) | 9 | 1.5 / 2 |\n| y | - | 8 | 2 |\n\nafter\n")
    (table,) = hooks.plot_tables(markdown)
    assert (table.name, table.title, table.groups, table.series) == ("demo.png", "A title", ["x", "y"], ["a", "c"])
    assert table.values[0] == [0.5, 1.5] and table.values[1][1] == 2.0 and table.values[1][0] != table.values[1][0]
    assert hooks.plot_png(table)[:8] == b"\x89PNG\r\n\x1a\n"
    expanded = hooks.expand(markdown)
    assert "dirio:plot" not in expanded
    assert expanded.index("![A title](plots/demo.png)") > expanded.index("| y |") and expanded.index("after") > expanded.index("demo.png")
    with pytest.raises(ValueError, match="no table"):
        hooks.plot_tables("<!-- dirio:plot x.png T -->\n\nno table\n")


def test_readme_is_a_landing_page_whose_links_and_commands_exist():
    text = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
    assert len(targets) >= 20
    missing = [t for t in targets if not re.match(r"[a-z]+:", t) and not (REPOSITORY / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
    makefile = (REPOSITORY / "Makefile").read_text(encoding="utf-8")
    for command in re.findall(r"^make (\w+)", text, flags=re.M) + re.findall(r"`make (\w+)`", text):
        assert re.search(rf"^{command}:", makefile, flags=re.M), f"make {command} has no target"


def test_readme_links_become_site_links():
    hooks = _hooks()
    text = hooks.readme_markdown()
    assert "](docs/" not in text and "](benchmarks/RESULTS.md)" not in text
    assert "](getting-started.md)" in text and "](benchmarks/results.md)" in text
    assert "![" in text and "](assets/demo.png)" in text


def undocumented_signature_names(paths) -> list[str]:
    """``path:line function: name`` for every name documented under ``Args:`` (several on one line:
    ``fixed, moving:``) that is not a parameter of its function."""
    import ast

    wrong = []
    for path in paths:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or "Args:" not in doc:
                continue
            arguments = node.args
            names = {a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs}
            names |= {a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None}
            section = re.split(r"\n(?:Returns|Raises|Yields|Example|Examples|Note|Notes|Attributes):",
                               doc.split("Args:", 1)[1])[0]
            for line in section.splitlines():
                match = re.match(r"^ {4}(\*{0,2}[A-Za-z_][\w, *]*?)(?: \([^)]*\))?:(?: |$)", line)
                if match:
                    for name in match.group(1).split(","):
                        if name.strip().lstrip("*") not in names:
                            wrong.append(f"{path}:{node.lineno} {node.name}: {name.strip()}")
    return wrong


def test_the_docstring_check_finds_a_documented_parameter_that_is_gone(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('''def f(fixed, moving, *, mask=None, **options):
    """Do.

    Args:
        fixed, moving: images.
        mask (Tensor): a mask.
        options: more.
        spacing: gone.
        fixed, target: one of two is gone.

    Returns:
        spacing: not a parameter section.
    """
''')
    wrong = undocumented_signature_names([module])
    assert [w.rsplit(": ", 1)[1] for w in wrong] == ["spacing", "target"]


def test_docstring_parameters_exist_in_their_signatures():
    """Every name documented under ``Args:`` is a parameter of its function: the API reference cannot
    show a parameter that no longer exists."""
    wrong = undocumented_signature_names(sorted((REPOSITORY / "src" / "dirio").rglob("*.py")))
    assert not wrong, "documented parameters that are not in the signature:\n" + "\n".join(wrong)


# --- links and images of the built site ----------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.images, self.ids = [], [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])


def broken_references(site: Path) -> list[str]:
    """Every internal link or image of the site's pages that leads to no file, or to no element with
    the link's anchor; web links are not followed."""
    parsed = {}
    for page in site.rglob("*.html"):
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        parsed[page] = parser
    problems = []
    for page, parser in parsed.items():
        base = "/" + page.relative_to(site).as_posix()
        for kind, references in (("link", parser.links), ("image", parser.images)):
            for reference in references:
                parts = urlsplit(reference)
                if parts.scheme or parts.netloc or reference.startswith(("mailto:", "javascript:")):
                    continue
                path = unquote(urlsplit(urljoin(base, reference)).path)
                target = site / path.lstrip("/")
                if path.endswith("/") or target.is_dir():
                    target = target / "index.html"
                if not target.is_file():
                    problems.append(f"{page.relative_to(site)}: {kind} {reference} leads to no file")
                elif parts.fragment and target.suffix == ".html":
                    ids = parsed[target].ids if target in parsed else set()
                    if unquote(parts.fragment) not in ids:
                        problems.append(f"{page.relative_to(site)}: {kind} {reference}: no element #{parts.fragment}")
    return problems


def test_the_reference_check_finds_broken_links_images_and_anchors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.html").write_text('<h2 id="here">x</h2><a href="../b/">b</a><a href="#here">ok</a>'
                                               '<a href="https://example.org/x">web</a>')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "index.html").write_text('<a href="../a/#nowhere">x</a><img src="missing.png"><a href="../c/">c</a>'
                                               '<a href="../a/#here">fine</a>')
    problems = broken_references(tmp_path)
    assert len(problems) == 3, problems
    assert any("#nowhere" in p for p in problems) and any("missing.png" in p for p in problems)
    assert any("../c/" in p for p in problems)


@needs_docs
def test_every_internal_link_and_image_of_the_site_resolves(site):
    problems = broken_references(site)
    assert not problems, "\n".join(problems[:40])
    assert (site / "assets" / "demo.png").is_file()
    for plot in ("brain-validation", "lung-validation", "network-modes"):
        assert (site / "benchmarks" / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the site in a browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(site, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no headless Chromium")
    with StaticServer(site) as server, Browser(CHROMIUM, tmp_path_factory.mktemp("profile")) as chromium:
        chromium.base = server.url
        yield chromium


def _navigation_urls() -> list[str]:
    """The URL of every page that mkdocs.yml's navigation lists (``how-to/itk.md`` -> ``/how-to/itk/``)."""
    import yaml

    def pages(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            if isinstance(value, list):
                yield from pages(value)
            else:
                yield value

    config = yaml.safe_load((REPOSITORY / "mkdocs.yml").read_text(encoding="utf-8"))
    return ["/" + re.sub(r"\.md$", "/", re.sub(r"index\.md$", "", page)) for page in pages(config["nav"])]


IMAGES = """new Promise(function (resolve) {
  var images = Array.from(document.images);
  images.forEach(function (image) { image.loading = "eager"; });
  Promise.all(images.map(function (image) {
    return image.complete ? null : new Promise(function (done) { image.onload = image.onerror = done; });
  })).then(function () { resolve(images.map(function (image) { return [image.getAttribute("src"), image.naturalWidth]; })); });
})"""


@needs_docs
@needs_chromium
def test_browser_checks_catch_console_errors_and_broken_images(browser, site, tmp_path):
    """The console and image checks below can fail: a page with a script error and a missing image."""
    broken = site / "broken-probe"
    broken.mkdir(exist_ok=True)
    (broken / "index.html").write_text('<html><body><img src="missing.png"><script>undefinedFunction();</script></body></html>')
    try:
        browser.open(browser.base + "broken-probe/")
        assert browser.evaluate(IMAGES) == [["missing.png", 0]]
        errors = browser.console_errors()
        assert any("undefinedFunction" in e for e in errors) and any("missing.png" in e or "404" in e for e in errors), errors
    finally:
        (broken / "index.html").unlink()
        broken.rmdir()


@needs_docs
@needs_chromium
def test_every_page_of_the_navigation_loads_without_errors_and_its_images_decode(browser, site):
    urls = _navigation_urls()
    assert len(urls) >= 30 and "/reference/cli/" in urls and "/reference/api/api/" in urls
    problems = []
    for url in urls:
        browser.open(browser.base + url.lstrip("/"))
        title = browser.evaluate("document.querySelector('h1') && document.querySelector('h1').textContent")
        if not title:
            problems.append(f"{url}: no title")
        for src, width in browser.evaluate(IMAGES):
            if not width:
                problems.append(f"{url}: image {src} does not decode")
        problems += [f"{url}: {error}" for error in browser.console_errors()]
    assert not problems, "\n".join(problems)


@needs_docs
@needs_chromium
def test_a_click_on_a_navigation_tab_opens_its_page(browser):
    browser.open(browser.base)
    tabs = browser.evaluate("Array.from(document.querySelectorAll('.md-tabs__link'), a => a.textContent.trim())")
    assert tabs[:7] == ["Home", "Getting started", "How-to guides", "Concepts", "Reference", "Benchmarks", "Development"]
    browser.evaluate("Array.from(document.querySelectorAll('.md-tabs__link')).find(a => a.textContent.trim() == 'Reference').click()")
    browser.wait_until("location.pathname == '/reference/'")
    browser.wait_until("document.querySelector('h1') && document.querySelector('h1').id == 'reference'")
    active = browser.evaluate("document.querySelector('.md-tabs__item--active').textContent.trim()")
    assert active == "Reference"
    # the sidebar lists the section's pages; following one opens it
    browser.evaluate("Array.from(document.querySelectorAll('.md-nav__link')).find(a => a.textContent.trim() == 'Command line').click()")
    browser.wait_until("location.pathname == '/reference/cli/'")
    browser.wait_until("document.getElementById('register') !== null")
    assert browser.console_errors() == []


@needs_docs
@needs_chromium
def test_search_finds_a_page_by_a_word_of_its_text(browser):
    browser.open(browser.base)
    browser.evaluate("document.querySelector('.md-search__input').focus()")
    browser.type_text("ndv")
    count = browser.wait_until("document.querySelectorAll('.md-search-result__item').length")
    assert count >= 1
    links = browser.evaluate("Array.from(document.querySelectorAll('.md-search-result__item a'), a => a.pathname)")
    assert "/reference/metrics/" in links, links
    # a word no page has finds nothing
    browser.evaluate("var input = document.querySelector('.md-search__input'); input.value = ''; input.focus()")
    browser.type_text("qzxjvw")
    browser.wait_until("document.querySelector('.md-search-result__meta') && "
                       "/no matching/i.test(document.querySelector('.md-search-result__meta').textContent)")
    assert browser.evaluate("document.querySelectorAll('.md-search-result__item').length") == 0
    assert browser.console_errors() == []
