"""Open the built site's main pages in headless Chromium; fail on a broken link or image.

Usage: ``python docs/check_pages.py build/site [--screenshot home.png]``

Two checks, both against a local HTTP server on the built site:

1. **In the browser.** Each main page (the home page, every page of the top navigation
   and one page per section below it) is loaded by Chromium (``--headless
   --dump-dom``), which requests everything the page needs: stylesheets, scripts and
   every ``<img>``. The server records each request; any local request answered 404 is
   a missing file. The DOM after scripts ran is checked for ``<img>`` elements with
   an empty ``src``.
2. **Every page, every internal link.** Each ``href`` and ``src`` in every HTML file
   of the site that points inside it must name an existing file, and a ``#fragment``
   must be an ``id`` on the target page.
3. **The gallery has its figures.** Every executed notebook page holds at least one
   image (an executed notebook without figures means the plots were lost, e.g. to a
   non-inline matplotlib backend in the kernel).

Requests leaving the machine (the MathJax CDN) are not checked: the site is read
with them where there is a network, and without them math shows as TeX source.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit


class _Links(HTMLParser):
    """Collects ids, hrefs and srcs of one HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str]] = []  # (tag, url)
        self.empty_images = 0
        self.images = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("id", "name"):
            if a.get(key):
                self.ids.add(a[key])
        if tag == "img":
            self.images += 1
            if not a.get("src"):
                self.empty_images += 1
        for key in ("href", "src"):
            if a.get(key) and tag in ("a", "img", "link", "script", "source"):
                self.refs.append((tag, a[key]))


def _parse(text: str) -> _Links:
    p = _Links()
    p.feed(text)
    return p


def _target(site: Path, page: Path, url: str) -> tuple[Path, str] | None:
    """The file (and fragment) an internal URL on ``page`` points at; None if external."""
    parts = urlsplit(url)
    if parts.scheme or parts.netloc or url.startswith(("mailto:", "javascript:", "data:")):
        return None
    rel = page.relative_to(site).as_posix()
    resolved = urlsplit(urljoin("http://site/" + rel, url))
    path = site / unquote(resolved.path).lstrip("/")
    if path.is_dir() or resolved.path.endswith("/"):
        path = path / "index.html"
    return path, resolved.fragment


def check_links(site: Path, *, gallery_figures: bool = True) -> list[str]:
    """Broken internal links and images over every HTML file of the site.

    With ``gallery_figures``, a notebook page without any image is a problem too.
    """
    pages = sorted(site.rglob("*.html"))
    parsed = {p: _parse(p.read_text(encoding="utf-8")) for p in pages}
    problems = []
    for page, links in parsed.items():
        in_gallery = page.relative_to(site).parts[0] == "notebooks"
        if gallery_figures and in_gallery and links.images == 0:
            problems.append(f"{page.relative_to(site)}: an executed notebook without figures")
        if page.name == "404.html":  # its relative links are written for any depth
            continue
        for tag, url in links.refs:
            hit = _target(site, page, url)
            if hit is None:
                continue
            path, frag = hit
            where = page.relative_to(site)
            if not path.exists():
                problems.append(f"{where}: <{tag}> {url} -> missing {path.relative_to(site)}")
            elif frag and path.suffix == ".html":
                target = parsed.get(path) or _parse(path.read_text(encoding="utf-8"))
                if unquote(frag) not in target.ids:
                    problems.append(f"{where}: <{tag}> {url} -> no id #{frag}")
    return problems


def main_pages(site: Path) -> list[str]:
    """URLs (relative to the site root) of the home page and each nav section's pages."""
    home = _parse((site / "index.html").read_text(encoding="utf-8"))
    urls = {""}
    seen_sections: set[str] = set()
    for tag, url in home.refs:
        if tag != "a" or _target(site, site / "index.html", url) is None or "#" in url:
            continue
        path = urlsplit(urljoin("http://site/", url)).path.lstrip("/")
        section = path.split("/")[0]
        if not path or path.endswith((".py", ".ipynb", ".css", ".js", ".png")):
            continue
        # every top-level page, one page of each large section (API, notebooks)
        if section in ("api", "notebooks"):
            if section in seen_sections:
                continue
            seen_sections.add(section)
        urls.add(path)
    return sorted(urls)


class _Recorder(http.server.SimpleHTTPRequestHandler):
    failures: list[str]

    def log_message(self, fmt: str, *args: object) -> None:  # keep the output short
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        if code == 404 and not self.path.endswith("favicon.ico"):
            self.failures.append(f"{self.headers.get('Referer', '?')}: GET {self.path} -> 404")
        super().send_error(code, message, explain)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("check_pages: no chromium found (apt-get install -y chromium)")


def _browser_flags() -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio"]


def check_in_browser(site: Path, pages: list[str], screenshot: Path | None) -> list[str]:
    """Load ``pages`` in Chromium; return 404s seen by the server and empty images."""
    failures: list[str] = []
    handler = functools.partial(_Recorder, directory=str(site))
    _Recorder.failures = failures
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    exe = _chromium()

    def load(page: str) -> str:
        proc = subprocess.run(
            [exe, *_browser_flags(), "--dump-dom", base + page],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0 or "</html>" not in proc.stdout:
            return f"/{page}: chromium failed (exit {proc.returncode})"
        empty = _parse(proc.stdout).empty_images
        return f"/{page}: {empty} <img> without src" if empty else ""

    try:
        with ThreadPoolExecutor(2) as pool:
            failures += [msg for msg in pool.map(load, pages) if msg]
        if screenshot is not None:
            subprocess.run(
                [exe, *_browser_flags(), f"--screenshot={screenshot.resolve()}",
                 "--window-size=1280,1000", base],
                capture_output=True,
                timeout=120,
                check=True,
            )  # fmt: skip
    finally:
        server.shutdown()
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("site", type=Path, help="the built site (mkdocs' site_dir)")
    ap.add_argument("--screenshot", type=Path, help="write a PNG of the home page here")
    ap.add_argument(
        "--unexecuted", action="store_true", help="the notebooks were not executed: no figures"
    )
    args = ap.parse_args(argv)
    if not (args.site / "index.html").is_file():
        ap.error(f"site: no index.html in {args.site}")
    problems = check_links(args.site, gallery_figures=not args.unexecuted)
    pages = main_pages(args.site)
    problems += check_in_browser(args.site, pages, args.screenshot)
    for p in problems:
        print("check_pages:", p)
    n_html = len(list(args.site.rglob("*.html")))
    print(f"check_pages: {n_html} pages link-checked, {len(pages)} opened in chromium, "
          f"{len(problems)} problems")  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
