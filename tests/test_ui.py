"""The chat page at /, driven in headless Chromium (Debian's chromium + chromedriver) by Selenium.

The server runs in this process on a loopback port (live_server, with an API key), so the test
can look at the scheduler while the browser streams, stops and reloads.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from test_openai_api import KEY, MODEL, slow_neighbour

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
OUT = Path(__file__).resolve().parent.parent / "bench" / "out"


# --- without a browser: headers, --no-ui ------------------------------------------------------

def test_page_and_static_files_carry_security_headers(client):
    for path in ("/", "/static/chat.js", "/static/chat.css"):
        r = client.get(path)
        assert r.status_code == 200, path
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "http" not in csp and "unsafe-inline" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
    html = client.get("/").get_data(as_text=True)
    assert "<script>" not in html and "style=" not in html and "//" not in html.replace("http-equiv", "")
    assert client.get("/v1/models").status_code == 401  # the page is public; the API still wants the key


def test_no_ui_turns_the_page_off(settings, chat_runtime):
    from server.app import create_app
    from server.cli import build_parser

    assert build_parser().parse_args(["serve", "--no-ui"]).no_ui is True
    c = create_app(replace(settings, ui=False), chat_runtime).test_client()
    for path in ("/", "/static/chat.js"):
        r = c.get(path)
        assert r.status_code == 404 and set(r.get_json()) == {"run_id", "run_time_ms", "message", "result"}


# --- in the browser ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="needs selenium (pip install -e '.[test]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800",
              "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability", "--no-proxy-server",
              "--disable-features=Translate,OptimizationHints,MediaRouter"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_script_timeout(10)
    yield driver
    driver.quit()


def wait(cond, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def texts(d, sel):
    return [e.text for e in d.find_elements("css selector", sel)]


def enter_key(d, key):
    wait(lambda: d.find_element("id", "key-form").is_displayed(), what="the key form")
    box = d.find_element("id", "key")
    box.clear()
    box.send_keys(key)
    d.find_element("css selector", "#key-form button").click()


def ask(d, question):
    box = d.find_element("id", "prompt")
    box.send_keys(question)
    d.find_element("id", "send").click()


def idle(d):
    return d.find_element("id", "send").is_displayed()


def test_chat_page_end_to_end(browser, live_server, app, chat_runtime, monkeypatch):
    live_app = app
    d = browser
    sched = chat_runtime.scheduler
    d.set_window_size(1280, 800)
    d.get(live_server + "/")
    d.execute_script("sessionStorage.clear(); localStorage.clear();")
    d.refresh()

    # 1-2. The page asks for the key; a wrong one says so and asks again; the right one fills the models.
    enter_key(d, "wrong-key-0000")
    msg = d.find_element("id", "key-message")
    wait(lambda: "not accepted" in msg.text, what="the wrong-key message")
    assert d.find_element("id", "key-form").is_displayed() and "401" in msg.text
    OUT.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(OUT / "ui-wrong-key-1280x800.png"))
    enter_key(d, KEY)
    wait(lambda: texts(d, "#model option") == [MODEL], what="the model picker")
    assert not d.find_element("id", "key-form").is_displayed()
    assert d.execute_script("return sessionStorage.getItem('llamabox.key')") == KEY
    assert d.get_cookies() == [] and KEY not in d.current_url

    d.find_element("id", "settings-toggle").click()
    for field, value in (("temperature", "0"), ("max-tokens", "150")):
        box = d.find_element("id", field)
        box.clear()
        box.send_keys(value)
    d.find_element("id", "settings-toggle").click()

    # 3. The answer grows in steps while it streams (a slow neighbour makes each step >= 20 ms).
    cancelled0 = sched.stats["jobs_cancelled"]
    neighbour = slow_neighbour(chat_runtime, per_token_s=0.02)
    try:
        ask(d, "Hello there")
        answer_sel = "#log .msg.assistant .text"
        seen: list[str] = []
        end = time.monotonic() + 20
        while len(seen) < 4 and time.monotonic() < end:
            t = d.execute_script("const e = document.querySelectorAll(arguments[0]); return e.length ? e[e.length-1].textContent : ''",
                                 answer_sel)
            if t and (not seen or t != seen[-1]):
                assert not seen or t.startswith(seen[-1])  # it grows; nothing is replaced
                seen.append(t)
            time.sleep(0.01)
        assert len(seen) >= 4, f"the answer grew in {len(seen)} steps: {seen!r}"
        assert len(sched._jobs) == 2  # ours was still generating

        # 4. Stop: the browser hangs up, the server cancels the generation and frees its sequence.
        d.find_element("id", "stop").click()
        wait(lambda: idle(d), what="the page to be idle after Stop")
        wait(lambda: sched.stats["jobs_cancelled"] > cancelled0, 10, "the server to cancel the job")
        wait(lambda: len(sched._jobs) == 1, 10, "our sequence to be freed")
        stopped = texts(d, answer_sel)[-1]
        assert stopped and "Stopped" in texts(d, "#log .msg.assistant .meta")[-1]
    finally:
        neighbour.cancel()
    wait(lambda: not sched._jobs and len(sched._free_ids) == chat_runtime.info.n_parallel, 10, "every sequence free")

    # 5. A second question in the same conversation: the request carries both turns.
    seen_messages: list[list[dict]] = []
    real = chat_runtime.chat_tokens

    def recorder(messages, *a, **kw):
        seen_messages.append([dict(m) for m in messages])
        return real(messages, *a, **kw)

    monkeypatch.setattr(chat_runtime, "chat_tokens", recorder)
    ask(d, "And then?")
    wait(lambda: len(texts(d, "#log .msg.assistant")) == 2 and idle(d), 30, "the second answer")
    monkeypatch.undo()
    assert seen_messages[-1] == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": stopped},
                                 {"role": "user", "content": "And then?"}]
    meta = texts(d, "#log .msg.assistant .meta")[-1]
    assert "tokens/s" in meta, meta
    OUT.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(OUT / "ui-desktop-1280x800.png"))

    # 6. A reload keeps the conversation (and the key: no second prompt).
    before = texts(d, "#log .msg .text")
    d.refresh()
    wait(lambda: texts(d, "#model option") == [MODEL], what="the models after reload")
    assert texts(d, "#log .msg .text") == before and len(before) == 4
    assert not d.find_element("id", "key-form").is_displayed()

    # 7. Model output is text: markup in an answer shows literally and never runs.
    evil = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold</b>'
    stored = json.loads(d.execute_script("return sessionStorage.getItem('llamabox.chat')"))
    stored["messages"] += [{"role": "user", "content": "Show me HTML"}, {"role": "assistant", "content": evil}]
    d.execute_script("sessionStorage.setItem('llamabox.chat', arguments[0])", json.dumps(stored))
    d.refresh()
    wait(lambda: len(texts(d, "#log .msg.assistant")) == 3, what="the seeded answer")
    time.sleep(0.3)  # an onerror would have fired by now
    assert texts(d, "#log .msg.assistant .text")[-1] == evil
    assert d.find_elements("css selector", "#log img, #log script, #log b") == []
    assert d.execute_script("return window.__pwned === undefined")

    # A mid-stream error (here the request timeout, as `event: error`) shows a readable line; the page goes on.
    # In a new conversation: this one's history may by now fill most of the 512-token context.
    d.find_element("id", "new-chat").click()
    wait(lambda: len(texts(d, "#log .msg")) == 0, what="a new conversation")
    st = live_app.extensions["llamabox"]
    monkeypatch.setattr(st, "settings", replace(st.settings, request_timeout_s=0.3))
    neighbour = slow_neighbour(chat_runtime, per_token_s=0.02)
    try:
        ask(d, "Slowly please")
        wait(lambda: len(texts(d, "#log .msg.assistant")) == 1 and idle(d), 20, "the timed-out answer")
    finally:
        neighbour.cancel()
        monkeypatch.undo()
    meta = d.find_elements("css selector", "#log .msg.assistant .meta")[-1]
    assert "cut off" in meta.text and "did not finish within 0.3 s" in meta.text and "error" in meta.get_attribute("class")
    assert d.find_element("id", "send").is_displayed() and d.find_element("id", "prompt").is_enabled()

    d.set_window_size(390, 844)
    time.sleep(0.2)
    d.save_screenshot(str(OUT / "ui-phone-390x844.png"))
    d.set_window_size(1280, 800)
