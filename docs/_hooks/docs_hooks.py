"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

- ``<!-- interp-help -->`` and ``<!-- interp-help: SUBCOMMAND -->`` in a page are replaced by
  the ``--help`` text of the ``interp`` console script, rendered from its argparse parser
  (``analyses.cli.build_parser``) at build time, so the CLI page cannot drift from the code.
  A marker naming a subcommand the parser lacks fails the build.
- Sphinx-style roles left in docstrings (``:class:`~interp.masks.MaskSet```) are rendered as
  inline code; a fully qualified name becomes an optional cross-reference, linked when the
  object has an API page (``optional``: a docstring naming a private helper is not an error).
- Bracketed text in a docstring that Markdown reads as a reference link but that cannot name
  an object (``[head][q, k, v]``: the identifier has a space or comma) is put back as text.
  Every other unresolved reference still fails a strict build.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: width the help text is wrapped to (argparse reads $COLUMNS)
HELP_WIDTH = 80

_MARKER = re.compile(r"<!--\s*interp-help(?::\s*(?P<command>[\w-]+))?\s*-->")
#: an autorefs placeholder whose identifier cannot be a Python path or a heading anchor
_NOT_A_NAME = re.compile(
    r'<autoref [^>]*?\bidentifier="(?P<ident>[^"]*[ ,][^"]*)"[^>]*>(?P<title>.*?)</autoref>',
    flags=re.DOTALL)
_ROLE = re.compile(
    r":(?:class|func|meth|data|attr|mod|exc|obj):<code>(?P<tilde>~?)(?P<name>[^<]+)</code>"
)


def parser_and_subcommands() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``interp`` parser and its subcommand parsers by name (in the parser's order)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from analyses.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, dict(subs.choices)


def help_text(command: str | None = None) -> str:
    """``interp --help`` (``command=None``) or ``interp COMMAND --help``, wrapped to HELP_WIDTH."""
    from mkdocs.exceptions import PluginError

    parser, subs = parser_and_subcommands()
    if command is not None and command not in subs:
        raise PluginError(
            f"docs: <!-- interp-help: {command} --> names no subcommand of `interp`; "
            f"subcommands are {sorted(subs)}. Fix the marker in the page.")
    target = parser if command is None else subs[command]
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)
    try:
        return target.format_help().rstrip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace every ``interp-help`` marker by a text block of the help it names."""
    if "interp-help" not in markdown:
        return markdown
    return _MARKER.sub(lambda m: f"```text\n{help_text(m['command'])}\n```", markdown)


def _role(match: re.Match) -> str:
    name = match["name"]
    shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
    if re.match(r"(interp|analyses)\.\w", name):
        return f'<autoref identifier="{name}" optional><code>{shown}</code></autoref>'
    return f"<code>{shown}</code>"


def on_page_content(html: str, **kwargs) -> str:
    """Render docstrings' Sphinx roles as code (and optional cross-references), and put back
    bracketed text that is no reference."""
    html = _NOT_A_NAME.sub(lambda m: f"[{m['title']}][{m['ident']}]", html)
    return _ROLE.sub(_role, html)
