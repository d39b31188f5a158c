"""MkDocs hooks of dirio's documentation site: the pages generated from the code at build time.

A page asks for generated content with an HTML comment that the hook replaces (the comments are
invisible on GitHub and in any other Markdown viewer):

* ``<!-- dirio:cli -->``: the reference of every ``dirio`` subcommand, built from the argparse
  parsers of :mod:`dirio.apps.cli` (which build their options from :mod:`dirio.config.schema`), so it
  cannot drift from ``dirio COMMAND --help``;
* ``<!-- dirio:presets -->``: the resolved settings of every preset, built with
  :func:`dirio.config.settings.make_settings` from :data:`dirio.config.presets.PRESETS`;
* ``<!-- dirio:api PACKAGE -->``: a mkdocstrings ``::: MODULE`` block for every module of ``PACKAGE``
  (found in ``src/`` when the site is built, so a new module appears in the API reference without an
  edit here); private modules (``_name``) are left out;
* ``<!-- dirio:readme -->``: the repository's ``README.md`` (the landing page) with its links made
  relative to ``docs/`` (:func:`readme_markdown`), so the site's home page and the README are one text;
* ``<!-- dirio:include PATH -->``: the text of ``PATH`` (relative to the repository root), e.g.
  ``benchmarks/RESULTS.md``, read at build time rather than copied;
* ``<!-- dirio:plot NAME.png [columns=1,2] TITLE -->`` directly above a Markdown table: a grouped bar
  chart of the table (rows are groups, every column after the first a series, or the ``columns``
  given by index, the first number of each cell its value), written as the generated file ``plots/NAME.png`` beside the page and shown below the table.
  The table and its chart come from the same text, so they cannot disagree.

The functions that make the Markdown are plain functions (no MkDocs objects), so that the tests call
them directly; the ``on_*`` functions are the MkDocs hook entry points.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import re
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!--\s*dirio:([a-z-]+)\s*(.*?)\s*-->")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


# --- the CLI reference ---------------------------------------------------------------------------


def _cell(text: object) -> str:
    """Text for one cell of a Markdown table: pipes escaped, angle brackets as entities, one line."""
    value = " ".join(str(text).split())
    return value.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _code(text: object) -> str:
    """Inline code that survives a table cell (a pipe inside is escaped)."""
    return "`" + str(text).replace("|", "\\|") + "`"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """``{name: (subparser, one-line help)}`` of a parser's subcommands, in the order they were added."""
    for action in parser._actions:  # noqa: SLF001 - argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            helps = {choice.dest: choice.help for choice in action._choices_actions}  # noqa: SLF001
            return {name: (sub, helps.get(name) or "") for name, sub in action.choices.items()}
    return {}


def _schema_keys() -> dict[str, str]:
    """``{flag: config-file key}`` of the schema options that a configuration file accepts."""
    from dirio.apps.cli import flag
    from dirio.config.schema import OPTIONS

    return {flag(option.key): option.key for option in OPTIONS if option.in_files}


def _value(action: argparse.Action) -> str:
    """What an option takes: its choices, its metavar or the destination in capitals; empty for a switch."""
    if action.nargs == 0:
        return ""
    if not action.option_strings:  # a positional: its name says it
        return ""
    if action.choices is not None:
        return " \\| ".join(_code(choice) for choice in action.choices)
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if action.nargs in ("+", "*"):
        metavar = f"{metavar} ..."
    return _code(metavar)


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.required:
        return ""
    default = action.default
    if isinstance(default, (list, tuple)):
        default = ",".join(str(item) for item in default)
    return _code(default)


def _option_rows(actions: list[argparse.Action], keys: dict[str, str]) -> list[str]:
    rows = []
    for action in actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:  # noqa: SLF001
            continue
        names = ", ".join(_code(name) for name in action.option_strings) if action.option_strings else _code(action.dest.upper())
        help_text = _cell(action.help or "")
        if action.required and action.option_strings:
            help_text = ("required; " + help_text) if help_text else "required"
        key = next((keys[name] for name in action.option_strings if name in keys), None)
        if key is not None:
            help_text += f" (config key {_code(key)})"
        rows.append(f"| {names} | {_value(action)} | {_default(action)} | {help_text} |")
    return rows


def _synopsis(name: str, parser: argparse.ArgumentParser) -> str:
    """``dirio NAME POSITIONAL ... -o OUTPUT [options]``: the positionals and the required options."""
    words = [f"dirio {name}"]
    for action in parser._actions:  # noqa: SLF001
        if not action.option_strings and action.help != argparse.SUPPRESS:
            metavar = action.metavar or action.dest.upper()
            words.append(f"{metavar} [{metavar} ...]" if action.nargs in ("+", "*") else metavar)
        elif action.required:
            words.append(f"{action.option_strings[0]} {action.metavar or action.dest.upper()}")
    return " ".join(words) + " [options]"


def _command_section(name: str, parser: argparse.ArgumentParser, summary: str, keys: dict[str, str]) -> list[str]:
    lines = [f"## `dirio {name}` {{ #{name} }}", "", _cell(summary).replace("\\|", "|") + ".", "", "```text",
             _synopsis(name, parser), "```", ""]
    for group in parser._action_groups:  # noqa: SLF001 - the groups in the order --help shows them
        rows = _option_rows(group._group_actions, keys)  # noqa: SLF001
        if not rows:
            continue
        title = {"positional arguments": "Arguments", "options": "Options", "optional arguments": "Options"}.get(
            group.title, (group.title or "").capitalize()
        )
        lines += [f"**{title}**", "", "| option | value | default | meaning |", "|---|---|---|---|", *rows, ""]
    return lines


def cli_reference_markdown() -> str:
    """The reference of every ``dirio`` subcommand as Markdown: a table of the commands, then for
    each its synopsis and one table per option group.

    Built from :func:`dirio.apps.cli.build_parser` (whose registration options come from
    :data:`dirio.config.schema.OPTIONS`); each option that a configuration file also accepts names its
    key. A ``--help`` and the reference therefore list the same options with the same help text.
    """
    from dirio.apps.cli import build_parser

    parser = build_parser()
    keys = _schema_keys()
    commands = _subcommands(parser)
    lines = [
        "Every option below is what `dirio COMMAND --help` prints, generated from the parsers when the",
        "site is built. Options with a *config key* are also keys of a `dirio run --config` file",
        "([configuration files](formats.md#configuration-files)). `python -m dirio` is the same command;",
        "`dirio --version` prints the version.",
        "",
        "| command | what it does |",
        "|---|---|",
        *[f"| [`dirio {name}`](#{name}) | {_cell(summary)} |" for name, (_, summary) in commands.items()],
        "",
    ]
    for name, (sub, summary) in commands.items():
        lines += _command_section(name, sub, summary, keys)
    return "\n".join(lines)


# --- the presets ----------------------------------------------------------------------------------


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_short(item) for item in value)
    if isinstance(value, dict):  # an option with one value per level as the command line writes it: 5/5/9
        def option(item: object) -> str:
            return "/".join(_short(v) for v in item) if isinstance(item, (list, tuple)) else _short(item)

        return ", ".join(f"{key}={option(item)}" for key, item in value.items()) or "-"
    return str(value)


PRESET_ROWS = (
    # (row label, function of the resolved Settings)
    ("stages", lambda s: " → ".join(s.stages)),
    ("normalise", lambda s: s.preprocessing.normalise
     + (f" [{_short(s.preprocessing.clip_range)}]" if s.preprocessing.normalise == "clip" else "")),
    ("automatic mask", lambda s: s.preprocessing.auto_mask),
    ("mask use", lambda s: s.preprocessing.mask_use),
    ("similarity", lambda s: f"{s.terms.similarity} ({_short(s.terms.similarity_options)})"),
    ("features from", lambda s: s.terms.features_from),
    ("regularizers", lambda s: _short(s.terms.regularizers)),
    ("levels (shrink factors)", lambda s: _short(s.pyramid.levels)),
    ("iterations per level", lambda s: _short(s.pyramid.iterations)),
    ("parameter grid spacing", lambda s: _short(s.transform.grid_spacing)),
    ("parameter smoothing passes", lambda s: _short(s.transform.smoothing)),
    ("compose every (0: additive)", lambda s: _short(s.transform.compose_every)),
    ("velocity field", lambda s: "yes" if s.transform.diffeomorphic else "no"),
    ("optimizer, lr", lambda s: f"{s.optimization.optimizer}, {_short(s.optimization.lr)}"),
    ("schedule", lambda s: s.optimization.schedule),
    ("combination rule", lambda s: s.optimization.combine),
    ("affine stage", lambda s: (f"{s.affine_family}: levels {_short(s.affine_options.levels)}, iterations "
                                f"{_short(s.affine_options.iterations)}") if "affine" in s.stages else "-"),
    ("discrete step", lambda s: (f"cells {s.convex.grid_spacing}, radius {s.convex.radius}, "
                                 f"features at 1/{s.convex.feature_factor}") if "convex" in s.stages else "-"),
)


def presets_markdown() -> str:
    """A table of the resolved settings of every preset (and of no preset), one column each.

    Built with :func:`dirio.config.settings.make_settings`, so the table shows what a run with
    ``--preset NAME`` uses, defaults included.
    """
    from dirio.config.presets import PRESETS
    from dirio.config.settings import make_settings

    names = [None, *PRESETS]
    resolved = [make_settings(name) for name in names]
    header = "| setting | " + " | ".join("(no preset)" if n is None else _code(n) for n in names) + " |"
    lines = [header, "|---" * (len(names) + 1) + "|"]
    for label, get in PRESET_ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(get(s)) for s in resolved) + " |")
    return "\n".join(lines)


# --- the API reference ---------------------------------------------------------------------------


def package_modules(package: str) -> list[str]:
    """Every public module of ``package`` under ``src/``, the package itself first, then by path."""
    root = REPOSITORY / "src" / Path(*package.split("."))
    if not (root / "__init__.py").is_file():
        raise FileNotFoundError(f"dirio:api {package}: no such package in src/")
    modules = [package]
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(part.startswith("_") for part in parts) or path.parent != root and not (path.parent / "__init__.py").is_file():
            continue
        modules.append(".".join((package, *parts)))
    return modules


def api_markdown(package: str) -> str:
    """One mkdocstrings block per module of ``package`` (see :func:`package_modules`)."""
    blocks = []
    for module in package_modules(package):
        if module == package and len(package_modules(package)) > 1:
            options = "        show_root_heading: true\n        members: false\n"
        else:
            options = "        show_root_heading: true\n"
        blocks.append(f"::: {module}\n    options:\n{options}")
    return "\n".join(blocks)


# --- includes and plots ---------------------------------------------------------------------------


def include_markdown(path: str) -> str:
    """The text of ``path`` (relative to the repository root), which must exist inside the repository."""
    target = (REPOSITORY / path).resolve()
    if REPOSITORY not in target.parents or not target.is_file():
        raise FileNotFoundError(f"dirio:include {path}: no such file in the repository")
    return target.read_text(encoding="utf-8")


# Files outside docs/ that the site shows as pages of its own.
README_LINKS = {"benchmarks/RESULTS.md": "benchmarks/results.md", "CHANGELOG.md": "development/changelog.md"}


def readme_markdown() -> str:
    """``README.md`` for the site's home page: ``docs/X`` links become ``X``, links to files the site
    shows as pages (:data:`README_LINKS`) point to those pages, other repository files lose their link
    (their text stays), web links are kept."""

    def relink(match: re.Match) -> str:
        text, target = match.group(1), match.group(2)
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            return match.group(0)
        path, _, anchor = target.partition("#")
        if path.startswith("docs/"):
            path = path.removeprefix("docs/")
        elif path in README_LINKS:
            path = README_LINKS[path]
        else:
            return text
        return f"[{text}]({path}{'#' + anchor if anchor else ''})"

    text = include_markdown("README.md")
    return re.sub(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)", relink, text).replace("](docs/", "](")


@dataclasses.dataclass
class PlotTable:
    """A table that a ``dirio:plot`` comment asks to draw.

    Attributes:
        name: the PNG's file name (``brain.png``).
        title: the chart's title.
        groups: the first column's cells, one bar group each.
        series: the header's other cells, one bar colour each.
        values: ``values[g][s]``, the first number of each cell (``nan`` where there is none).
    """

    name: str
    title: str
    groups: list[str]
    series: list[str]
    values: list[list[float]]


def _plain(cell: str) -> str:
    return re.sub(r"[*`]", "", cell).strip()


def _table_rows(lines: list[str]) -> list[list[str]]:
    rows = []
    for line in lines:
        if not line.strip().startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if not all(set(c) <= set("-: ") for c in cells):  # not the alignment row
            rows.append(cells)
    return rows


def plot_tables(markdown: str) -> list[PlotTable]:
    """Every ``<!-- dirio:plot NAME.png TITLE -->`` of a page with the table right below it.

    Raises:
        ValueError: a plot comment without a table below it, or a name that is not ``*.png``.
    """
    found = []
    lines = markdown.splitlines()
    for index, line in enumerate(lines):
        match = MARKER.search(line)
        if not match or match.group(1) != "plot":
            continue
        name, _, title = match.group(2).partition(" ")
        columns = None
        if title.startswith("columns="):
            chosen, _, title = title.partition(" ")
            columns = [int(c) for c in chosen.removeprefix("columns=").split(",")]
        if not re.fullmatch(r"[a-z0-9-]+\.png", name):
            raise ValueError(f"dirio:plot needs a file name like name.png, got {name!r}")
        start = index + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        rows = _table_rows(lines[start:])
        if len(rows) < 2 or len(rows[0]) < 2:
            raise ValueError(f"dirio:plot {name}: no table right below the comment")
        columns = columns or list(range(1, len(rows[0])))
        values = []
        for row in rows[1:]:
            numbers = []
            for cell in [row[c] for c in columns]:
                number = NUMBER.search(_plain(cell))
                numbers.append(float(number.group(0)) if number else math.nan)
            values.append(numbers)
        found.append(PlotTable(name, title.strip(), [_plain(r[0]) for r in rows[1:]], [_plain(rows[0][c]) for c in columns],
                               values))
    return found


def plot_png(table: PlotTable) -> bytes:
    """A grouped horizontal bar chart of ``table`` as PNG bytes (matplotlib without pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups, series = len(table.groups), len(table.series)
    height = 0.8 / series
    figure = Figure(figsize=(8, 1.3 + 0.42 * groups * series ** 0.5 + 0.1 * series), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = ["#3f51b5", "#9e9e9e", "#ff9800", "#009688", "#e91e63", "#795548"]
    for s, label in enumerate(table.series):
        positions = [g + (s - (series - 1) / 2) * height for g in range(groups)]
        heights = [table.values[g][s] for g in range(groups)]
        bars = axes.barh(positions, [0 if math.isnan(v) else v for v in heights], height=height * 0.92,
                         color=colours[s % len(colours)], label=label)
        for bar, value in zip(bars, heights):
            if not math.isnan(value):
                axes.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:g}", va="center", fontsize=7)
    axes.set_yticks(range(groups), table.groups, fontsize=8)
    axes.invert_yaxis()
    axes.set_title(table.title, fontsize=10)
    axes.spines[["top", "right"]].set_visible(False)
    axes.margins(x=0.12)
    axes.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=min(series, 4))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def expand(markdown: str) -> str:
    """A page's Markdown with every ``dirio:`` comment replaced by its generated content."""

    def replace(match: re.Match) -> str:
        kind, argument = match.group(1), match.group(2)
        if kind == "cli":
            return cli_reference_markdown()
        if kind == "presets":
            return presets_markdown()
        if kind == "api":
            return api_markdown(argument)
        if kind == "readme":
            return readme_markdown()
        if kind == "include":
            return include_markdown(argument)
        if kind == "plot":
            return match.group(0)  # drawn by on_files, linked below its table by _link_plots
        raise ValueError(f"unknown dirio: comment {match.group(0)!r}")

    return _link_plots(MARKER.sub(replace, markdown))


def _link_plots(markdown: str) -> str:
    """Each plot comment removed and its PNG linked after the end of the table below it."""
    lines = markdown.splitlines()
    out, pending = [], None
    for line in lines:
        match = MARKER.search(line)
        if match and match.group(1) == "plot":
            name, _, title = match.group(2).partition(" ")
            if title.startswith("columns="):
                title = title.partition(" ")[2]
            pending = (name, title.strip() or name)
            continue
        if pending and out and out[-1].strip().startswith("|") and not line.strip().startswith("|"):
            out += ["", f"![{pending[1]}](plots/{pending[0]})", ""]
            pending = None
        out.append(line)
    if pending:
        out += ["", f"![{pending[1]}](plots/{pending[0]})"]
    return "\n".join(out) + "\n"


# Sphinx cross-reference roles as the docstrings write them (``:class:`~dirio.io.images.Image```), as
# Markdown renders them: the role's name, then the target in <code>.
SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)\.?([\w.]+)(\(\))?</code>")


def sphinx_roles_to_links(html: str) -> str:
    """Each Sphinx role of a rendered docstring as a link to its object where the API reference has it
    (an optional mkdocs-autorefs reference: a target it does not find stays code, without a warning);
    ``~`` shows the last name only, as in Sphinx."""

    def link(match: re.Match) -> str:
        short, target, call = match.group(1), match.group(2), match.group(3) or ""
        title = (target.rsplit(".", 1)[-1] if short else target) + call
        return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'

    return SPHINX_ROLE.sub(link, html)


# --- MkDocs entry points --------------------------------------------------------------------------


def on_files(files, config):
    """Add the generated chart of every ``dirio:plot`` table, beside the page that asks for it."""
    from mkdocs.structure.files import File

    for page in [f for f in files if f.src_uri.endswith(".md")]:
        source = Path(config["docs_dir"]) / page.src_uri
        text = source.read_text(encoding="utf-8")
        if "dirio:plot" not in text:
            continue
        folder = page.src_uri.rsplit("/", 1)[0] + "/" if "/" in page.src_uri else ""
        for table in plot_tables(text):
            files.append(File.generated(config, f"{folder}plots/{table.name}", content=plot_png(table)))
    return files


def on_page_markdown(markdown, page, config, files):
    return expand(markdown)


def on_page_content(html, page, config, files):
    return sphinx_roles_to_links(html)
