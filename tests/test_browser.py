"""The built book in a real browser: headless Chromium, driven by Selenium, over local HTTP.

Every page a reader lands on (the index, which redirects to the introduction, the introduction,
the reproduction guide, the references, every notebook page) is opened from a static server on
127.0.0.1, the way a website serves it, and checked for:

- a finished load (``document.readyState == "complete"``, HTTP 200) on the page it should end on;
- every ``<img>`` decoded by the browser (``complete`` and ``naturalWidth > 0``);
- every internal ``<a href>`` and ``<link href>`` answering HTTP 200, and every resource the page
  loaded from the server (scripts, styles, fonts, images) answering 200 as well;
- a full-page screenshot, kept as a PNG artifact and checked to decode to a non-blank image;
- at 1280 px, nothing wider than the window (no horizontal scrolling), no table wider than the
  article's column (no column cut off or hidden behind a scroll bar), no image shown at less
  than half its natural width (its text would shrink below reading size);
- no setup code visible: the Colab cell and papermill's parameters are removed, the imports,
  the parameters and the record writing folded (their code shows only on a click);
- the intro opens with the claims table, which has a verdict column.

Screenshots go to ``$OR_CORE_ARTIFACTS`` when set, else to ``<repo>/artifacts/browser/``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them through apt-get)
and ``selenium`` (the ``test`` extra); the module is skipped, with the reason, without any of
them. The browser is kept off the network: Selenium's driver manager is told to stay offline and
Chromium resolves every host name but 127.0.0.1 to "not found", so a page pulling in something
from a CDN loads without it instead of waiting on a connection; MathJax is served with the book
(``sphinx-mathjax-offline``), and every formula must be typeset.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import os
import shutil
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
#: Page requested -> page the browser should end on (``index.html`` is a meta refresh).
PAGES = {
    "index.html": "intro.html",
    "intro.html": "intro.html",
    "reproduce.html": "reproduce.html",
    "library.html": "library.html",
    "bibliography.html": "bibliography.html",
    **{f"notebooks/{source.stem}.html": f"notebooks/{source.stem}.html" for source in SOURCES},
}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1280,900",
    # Every host but the local server fails to resolve at once: no request leaves the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)
#: Seconds to wait for a page load, for the images of a page, for a redirect.
LOAD_TIMEOUT_S = 60
#: Pages taller than this many CSS pixels are captured down to this height only.
MAX_SCREENSHOT_HEIGHT = 50_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _missing() -> str | None:
    """Why the browser check cannot run here, or None when it can."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        return "chromium is not installed (apt-get install chromium, or run .ci/run as root)"
    if CHROMEDRIVER is None:
        return "chromedriver is not installed (apt-get install chromium-driver, or run .ci/run as root)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


# ----------------------------------------------------------------------------------------------
# The server, the browser, one visit per page
# ----------------------------------------------------------------------------------------------
class _StaticHandler(SimpleHTTPRequestHandler):
    """Files only, like a static website host: no directory listings, no request log."""

    def list_directory(self, path):  # noqa: ANN001, ANN201 - the signature of the base class
        self.send_error(404, "No directory listings")
        return None

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@dataclass
class Visit:
    """What the browser saw of one page."""

    url: str
    final_url: str
    #: The HTTP status of the page the browser ended on.
    status: int
    ready_state: str
    #: ``{"src", "complete", "naturalWidth"}`` of every ``<img>``, after the images settled.
    images: list[dict] = field(default_factory=list)
    #: Absolute, fragment-free URLs of the page's internal ``<a href>`` and ``<link href>``.
    links: set[str] = field(default_factory=set)
    #: ``(url, HTTP status)`` of every resource the page loaded from the local server.
    resources: list[tuple[str, int]] = field(default_factory=list)
    #: ``(maths elements, of which MathJax has not typeset)``: Sphinx's ``.math`` spans and blocks.
    maths: tuple[int, int] = (0, 0)
    #: What a reader sees at the window's width: see ``_LAYOUT``.
    layout: dict = field(default_factory=dict)
    screenshot: Path | None = None


def _artifacts_dir() -> Path:
    env = os.environ.get("OR_CORE_ARTIFACTS")
    path = Path(env) if env else REPO_ROOT / "artifacts" / "browser"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def site(built_book: Path) -> Iterator[str]:
    """The built HTML served on 127.0.0.1 (a free port); yields its base URL, with a slash."""
    handler = functools.partial(_StaticHandler, directory=str(built_book / "_build" / "html"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="book-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Headless Chromium through the system chromedriver, with a fresh profile and no network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Selenium Manager is not needed with an explicit driver; never let it reach the network.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(LOAD_TIMEOUT_S)
    driver.set_script_timeout(LOAD_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


_STATUS = 'return performance.getEntriesByType("navigation")[0]?.responseStatus ?? 0;'
_COLLECT_LINKS = """
const seen = [];
for (const el of document.querySelectorAll("a[href], link[href]")) {
    const raw = el.getAttribute("href").trim();
    if (raw === "" || raw.startsWith("#")) continue;           // anchors on this page
    const url = new URL(raw, document.baseURI);
    if (url.origin !== location.origin) continue;               // elsewhere, mailto:, javascript:
    url.hash = "";
    seen.push(url.href);
}
return seen;
"""
_COLLECT_RESOURCES = """
return performance.getEntriesByType("resource")
    .filter(e => new URL(e.name).origin === location.origin)
    .filter(e => new URL(e.name).pathname !== "/favicon.ico")  // the browser's own guess
    .map(e => [e.name, e.responseStatus]);
"""
_LOAD_LAZY_IMAGES = 'for (const img of document.images) img.loading = "eager";'
_IMAGES_SETTLED = "return Array.from(document.images).every(img => img.complete);"
_MATHS = """
const maths = Array.from(document.querySelectorAll(".math"));
return [maths.length, maths.filter(e => !e.querySelector("mjx-container")).length];
"""
_COLLECT_IMAGES = """
return Array.from(document.images).map(img => ({
    src: img.getAttribute("src") || img.currentSrc,
    complete: img.complete,
    naturalWidth: img.naturalWidth,
}));
"""


#: The page as laid out at the window's width: how far it overflows horizontally, each shown
#: image's natural and displayed width, each shown table's width against its article's, the
#: visible code cells that hold setup code, and the header cells of the shown tables.
_LAYOUT = r"""
const shown = el => (el.checkVisibility ? el.checkVisibility() : el.offsetParent !== null)
    && el.getBoundingClientRect().width > 0;
const doc = document.documentElement;
const article = document.querySelector("article") || document.body;
const room = article.getBoundingClientRect().width;
// setup: the Colab cell, the parameters (papermill's or the notebook's), the profile switch,
// record writing, or a block of three or more import lines
const setup = text => /google\.colab|apply_profile\(|write_record\(|^profile = /m.test(text)
    || (text.match(/^(import|from) \S+/gm) || []).length >= 3;
return {
    overflow: doc.scrollWidth - doc.clientWidth,
    images: Array.from(article.querySelectorAll("img")).filter(shown).map(img => ({
        src: (img.getAttribute("src") || "").slice(0, 80), natural: img.naturalWidth,
        displayed: img.getBoundingClientRect().width})),
    tables: Array.from(article.querySelectorAll("table")).filter(shown).map(t => ({
        head: (t.querySelector("th") || t).innerText.slice(0, 40), width: t.getBoundingClientRect().width, room: room})),
    setup: Array.from(article.querySelectorAll(".cell_input")).filter(shown)
        .map(e => e.innerText).filter(setup).map(text => text.slice(0, 80)),
    headers: Array.from(article.querySelectorAll("table")).filter(shown)
        .map(t => Array.from(t.querySelectorAll("thead th")).map(th => th.innerText.trim())),
};
"""


def _screenshot(driver, path: Path) -> None:
    """Save the whole page, not just the window, as a PNG at ``path``.

    The viewport is stretched to the page's size through the DevTools protocol for the capture
    (Chromium's own full-page capture misplaces this theme's fixed layout), then restored.
    """
    width, height = driver.execute_script(
        "const d = document.documentElement; return [d.scrollWidth, d.scrollHeight];"
    )
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": int(width), "height": int(min(height, MAX_SCREENSHOT_HEIGHT)),
         "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.write_bytes(base64.b64decode(shot["data"]))


@pytest.fixture(scope="module")
def visit(browser, site: str) -> Iterator[Callable[[str], Visit]]:
    """``visit(page)``: open ``page`` (relative to the site) once and record a Visit.

    Nothing is asserted here: a page that never finishes loading, or whose images never settle,
    is recorded as it stands after ``LOAD_TIMEOUT_S``, and the tests say what is wrong with it.
    """
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def wait_until(condition: Callable) -> None:
        try:
            WebDriverWait(browser, LOAD_TIMEOUT_S).until(condition)
        except TimeoutException:
            pass

    visits: dict[str, Visit] = {}
    artifacts = _artifacts_dir()

    def _visit(page: str) -> Visit:
        if page in visits:
            return visits[page]
        driver = browser
        url, final = site + page, site + PAGES[page]
        driver.get(url)
        wait_until(lambda d: d.current_url.split("#")[0] == final
                   and d.execute_script("return document.readyState") == "complete")
        result = Visit(url=url, final_url=driver.current_url, status=driver.execute_script(_STATUS),
                       ready_state=driver.execute_script("return document.readyState"))
        result.links = {urldefrag(link).url for link in driver.execute_script(_COLLECT_LINKS)}
        result.resources = [(name, int(status)) for name, status in driver.execute_script(_COLLECT_RESOURCES)]
        driver.execute_script(_LOAD_LAZY_IMAGES)
        wait_until(lambda d: d.execute_script(_IMAGES_SETTLED))
        result.images = driver.execute_script(_COLLECT_IMAGES)
        wait_until(lambda d: d.execute_script(_MATHS)[1] == 0)
        result.maths = tuple(driver.execute_script(_MATHS))
        result.layout = driver.execute_script(_LAYOUT)
        if page == PAGES[page]:  # a redirect has no page of its own to picture
            result.screenshot = artifacts / f"{Path(page).stem}.png"
            _screenshot(driver, result.screenshot)
        visits[page] = result
        return result

    yield _visit


@pytest.fixture(scope="module")
def http_status(site: str) -> Callable[[str], int]:
    """``http_status(url)``: the local server's HTTP status for ``url``, asked once per URL."""
    statuses: dict[str, int] = {}

    def _status(url: str) -> int:
        if url not in statuses:
            request = urllib.request.Request(url, method="HEAD")
            try:
                with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                    statuses[url] = response.status
            except urllib.error.HTTPError as error:
                statuses[url] = error.code
        return statuses[url]

    return _status


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header; fails the test when ``data`` is no PNG."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR", "a PNG without its IHDR header"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------
def test_every_notebook_page_is_checked(built_book: Path) -> None:
    built = sorted(p.name for p in (built_book / "_build" / "html" / "notebooks").glob("*.html"))
    assert built == sorted(f"{source.stem}.html" for source in SOURCES)


@pytest.mark.parametrize("page", PAGES)
def test_page_loads(visit, site: str, page: str) -> None:
    result = visit(page)
    assert result.ready_state == "complete"
    assert result.status == 200, f"{page}: HTTP {result.status}"
    assert result.final_url.split("#")[0] == site + PAGES[page]


@pytest.mark.parametrize("page", PAGES)
def test_every_image_is_decoded(visit, page: str) -> None:
    images = visit(page).images
    broken = [img["src"] for img in images if not (img["complete"] and img["naturalWidth"] > 0)]
    assert not broken, f"{page}: {len(broken)} of {len(images)} images not decoded: {broken}"
    if page.startswith("notebooks/"):
        figures = [img for img in images if "_images/" in img["src"] or img["src"].startswith("data:image/")]
        assert figures, f"{page}: no figure on a notebook page"


@pytest.mark.parametrize("page", PAGES)
def test_every_internal_link_resolves(visit, http_status, page: str) -> None:
    result = visit(page)
    assert result.links, f"{page}: no internal link found"
    broken = {link: status for link in sorted(result.links) if (status := http_status(link)) != 200}
    assert not broken, f"{page}: broken internal links (HTTP status): {broken}"
    failed = {name: status for name, status in result.resources if status not in (200, 304)}
    assert not failed, f"{page}: resources that did not load (HTTP status, 0 = no answer): {failed}"


@pytest.mark.parametrize("page", PAGES)
def test_maths_is_typeset_offline(visit, page: str) -> None:
    """MathJax ships with the book (sphinx-mathjax-offline), so every formula is typeset with
    the browser kept off the network; the pages about the paper's maths have formulas."""
    total, raw = visit(page).maths
    assert raw == 0, f"{page}: {raw} of {total} formulas not typeset by MathJax"
    if "or_theory" in page or "collapse" in page:
        assert total > 0, f"{page}: no formula found"


@pytest.mark.parametrize("page", [page for page in PAGES if page == PAGES[page]])
def test_screenshot_is_a_full_page_png(visit, page: str) -> None:
    from PIL import Image  # matplotlib's own dependency, there whenever the book builds

    path = visit(page).screenshot
    assert path is not None and path.is_file(), f"{page}: no screenshot"
    data = path.read_bytes()
    width, height = _png_size(data)
    assert width >= 800 and height >= 600, f"{path}: {width}x{height}"
    with Image.open(path) as image:
        image.load()
        extrema = image.convert("L").getextrema()
    assert extrema[0] < extrema[1], f"{path}: a blank, single-colour image"


@pytest.mark.parametrize("page", [page for page in PAGES if page == PAGES[page]])
def test_nothing_overflows_the_page_at_1280_px(visit, page: str) -> None:
    layout = visit(page).layout
    assert layout["overflow"] <= 0, f"{page}: {layout['overflow']} px wider than the window"
    wide = [t for t in layout["tables"] if t["width"] > t["room"] + 1]
    assert not wide, f"{page}: tables wider than the column ({wide[0]['room']:.0f} px): {wide}"


@pytest.mark.parametrize("page", [page for page in PAGES if page == PAGES[page]])
def test_no_image_is_shown_below_half_its_natural_width(visit, page: str) -> None:
    """A figure drawn wider than the page shows is scaled down, and its text with it."""
    small = [img for img in visit(page).layout["images"] if img["natural"] and img["displayed"] < img["natural"] / 2]
    assert not small, f"{page}: images shown at less than half their width: {small}"


@pytest.mark.parametrize("page", [page for page in PAGES if page.startswith("notebooks/")])
def test_no_setup_code_is_visible(visit, page: str) -> None:
    setup = visit(page).layout["setup"]
    assert not setup, f"{page}: setup code on the page: {setup}"


def test_the_intro_opens_with_the_claims_table(visit) -> None:
    headers = visit("intro.html").layout["headers"]
    assert headers, "intro.html: no table"
    first = headers[0]
    assert "verdict" in first and "claim" in first and "95% CI" in first, first
