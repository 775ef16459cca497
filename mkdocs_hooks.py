"""mkdocs hooks: the site's home page is the README, and links from the docs to files of the
repository outside ``docs/`` (benchmark scripts, result files) are published with the site.

Why: the Markdown pages are written to be read on a code host too, so they link to
``../benchmarks/llm_quality.py`` and the README links to ``docs/llm.md``. ``mkdocs build --strict``
refuses links that leave ``docs/``; rather than silence that check, each such link is rewritten to
a copy of its target under ``_repo/`` in the site, and a link to a path that does not exist is
left alone, so the strict build still fails on it.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

# [text](target) and [text](target "title"); images too. Targets with a scheme or only an anchor
# are left alone.
_LINK = re.compile(r"(\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")
_PREFIX = "_repo"
_origin: dict[str, Path] = {}   # page src_uri -> the directory its links are relative to


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _targets(text: str):
    for m in _LINK.finditer(text):
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            continue
        yield m, target


def on_files(files, config):
    root, docs = _root(config), Path(config.docs_dir).resolve()
    _origin.clear()
    for f in files.documentation_pages():
        _origin[f.src_uri] = Path(f.abs_src_path).parent
    readme = root / "README.md"
    if readme.exists() and files.get_file_from_path("index.md") is None:
        files.append(File.generated(config, "index.md", content=readme.read_text(encoding="utf-8")))
        _origin["index.md"] = root
    published = set()
    for src_uri, origin in list(_origin.items()):
        page = files.get_file_from_path(src_uri)
        text = page.content_string
        for _, target in _targets(text):
            path = (origin / target.split("#", 1)[0]).resolve()
            if docs in path.parents or path == docs or not path.exists() or root not in path.parents:
                continue
            for p in ([path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file())):
                rel = p.relative_to(root).as_posix()
                if rel not in published:
                    files.append(File.generated(config, f"{_PREFIX}/{rel}", abs_src_path=str(p)))
                    published.add(rel)
            if path.is_dir():
                rel = path.relative_to(root).as_posix()
                listing = "\n".join(f"- [{q.name}]({q.name})" for q in sorted(path.iterdir()) if q.is_file())
                if f"{rel}/index.md" not in published:
                    files.append(File.generated(config, f"{_PREFIX}/{rel}/index.md",
                                                content=f"# {rel}/\n\nFiles of the repository:\n\n{listing}\n"))
                    published.add(f"{rel}/index.md")
    return files


def on_page_markdown(markdown, page, config, files):
    origin = _origin.get(page.file.src_uri)
    if origin is None:
        return markdown
    root, docs = _root(config), Path(config.docs_dir).resolve()
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(m):
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return m.group(0)
        path_part, _, anchor = target.partition("#")
        path = (origin / path_part).resolve()
        if not path.exists() or root not in path.parents and path != root:
            return m.group(0)  # broken: leave it for the strict build to report
        if docs in path.parents:
            new = path.relative_to(docs).as_posix()
        else:
            new = f"{_PREFIX}/{path.relative_to(root).as_posix()}" + ("/index.md" if path.is_dir() else "")
        new = posixpath.relpath(new, here or ".") + (f"#{anchor}" if anchor else "")
        return m.group(1) + new + m.group(3)

    return _LINK.sub(rewrite, markdown)


class SphinxRoles:
    """A griffe extension (``mkdocs.yml``: ``extensions: [mkdocs_hooks.py:SphinxRoles]``): the
    docstrings use Sphinx roles (:class:`~qcompile.Report`) and ``Example::``; show them as
    Markdown code (``Report``) and ``Example:``, not as literal role syntax."""

    _ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`(~?)([^`]+)`")

    def __init__(self, **_options):
        pass

    def _fix(self, text: str) -> str:
        text = self._ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
        return re.sub(r"(\w)::\n", r"\1:\n", text)

    def on_instance(self, *, obj, **_kwargs):
        if obj.docstring is not None:
            obj.docstring.value = self._fix(obj.docstring.value)
