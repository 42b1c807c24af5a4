"""The dashboard in a real browser (Debian's headless Chromium): sign in, every chart of every page drawn with
the seeded data and no console error, a bad key refused, and a customer shown only their own usage."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from tests import browser
from tests.test_dashboard import site  # noqa: F401  (the fixture: a seeded database and the gateway)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not browser.available(), reason=browser.MISSING)]

TEAM_PAGES = {"overview": 7, "quality": 2, "decisions": 1}


def test_every_chart_of_every_page_draws_its_data_without_console_errors(site):  # noqa: F811
    with browser.chromium() as driver:
        browser.sign_in(driver, site.url, site.admin_key)
        assert driver.current_url.endswith("/dashboard/overview")
        for page, expected in TEAM_PAGES.items():
            driver.get(f"{site.url}/dashboard/{page}?days=1")
            drawn = browser.charts(driver)
            assert len(drawn) == expected, (page, drawn)
            for chart in drawn:
                assert chart["canvas"], (page, chart)
                assert chart["points"] and max(chart["points"]) > 0, (page, chart)
            assert browser.console_errors(driver) == [], page


def test_a_bad_key_is_refused_in_the_browser(site):  # noqa: F811
    with browser.chromium() as driver:
        browser.sign_in(driver, site.url, "tm-wrong")
        assert driver.current_url.endswith("/dashboard/login")
        assert "not valid" in driver.find_element(By.CSS_SELECTOR, "[role=alert]").text
        driver.get(f"{site.url}/dashboard/overview")
        assert driver.current_url.endswith("/dashboard/login")


def test_a_customer_sees_only_their_own_agents(site):  # noqa: F811
    with browser.chromium() as driver:
        browser.sign_in(driver, site.url, site.keys["alice"])
        assert driver.current_url.endswith("/dashboard/me")
        drawn = {c["name"]: c for c in browser.charts(driver)}
        assert set(drawn) == {"agents", "cost-tier", "spend-day"}
        agents = driver.execute_script(
            "return echarts.getInstanceByDom(document.querySelector('[data-chart=agents]'))"
            ".getOption().xAxis[0].data")
        assert sorted(agents) == ["copywriter", "storyboard"]
        assert all(c["canvas"] and max(c["points"]) > 0 for c in drawn.values()), drawn
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "oncall-bot" not in body and "carol" not in body
        assert browser.console_errors(driver) == []
        driver.get(f"{site.url}/dashboard/overview")  # the browser logs the 403 itself
        assert "admin key" in driver.find_element(By.CSS_SELECTOR, "[role=alert]").text
