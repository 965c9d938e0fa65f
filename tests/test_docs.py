"""The documentation site builds strictly, cannot drift from the code, and the README runs.

- The real site (mkdocs.yml) builds with ``--strict``; its CLI page holds every subcommand's
  help, generated from the argparse parser; API pages show signatures.
- A broken reference fails a strict build: a link to a missing page, a missing API object, an
  unresolved cross-reference, a help marker naming no subcommand. Each is checked against a
  control built from the same settings that passes.
- The README's Python quickstart runs as written and shows what the README says it shows;
  the getting-started page carries the same code.

The site tests skip only where mkdocs is not installed (CI installs it with the test extra).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _mkdocs_missing() -> bool:
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
        import mkdocstrings_handlers.python  # noqa: F401
    except ImportError:
        return True
    return False


needs_mkdocs = pytest.mark.skipif(_mkdocs_missing(), reason="mkdocs, mkdocs-material or "
                                  "mkdocstrings[python] is not installed (pip install -e '.[docs]')")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)


def _parser_subcommands() -> dict:
    sys.path.insert(0, str(DOCS / "_hooks"))
    try:
        from docs_hooks import parser_and_subcommands
    finally:
        sys.path.pop(0)
    return parser_and_subcommands()[1]


# --------------------------------------------------------------------------- the real site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = _build(ROOT / "mkdocs.yml", out)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"
    return out


@needs_mkdocs
def test_site_builds_strictly_with_every_page(site):
    for page in ["index", "getting-started/index", "cli/index", "targets/index",
                 "bad-input/index", "api/masks/index", "api/interp/index"]:
        assert (site / f"{page}.html").is_file(), page
    assert (site / "img" / "bigram-layout.png").is_file()
    # the hook code is build machinery, not a page
    assert not (site / "_hooks").exists()


@needs_mkdocs
def test_cli_page_holds_the_parsers_help(site):
    html = (site / "cli" / "index.html").read_text()
    subs = _parser_subcommands()
    assert "usage: interp [-h]" in html
    for name, sub in subs.items():
        assert f"usage: interp {name}" in html, name
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in html, f"interp {name} {flag} is missing from the CLI page"


@needs_mkdocs
def test_api_pages_render_signatures_and_no_raw_roles(site):
    html = (site / "api" / "masks" / "index.html").read_text()
    assert 'id="interp.masks.train.fit_masks"' in html
    assert 'id="interp.masks.maskset.MaskSet.for_model"' in html
    assert "max_steps" in html and "stop_ratio" in html        # fit_masks' signature
    for page in (site / "api").rglob("*.html"):
        text = page.read_text()
        assert not re.search(r":(class|func|meth|data|mod):<code>", text), \
            f"an unrendered Sphinx role in {page.relative_to(site)}"


# --------------------------------------------------------------------------- broken references


def _mini_site(tmp_path: Path, page: str) -> Path:
    """A site with the real config's settings (strict validation, plugins, hooks) and one
    page besides the index; returns its config path."""
    import yaml

    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the page](page.md).\n")
    (docs / "page.md").write_text(page)
    cfg.update(docs_dir=str(docs), site_dir=str(tmp_path / "site"),
               nav=[{"Home": "index.md"}, {"Page": "page.md"}],
               hooks=[str(DOCS / "_hooks" / "docs_hooks.py")])
    cfg.pop("exclude_docs", None)
    for plugin in cfg["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT)]
    path = tmp_path / "mkdocs.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


GOOD_PAGE = """# Page

[Home](index.md), [`random_masks`][interp.masks.sampling.random_masks].

::: interp.masks.sampling.random_masks
"""


@needs_mkdocs
def test_control_site_builds(tmp_path):
    proc = _build(_mini_site(tmp_path, GOOD_PAGE), tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'id="interp.masks.sampling.random_masks"' in (tmp_path / "out" / "page" /
                                                          "index.html").read_text()


@needs_mkdocs
@pytest.mark.parametrize("broken, expect", [
    ("[Home](index.md), [gone](no-such-page.md).", "no-such-page.md"),
    ("[Home](index.md#no-such-heading).", "no-such-heading"),
    ("::: interp.masks.sampling.no_such_function", "no_such_function"),
    ("[`random_masks`][interp.masks.sampling.no_such_function]", "no_such_function"),
    ("<!-- interp-help: no-such-command -->", "no-such-command"),
], ids=["missing-page", "missing-anchor", "missing-api-object", "unresolved-crossref",
        "unknown-subcommand"])
def test_a_broken_reference_fails_the_strict_build(tmp_path, broken, expect):
    proc = _build(_mini_site(tmp_path, f"# Page\n\n{broken}\n"), tmp_path / "out")
    assert proc.returncode != 0, f"the build passed with {broken!r}:\n{proc.stderr[-3000:]}"
    assert expect in proc.stderr, proc.stderr[-3000:]


def test_docstring_roles_become_code_and_optional_links():
    sys.path.insert(0, str(DOCS / "_hooks"))
    try:
        from docs_hooks import on_page_content
    finally:
        sys.path.pop(0)
    html = on_page_content(
        "<p>see :class:<code>~interp.masks.MaskSet</code>, :func:<code>train_lm</code> and "
        '(<autoref origin="x" identifier="q, k, v">head</autoref>[d_head]); '
        '<autoref identifier="interp.masks.nope">gone</autoref></p>')
    assert '<autoref identifier="interp.masks.MaskSet" optional><code>MaskSet</code>' in html
    assert " <code>train_lm</code> and" in html and ":func:" not in html
    assert "([head][q, k, v][d_head])" in html   # the docstring's text, put back
    assert '<autoref identifier="interp.masks.nope">' in html  # a real reference stays strict


# --------------------------------------------------------------------------- drift checks


def test_cli_page_has_a_section_per_subcommand():
    text = (DOCS / "cli.md").read_text()
    markers = re.findall(r"<!--\s*interp-help:\s*([\w-]+)\s*-->", text)
    headings = re.findall(r"^## interp ([\w-]+)\s*$", text, flags=re.M)
    subs = list(_parser_subcommands())
    assert sorted(markers) == sorted(subs), "docs/cli.md help markers vs the parser"
    assert sorted(headings) == sorted(subs), "docs/cli.md sections vs the parser"
    assert "<!-- interp-help -->" in text  # the top-level help


def test_api_page_of_the_top_level_lists_every_reexport():
    tree = ast.parse((ROOT / "interp" / "__init__.py").read_text())
    names = [a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom)
             for a in node.names]
    page = (DOCS / "api" / "interp.md").read_text()
    missing = [n for n in names if f"`{n}`" not in page]
    assert not missing, f"docs/api/interp.md does not list {missing}"


def test_every_page_is_in_the_nav():
    import yaml

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)

    nav = set(pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "_hooks" not in p.parts}
    assert on_disk == nav, f"only on disk: {on_disk - nav}; only in nav: {nav - on_disk}"


# --------------------------------------------------------------------------- README


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_readme_links_and_setup_commands():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to missing {target}"
    assert re.search(r"^!\[[^\]]*\]\(docs/img/[\w-]+\.png\)", text, flags=re.M), \
        "README shows no figure from docs/img/"
    makefile = (ROOT / "Makefile").read_text()
    for command in ("make run", "make test"):
        assert command in text
        assert re.search(rf"^{command.split()[1]}:", makefile, flags=re.M)
    assert "mkdocs serve" in text


def test_named_examples_exist():
    """Every ``examples/...`` file or notebook the README and the pages name exists."""
    texts = [README.read_text(), *(p.read_text() for p in DOCS.rglob("*.md"))]
    named = {m for text in texts for m in re.findall(r"examples/[\w.-]+\.(?:ipynb|py)", text)}
    named |= {f"examples/{m}" for text in texts
              for m in re.findall(r"`(\d\d_[\w-]+\.ipynb)`", text)}
    assert named, "no example is named anywhere"
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"named but missing: {missing}"


def test_getting_started_quickstart_is_the_readmes():
    readme = _python_blocks(README.read_text())
    page = (DOCS / "getting-started.md").read_text()
    after = page.split("<!-- quickstart:", 1)[1]
    assert _python_blocks(after)[0] == readme[0]


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    """Execute the README's first Python block in a scratch directory, as a reader would
    paste it, then check what the README says it shows."""
    code = _python_blocks(README.read_text())[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out

    masks, full, sub, loss = (namespace[k] for k in ("masks", "full", "sub", "loss"))
    counts = masks.counts()  # {layer: {block: kept}}
    kept_attn = sum(v for blocks in counts.values() for b, v in blocks.items()
                    if b in ("q", "k", "v", "o"))
    kept_mlp = sum(v for blocks in counts.values() for b, v in blocks.items()
                   if b.startswith("mlp"))
    # the bigram subnetwork is small and lives in the MLPs
    assert 0 < masks.active_fraction() < 0.5
    assert kept_mlp > 10 * kept_attn
    # it predicts like the bigram model, and the model needs it far more than a random one
    assert sub.surprisal_r > 0.5 and full.surprisal_r > 0.5
    assert loss.losses["bigram"] > loss.losses["random"] + 0.5
    assert "surprisal r with the bigram model" in out
    assert "torch.Size([16, 64, 32])" in out
    assert (tmp_path / "runs" / "quickstart" / "tokenizer" / "tokenizer.json").is_file()
