"""Debian's headless Chromium driven by Selenium through its own chromedriver (no browser download), for the
dashboard's browser tests and bench/dashboard.py's screenshots."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

MISSING = ("no headless Chromium here: `apt-get install -y chromium chromium-driver` (Debian's packages; "
           ".ci/run installs them)")


def available() -> bool:
    return bool(shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser")))


@contextmanager
def chromium(width: int = 1440, height: int = 1000) -> Iterator:
    """A fresh headless browser (its own profile: no cookie carried between two of them) that keeps the
    page's console log for get_log("browser")."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="tm-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={width},{height}", f"--user-data-dir={profile}", "--hide-scrollbars"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def sign_in(driver, base_url: str, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{base_url}/dashboard/login")
    field = driver.find_element(By.ID, "key")
    field.send_keys(key)
    field.submit()
    # submit() may return before the answer's page has replaced the form (a fresh clone's CI run read the
    # login page's URL once): wait until it has, whichever page the server answered with.
    WebDriverWait(driver, 20).until(expected_conditions.staleness_of(field))


# What every chart on the page holds once drawn: its name, whether it drew on a canvas, and the number of
# data points of each of its series, as ECharts itself reports them.
CHARTS_JS = """
return Array.from(document.querySelectorAll('[data-chart]')).map(function (el) {
  var chart = window.echarts && echarts.getInstanceByDom(el);
  var series = chart ? chart.getOption().series : [];
  return {name: el.dataset.chart, canvas: !!el.querySelector('canvas'),
          points: series.map(function (s) { return (s.data || []).length; })};
});
"""


def charts(driver) -> list[dict]:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.querySelectorAll('[data-chart]'))"
        ".every(function (el) { return el.dataset.rendered === 'true'; })"))
    return driver.execute_script(CHARTS_JS)


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
