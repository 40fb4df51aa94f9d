"""The atlas in a real browser: headless Chromium driven by selenium over an atlas of fake data, opened
from file:// with no network. Skips, naming what is missing, only when selenium, chromium or chromedriver
cannot be found (.ci/run installs Debian's chromium and chromium-driver)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import fake_atlas_card, fake_atlas_index, fake_atlas_tokens

from conca.atlas.site import write_atlas

N_LATENTS, CHUNK = 300, 64
IMG_ATTACK = "<img src=x onerror=\"document.title='pwned'\">"
SCRIPT_BREAKER = "</script><script>document.title='pwned'</script>"
CHROMEDRIVER = "/usr/bin/chromedriver"
pytestmark = pytest.mark.slow  # starts a browser (a few seconds)


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or a skip that names what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("atlas browser test skipped: selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver")
    missing = [name for name, path in [("chromium", chromium), ("chromedriver", driver)] if not path]
    if missing:
        pytest.skip(f"atlas browser test skipped: {' and '.join(missing)} not found "
                    "(apt-get install chromium chromium-driver; .ci/run does this as root)")
    return chromium, driver


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    cards = [fake_atlas_card(i, signed=(i == 3)) for i in range(N_LATENTS)]
    cards[4]["top"][0]["tokens"][1] = IMG_ATTACK
    cards[4]["top"][1]["tokens"][1] = SCRIPT_BREAKER
    return write_atlas(tmp_path_factory.mktemp("site") / "atlas", fake_atlas_index(N_LATENTS, cards), iter(cards),
                       chunk_size=CHUNK)


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="conca-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # The machine has no network: these flags keep Chromium from trying to reach it.
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1300,1000"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(predicate, timeout: float = 5.0):
    """Poll `predicate` until it returns something truthy (the page renders asynchronously)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.05)


def shown_latents(driver) -> list[int]:
    return [int(x) for x in driver.execute_script(
        "return Array.from(document.querySelectorAll('#latents tbody tr')).map(r => r.dataset.latent)")]


def severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_index(driver, atlas: Path) -> None:
    driver.get(atlas.joinpath("index.html").as_uri())
    assert wait(lambda: shown_latents(driver)), "the index table never filled"


def search(driver, text: str, mode: str) -> list[int]:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", "mode")).select_by_value(mode)
    box = driver.find_element("id", "search")
    box.clear()
    box.send_keys(text)
    return shown_latents(driver)


def test_index_sorts_searches_and_opens_cards_on_demand(browser, atlas):
    started = time.monotonic()
    d = browser
    open_index(d, atlas)
    assert shown_latents(d) == list(range(100))  # first page of 100, in latent order
    assert "300 of 300 latents" in d.find_element("id", "match-count").text

    # sort by density: the first row is a latent with the highest density
    cards = [fake_atlas_card(i) for i in range(N_LATENTS)]
    top_density = max(c["density"] for c in cards)
    d.find_element("css selector", "th[data-key=density]").click()
    if d.find_element("css selector", "th[data-key=density]").get_attribute("aria-sort") != "descending":
        d.find_element("css selector", "th[data-key=density]").click()
    first = shown_latents(d)[0]
    assert cards[first]["density"] == top_density
    d.find_element("css selector", "th[data-key=latent]").click()  # back to latent order (ascending)
    assert shown_latents(d)[:3] == [0, 1, 2]

    # search a token: exactly the latents whose listed tokens contain it (trimmed, case-sensitive)
    def expected(text: str, which: int) -> list[int]:
        return [i for i in range(N_LATENTS) if any(text in t.strip() for t in fake_atlas_tokens(i)[which])]

    want = expected("Paris", 0)
    assert 0 < len(want) <= 100 and len(want) < N_LATENTS
    assert search(d, " Paris", "fires_on") == want
    assert f"{len(want)} of 300 latents match" in d.find_element("id", "match-count").text
    want = expected("king", 1)
    assert search(d, "king", "promotes") == want
    assert search(d, "King", "promotes") == []  # case-sensitive

    # jump to a latent out of range: a message, the index stays
    box = d.find_element("id", "jump")
    box.send_keys("99999")
    d.find_element("id", "jump-go").click()
    assert "0 to 299" in d.find_element("id", "jump-msg").text
    assert d.find_elements("id", "latents")

    # filters: only matched concepts, then hide dead as well
    search(d, "", "fires_on")
    assert shown_latents(d) == list(range(100))
    d.find_element("id", "only-matched").click()
    assert shown_latents(d) == [i for i in range(N_LATENTS) if fake_atlas_card(i)["concept"]]
    d.find_element("id", "only-matched").click()
    d.find_element("id", "hide-dead").click()
    assert shown_latents(d)[:6] == [0, 1, 2, 3, 4, 6]  # 5 is dead
    d.find_element("id", "hide-dead").click()

    # click a row of a search result: the card of that latent, with its highlighted top context and
    # logit-lens tokens
    paris = search(d, "Paris", "fires_on")
    latent = paris[1]
    d.find_element("css selector", f"#latents tbody tr[data-latent='{latent}'] td:nth-child(2)").click()
    assert wait(lambda: d.find_elements("css selector", ".conca-card .cc-top .cc-ex"))
    assert d.execute_script("return location.hash") == f"#latent={latent}"
    assert d.find_element("css selector", ".conca-card h2").text == f"Latent {latent}"
    target = d.find_element("css selector", ".cc-top .cc-ex .cc-target")
    assert target.text.replace("\u00b7", " ") == fake_atlas_tokens(latent)[0][0]
    assert "255, 140, 0" in target.get_attribute("style") and target.get_attribute("title")
    vocab = d.find_element("css selector", ".cc-vocab").text.replace("\u00b7", " ")
    for token in fake_atlas_tokens(latent)[1]:
        assert token.strip() in vocab

    # a card in another chunk file: loaded on demand with a <script> tag
    d.execute_script("location.hash = 'latent=200'")
    assert wait(lambda: d.find_element("css selector", ".conca-card h2").text == "Latent 200"
                if d.find_elements("css selector", ".conca-card h2") else False)
    loaded = d.execute_script("return Array.from(document.scripts).map(s => s.getAttribute('src'))")
    assert "data/cards_00003.js" in loaded and "data/cards_00001.js" not in loaded

    # back twice: the same card, then the index with its state (the search and its rows)
    d.back()
    assert wait(lambda: d.find_elements("css selector", ".conca-card h2")
                and d.find_element("css selector", ".conca-card h2").text == f"Latent {latent}")
    d.back()
    assert wait(lambda: d.find_elements("id", "latents"))
    assert shown_latents(d) == paris and d.find_element("id", "search").get_attribute("value") == "Paris"
    assert severe(d) == []
    assert time.monotonic() - started < 20


def test_hostile_tokens_render_as_text(browser, atlas):
    d = browser
    d.get(atlas.joinpath("index.html").as_uri() + "?latent=4")  # the query form of a link to a card
    assert wait(lambda: d.find_elements("css selector", ".cc-top .cc-ex"))
    rows = d.find_elements("css selector", ".cc-top .cc-ex .cc-ctx")
    assert IMG_ATTACK in rows[0].text.replace("\u00b7", " ")
    assert SCRIPT_BREAKER in rows[1].text.replace("\u00b7", " ")
    assert d.find_elements("css selector", ".conca-card img, .conca-card script") == []
    assert d.title != "pwned"
    assert severe(d) == []


def test_a_card_shows_its_sections_and_the_negative_side_of_a_signed_latent(browser, atlas):
    d = browser
    d.get(atlas.joinpath("index.html").as_uri() + "#latent=3")
    assert wait(lambda: d.find_elements("css selector", ".cc-bottom .cc-ex"))
    negative = d.find_element("css selector", ".cc-bottom .cc-ex .cc-target")
    assert "40, 110, 255" in negative.get_attribute("style")
    text = d.find_element("css selector", ".conca-card").text
    for section in ["Top activations", "Most negative activations", "Activation quantiles", "Activation histogram",
                    "Vocabulary projection", "Intervention", "male-female", "cosine"]:
        assert section in text, section
    assert d.find_elements("css selector", ".cc-histogram svg rect")
    # the hover tooltip shows the value of a token
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(d).move_to_element(negative).perform()
    tip = d.find_element("id", "cc-tip")
    assert wait(lambda: tip.is_displayed())
    assert negative.get_attribute("data-value") in tip.text
    assert severe(d) == []
