"""The HTML report in a real headless browser (Debian's chromium + chromedriver, driven by selenium): no console
errors, the table is there, every image loaded. Skips, saying why, where the browser or selenium is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvsqueeze.bench.report import write_report
from tests.unit.bench.report_rows import write_results

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            pytest.skip(f"{path} not found: install the Debian package {package} (apt-get install {package})")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    except Exception as err:  # a browser that cannot start here (no display libraries, ...) is an environment issue
        pytest.skip(f"chromium could not start: {str(err).splitlines()[0]}")
    yield driver
    driver.quit()


def test_html_report_renders_without_errors(browser, tmp_path: Path) -> None:
    files = write_report(write_results(tmp_path))
    for plot in files.plots:  # the page embeds its plots: it must not need the PNG files next to it
        plot.unlink()
    browser.get(files.html.resolve().as_uri())
    images = browser.find_elements("tag name", "img")
    assert len(images) == len(files.plots) == 4
    loaded = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src').slice(0, 22), i.complete, i.naturalWidth]);"
    )
    assert all(src == "data:image/png;base64," and complete and width > 0 for src, complete, width in loaded), loaded
    headers = [th.text for th in browser.find_elements("css selector", "table th")]
    assert "method" in headers and "average" in headers
    cells = [td.text for td in browser.find_elements("css selector", "table td")]
    assert "knorm" in cells and "50.0 [50.0, 50.0] *" in cells and "25.0 [12.8, 37.2] *" in cells
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe


def test_a_broken_image_is_caught(browser, tmp_path: Path) -> None:
    """The check above can fail: corrupt one embedded plot and the page reports a broken image."""
    files = write_report(write_results(tmp_path))
    page = files.html.read_text()
    start = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    files.html.write_text(page[:start] + "bm90IGEgcG5n" + page[page.index('"', start) :])  # "not a png"
    browser.get(files.html.resolve().as_uri())
    widths = browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth);")
    assert widths[0] == 0 and all(w > 0 for w in widths[1:])
