"""The README is a front page whose links resolve, the docs site builds without a
warning, and the licence and citation files say what setup.py and the README say."""
import re
from pathlib import Path
from typing import Iterator, Set

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
PAPERS = ('2204.10598', '2402.12550')  # Pavlitska et al.; Oldfield et al. (μMoE)

# [text](target) and ![alt](target); a target ends at whitespace or ')'
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')


def prose_lines(path: Path) -> Iterator[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    fenced = False
    for line in path.read_text(encoding='utf-8').splitlines():
        if line.lstrip().startswith('```'):
            fenced = not fenced
        elif not fenced:
            yield line


def github_anchors(path: Path) -> Set[str]:
    """The anchors GitHub gives the headings of a Markdown file: lower case, every
    character but word characters, spaces and '-' dropped, each space a '-'."""
    anchors = set()
    for line in prose_lines(path):
        heading = re.match(r'#{1,6} +(.*?) *#* *$', line)
        if heading:
            anchors.add(re.sub(r'[^\w\- ]', '', heading.group(1).lower()).replace(' ', '-'))
    return anchors


def test_readme_is_a_front_page():
    lines = README.read_text(encoding='utf-8').splitlines()
    assert len(lines) <= 250, f'README.md has {len(lines)} lines; the front page keeps ' \
                              'to 250 (move the rest into a docs/ page)'


def test_readme_links_resolve():
    """Every relative link and image of the README names an existing file, and every
    anchor a heading of that file (as GitHub renders it)."""
    broken = []
    for line in prose_lines(README):
        for target in LINK.findall(line):
            if re.match(r'[a-z]+:', target):  # https:, mailto:
                continue
            path, _, anchor = target.partition('#')
            file = ROOT / path if path else README
            if not file.is_file():
                broken.append(f'{target}: no file {file.relative_to(ROOT)}')
            elif anchor and anchor not in github_anchors(file):
                broken.append(f'{target}: no heading with anchor #{anchor} in '
                              f'{file.relative_to(ROOT)}')
    assert not broken, 'broken links in README.md:\n' + '\n'.join(broken)


def test_readme_links_every_docs_page():
    """A newcomer finds every page of the site from the front page."""
    linked = {target.split('#')[0] for line in prose_lines(README)
              for target in LINK.findall(line)}
    pages = {f'docs/{page.name}' for page in (ROOT / 'docs').glob('*.md')}
    assert pages - linked == set(), 'docs pages the README does not link'


def test_docs_site_builds_strictly(tmp_path):
    """`make docs`'s build: with --strict every warning fails it, among them a link to
    a missing page or anchor and a page left out of the nav (mkdocs.yml)."""
    pytest.importorskip('mkdocs', reason='the docs extra: pip install -e .[docs]')
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    config = load_config(str(ROOT / 'mkdocs.yml'), strict=True,
                         site_dir=str(tmp_path / 'site'))
    build(config)  # raises mkdocs.exceptions.Abort on a warning
    assert (tmp_path / 'site' / 'index.html').is_file()
    for page in (ROOT / 'docs').glob('*.md'):
        if page.stem != 'index':
            assert (tmp_path / 'site' / page.stem / 'index.html').is_file(), page.name


def test_license_is_the_declared_apache_2():
    text = (ROOT / 'LICENSE').read_text(encoding='utf-8')
    assert 'Apache License' in text and 'Version 2.0, January 2004' in text
    assert 'END OF TERMS AND CONDITIONS' in text
    assert "license='Apache-2.0'" in (ROOT / 'setup.py').read_text(encoding='utf-8')


def test_citation_names_both_papers():
    citation = yaml.safe_load((ROOT / 'CITATION.cff').read_text(encoding='utf-8'))
    assert citation['cff-version'] == '1.2.0'
    assert citation['type'] == 'software'
    assert citation['license'] == 'Apache-2.0'
    references = yaml.safe_dump(citation['references'])
    readme = README.read_text(encoding='utf-8')
    for arxiv in PAPERS:
        assert arxiv in references, f'CITATION.cff does not name arXiv {arxiv}'
        assert f'eprint    = {{{arxiv}}}' in readme, f"the README's BibTeX lacks {arxiv}"
