"""fetch_news.py against a real HTTP server on 127.0.0.1 that behaves like EODHD's /news endpoint,
and the offline market corpus against the committed data/finance_corpus.txt."""

import contextlib
import datetime as dt
import email.utils
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import assert_user_error as one_line_error

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import fetch_news  # noqa: E402  (importing must have no side effects)
import market_corpus  # noqa: E402

KEY = "k3y-SECRET-5f9a1c"  # distinctive, so a leak anywhere is easy to find


# -----------------------------------------------------------------------------
# a fake EODHD


def article(n: int, symbols, day: int = None, content: str = None) -> dict:
    day = day if day is not None else 1 + n % 27
    return {
        "date": f"2024-03-{day:02d}T{n % 24:02d}:{n % 60:02d}:00+00:00",
        "title": f"Headline number {n}",
        "content": content
        if content is not None
        else f"<p>Body of story {n}.</p><p>Second &amp; last paragraph.</p>",
        "link": f"https://news.example.com/story/{n}",
        "symbols": list(symbols),
        "tags": ["EARNINGS"] if n % 2 else [],
        "sentiment": {"polarity": 0.5, "neg": 0.1, "neu": 0.6, "pos": 0.3},
    }


class FakeEODHD:
    """Per ticker: a feed (newest first), short page sizes, scripted failures per request number."""

    def __init__(self):
        self.feeds = {}  # ticker -> [article]
        self.page_caps = {}  # ticker -> list of page sizes cycled through (pages shorter than limit)
        self.script = {}  # ticker -> list of behaviours for its 1st, 2nd, ... request ("ok" after)
        self.always = {}  # ticker -> behaviour for every request
        self.delay_s = 0.0  # added to every answer (makes a kill land mid-run)
        self.slow_s = 2.0  # how long a "slow" answer takes
        self.retry_after = "1"  # the Retry-After header of a 429
        self.quota = None  # OK answers left before 402
        self.news_ctype = "application/json"  # the Content-Type of a page of articles
        self.token_echo = None  # text before the token in error bodies that quote it (401, "400")
        self.log = []  # (time, ticker, offset, limit, status, n_items)
        self.n_req = {}
        self.files = {}  # extra static files: path -> (content type, bytes)
        self.lock = threading.Lock()

    def respond(self, path: str, q: dict):
        if path in self.files:
            return 200, self.files[path][0], self.files[path][1], {}
        if path != "/api/news":
            return 404, "text/plain", b"Not Found", {}
        echo = f"{self.token_echo}{q.get('api_token')}".encode()
        if q.get("api_token") not in (KEY, "demo"):
            return 401, "text/plain", b"Unauthenticated" if self.token_echo is None else echo, {}
        ticker, offset, limit = q["s"], int(q["offset"]), int(q["limit"])
        if q["api_token"] == "demo" and ticker not in ("AAPL.US", "TSLA.US"):  # EODHD's demo key
            return 403, "application/json", b'{"error": "Forbidden"}', {}
        assert q.get("fmt") == "json"
        with self.lock:
            k = self.n_req.get(ticker, 0)
            self.n_req[ticker] = k + 1
        script = self.script.get(ticker, [])
        what = self.always.get(ticker) or (script[k] if k < len(script) else "ok")
        if self.delay_s:
            time.sleep(self.delay_s)
        if what == "slow":
            time.sleep(self.slow_s)
            what = "ok"
        if what == "404" or ticker not in self.feeds:
            return 404, "application/json", b'{"error": "ticker not found"}', {}
        if what == "403":  # a key that is good, but not for this ticker (a plan, or the demo key)
            return 403, "application/json", b'{"error": "Forbidden"}', {}
        if what == "400":
            return 400, "text/plain", echo, {}
        if what == "429":
            return 429, "text/plain", b"Too Many Requests", {"Retry-After": self.retry_after}
        if what == "500":
            return 500, "text/plain", b"Internal Server Error", {}
        if what == "badjson":
            return 200, "application/json", b'[{"date": "2024-03-01", "title": "trunc', {}
        with self.lock:
            if self.quota is not None:
                if self.quota <= 0:
                    return 402, "text/plain", b"Payment Required", {}
                self.quota -= 1
        caps = self.page_caps.get(ticker)
        n = min(limit, caps[k % len(caps)]) if caps else limit
        items = self.feeds[ticker][offset : offset + n]
        body = json.dumps(items, ensure_ascii=False).encode("utf-8", "backslashreplace")  # raw UTF-8
        return 200, self.news_ctype, body, {}


@pytest.fixture
def api():
    fake = FakeEODHD()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            u = urllib.parse.urlsplit(self.path)
            q = {k: v[0] for k, v in urllib.parse.parse_qs(u.query).items()}
            status, ctype, body, headers = fake.respond(u.path, q)
            if u.path == "/api/news":
                try:
                    n = len(json.loads(body)) if status == 200 else None
                except ValueError:
                    n = None
                with fake.lock:
                    fake.log.append(
                        (
                            time.monotonic(),
                            q.get("s"),
                            int(q.get("offset", -1)),
                            int(q.get("limit", -1)),
                            status,
                            n,
                        )
                    )
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def log_message(self, *a):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass

    srv = Server(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    fake.base_url = f"http://127.0.0.1:{srv.server_address[1]}/api"
    fake.root = f"http://127.0.0.1:{srv.server_address[1]}"
    yield fake
    srv.shutdown()
    srv.server_close()


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("EODHD_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def eodhd_cmd(base_url: str, out_dir, *extra, key=KEY) -> list[str]:
    """The command line of an EODHD run against base_url."""
    script = str(REPO / "fetch_news.py")
    where = ["--out-dir", str(out_dir), "--base-url", base_url, "--api-key", key]
    return [sys.executable, script, "--source", "eodhd", *where, *extra]


def fetch(api, out_dir, *extra, key=KEY, timeout=60):
    quick = ["--timeout", "1.5", "--max-retries", "3", "--backoff-base", "0.05", "--backoff-max", "0.2"]
    cmd = eodhd_cmd(api.base_url, out_dir, *quick, *extra, key=key)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(), cwd=REPO)


def assert_user_error(r, *fragments):
    """Exit 2, exactly one line on stderr, "error: ..." holding every fragment, no traceback."""
    one_line_error(r, *fragments, prefix="error:")


def assert_error_last(r, *fragments):
    """A failure after work began: exit 2, no traceback, the error on the last stderr line (progress
    output may come before it)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in last, (f, last)


def read_news(out_dir) -> list[dict]:
    lines = (Path(out_dir) / "news.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(ln) for ln in lines]  # every line must parse on its own


def assert_no_key(*texts, out_dir=None):
    for t in texts:
        assert KEY not in t
    if out_dir is not None:
        for p in Path(out_dir).rglob("*"):
            if p.is_file():
                assert KEY.encode() not in p.read_bytes(), p


def standard_feeds(api):
    shared = [article(900 + i, ["AAPL.US", "MSFT.US"]) for i in range(3)]
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(20)] + shared
    api.feeds["MSFT.US"] = shared[:2] + [article(100 + i, ["MSFT.US"]) for i in range(8)] + shared[2:]
    api.page_caps["AAPL.US"] = [7, 3, 5]  # short pages long before the end
    api.page_caps["MSFT.US"] = [4, 10]
    api.feeds["RATE.US"] = [article(200 + i, ["RATE.US"]) for i in range(5)]
    api.script["RATE.US"] = ["429"]
    api.feeds["FLAKY.US"] = [article(300 + i, ["FLAKY.US"]) for i in range(6)]
    api.script["FLAKY.US"] = ["ok", "500"]
    api.feeds["BADJSON.US"] = [article(400 + i, ["BADJSON.US"]) for i in range(4)]
    api.script["BADJSON.US"] = ["badjson"]
    api.feeds["SLOW.US"] = [article(500 + i, ["SLOW.US"]) for i in range(3)]
    api.script["SLOW.US"] = ["slow"]
    api.slow_s = 2.5  # past the 1.5 s --timeout that fetch() passes
    return ["AAPL.US", "MSFT.US", "RATE.US", "FLAKY.US", "BADJSON.US", "SLOW.US", "NOPE.US"]


def all_links(api) -> set:
    return {a["link"] for feed in api.feeds.values() for a in feed}


# -----------------------------------------------------------------------------
# CLI surface


def test_help_documents_every_flag():
    r = subprocess.run(
        [sys.executable, str(REPO / "fetch_news.py"), "--help"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert r.returncode == 0
    help_text = " ".join(r.stdout.split())
    parser = fetch_news.build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 17
    for a in flags:
        assert any(o in help_text for o in a.option_strings), a.option_strings
        assert "default" in (a.help or ""), f"{a.option_strings} does not state its default"
    for s in ("--api-key", "EODHD_API_KEY", "EODHD_BASE_URL", "https://eodhd.com/api", "exit codes"):
        assert s in help_text


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--tickers-file", "/nonexistent/tickers.txt"], "cannot read --tickers-file"),
        (["--tickers-file", "EMPTY"], "lists no tickers"),
        (["--tickers", "AAPL.US", "--limit", "0"], "argument --limit: must be between 1 and 1000"),
        (["--tickers", "AAPL.US", "--limit", "1001"], "argument --limit: must be between 1 and 1000"),
        (["--tickers", "AAPL.US", "--from", "2024-13-01"], "argument --from: must be a date as YYYY-MM-DD"),
        (["--tickers", "AAPL.US", "--to", "2024-3-1"], "argument --to: must be a date as YYYY-MM-DD"),
        (["--tickers", "AAPL.US", "--from", "2024-03-02", "--to", "2024-03-01"], "is after --to"),
        (["--tickers", "AA PL"], "not a ticker"),
        (["--tickers", "AAPL.US", "--api-key", ""], "no API key"),
        ([], "no tickers"),
        (["--tickers", "AAPL.US", "--base-url", "ftp://x"], "--base-url must be an http:// or https:// URL"),
        (["--tickers", "AAPL.US", "--base-url", "http://"], "URL with a host, got 'http://'"),
        (["--tickers", "AAPL.US", "--base-url", "http://127.0.0.1:99999"], "--base-url must be an http"),
        (["--tickers", "AAPL.US", "--base-url", "http://[::1"], "--base-url must be an http"),
        (["--tickers", "AAPL.US", "--limit", "ten"], "argument --limit: must be a whole number, got 'ten'"),
        (["--tickers", "AAPL.US", "--timeout", "0"], "argument --timeout: must be more than 0"),
        # nan and inf passed the old range checks, then crashed in time.sleep() or the socket layer
        (["--tickers", "AAPL.US", "--timeout", "nan"], "argument --timeout: must be more than 0 and at most"),
        (
            ["--tickers", "AAPL.US", "--timeout", "1e300"],
            "argument --timeout: must be more than 0 and at most",
        ),
        (["--tickers", "AAPL.US", "--backoff-base", "nan"], "argument --backoff-base: must be between 0 and"),
        (
            ["--tickers", "AAPL.US", "--backoff-max", "inf"],
            "argument --backoff-max: must be between 0 and 86400",
        ),
        (
            ["--tickers", "AAPL.US", "--backoff-max", "-1"],
            "argument --backoff-max: must be between 0 and 86400",
        ),
        (
            ["--tickers", "AAPL.US", "--max-retries", "-1"],
            "argument --max-retries: must be 0 or more, got -1",
        ),
        (["--tickers", "AAPL.US", "--max-pages", "0"], "argument --max-pages: must be at least 1, got 0"),
        (["--tickers", "AAPL.US", "--out-dir", ""], "argument --out-dir: must name a folder"),
        (["--tickers-file", "BINARY"], "is not UTF-8 text"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, args, fragment):
    args = [
        str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / "bin.txt") if a == "BINARY" else a
        for a in args
    ]
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    (tmp_path / "bin.txt").write_bytes(b"AAPL.US\n\xff\xfe\x00\x81\n")
    cmd = [
        sys.executable,
        str(REPO / "fetch_news.py"),
        "--source",
        "eodhd",
        "--out-dir",
        str(tmp_path / "out"),
        *args,
    ]
    if "--api-key" not in args:
        cmd += ["--api-key", KEY]
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert_user_error(r, fragment)
    assert_no_key(r.stdout, r.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--tickers", "AAPL.US"],
        ["--limit", "50"],
        ["--base-url", "http://127.0.0.1:9/api"],
        ["--timeout", "5"],
        ["--max-retries", "0"],
    ],
)
def test_market_rejects_eodhd_flags(tmp_path, monkeypatch, args):
    """Every eodhd flag given to --source market is refused, those with defaults too (--limit, --base-url,
    --timeout ... were once silently ignored); one set to its default, $EODHD_BASE_URL's included, is
    harmless and passes."""
    cmd = [
        sys.executable,
        str(REPO / "fetch_news.py"),
        "--source",
        "market",
        "--out-dir",
        str(tmp_path),
        *args,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {args[0]} only applies to --source eodhd"
    assert not (tmp_path / "finance_corpus.txt").exists()
    monkeypatch.setenv("EODHD_BASE_URL", "http://127.0.0.1:9/api")
    parser = fetch_news.build_parser()
    quiet = parser.parse_args(["--source", "market", "--limit", "1000"])
    assert [n for n in fetch_news.EODHD_ONLY if getattr(quiet, n) != parser.get_default(n)] == []


# -----------------------------------------------------------------------------
# fetching


def test_fetch_complete_deduplicated_and_resilient(api, tmp_path):
    tickers = standard_feeds(api)
    out = tmp_path / "news"
    r = fetch(api, out, "--tickers", ",".join(tickers), "--limit", "10", "--backoff-max", "2")
    assert r.returncode == 0, r.stderr
    assert_no_key(r.stdout, r.stderr, out_dir=out)

    news = read_news(out)
    links = [a["link"] for a in news]
    assert len(links) == len(set(links)) == len(all_links(api)) == 49
    assert set(links) == all_links(api)
    by_link = {a["link"]: a for a in news}
    for i in range(3):  # the article under two tickers is stored once, with both tickers
        a = by_link[f"https://news.example.com/story/{900 + i}"]
        assert a["tickers"] == ["AAPL.US", "MSFT.US"] and sorted(a["symbols"]) == ["AAPL.US", "MSFT.US"]
    assert by_link["https://news.example.com/story/5"]["tickers"] == ["AAPL.US"]
    assert by_link["https://news.example.com/story/5"]["sentiment"]["pos"] == 0.3  # fields kept as sent

    # offsets advance by what each page returned (7, 3, 5, ... not by --limit) and stop on an empty page
    aapl = [(off, n) for _, s, off, _, st, n in api.log if s == "AAPL.US" and st == 200]
    expect, off = [], 0
    for k in range(100):
        n = min(10, [7, 3, 5][k % 3], 23 - off)
        expect.append((off, n))
        off += n
        if n == 0:
            break
    assert aapl == expect and aapl[-1][1] == 0 and any(0 < n < 10 for _, n in aapl[:-1])

    # 429: the retry waited for Retry-After (1 s); 500, invalid JSON and a timeout were retried
    rate = [(t, st) for t, s, _, _, st, _ in api.log if s == "RATE.US"]
    assert rate[0][1] == 429 and rate[1][1] == 200 and rate[1][0] - rate[0][0] >= 0.95
    assert [st for _, s, _, _, st, _ in api.log if s == "FLAKY.US"][:3] == [200, 500, 200]
    assert "RATE.US offset 0: rate limited (HTTP 429)" in r.stderr
    assert "FLAKY.US offset 6: server error (HTTP 500)" in r.stderr
    assert "BADJSON.US offset 0: answer is not a JSON list" in r.stderr
    assert "SLOW.US offset 0: ReadTimeout" in r.stderr
    assert "skipped NOPE.US: unknown ticker (HTTP 404)" in r.stdout
    assert "tickers: 6 done, 0 already complete, 1 skipped" in r.stdout
    assert "articles: 49 new, 49 total" in r.stdout
    n_ok = sum(1 for _, _, _, _, st, _ in api.log if st == 200)  # every 200 (the bad-JSON one too) is billed
    assert f"API calls spent: {5 * n_ok} ({n_ok} news requests x 5)" in r.stdout

    corpus = (out / "finance_corpus.txt").read_text(encoding="utf-8")
    docs = corpus[:-1].split("\n\n")
    assert corpus.endswith("\n") and len(docs) == 49 and all(d.strip() for d in docs)
    order = sorted(news, key=lambda a: (a["date"], a["link"]))
    assert [d.splitlines()[0] for d in docs] == [a["title"] for a in order]
    assert "Body of story 0.\nSecond & last paragraph." in corpus and "<p>" not in corpus

    # a rerun has nothing left to do: no requests for finished tickers, files unchanged
    before = (out / "news.jsonl").read_bytes(), (out / "finance_corpus.txt").read_bytes()
    time.sleep(api.slow_s)  # the server logs a request when it answers: let the abandoned slow one finish
    n_log = len(api.log)
    r2 = fetch(api, out, "--tickers", ",".join(tickers), "--limit", "10")
    assert r2.returncode == 0
    assert [s for _, s, *_ in api.log[n_log:]] == ["NOPE.US"]
    assert ((out / "news.jsonl").read_bytes(), (out / "finance_corpus.txt").read_bytes()) == before
    assert "articles: 0 new, 49 total" in r2.stdout and "6 already complete" in r2.stdout


def test_timeouts_and_5xx_exhaust_retries_then_skip(api, tmp_path):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(5)]
    api.feeds["HANG.US"] = [article(50, ["HANG.US"])]
    api.feeds["DOWN.US"] = [article(60, ["DOWN.US"])]
    api.always["HANG.US"] = "slow"
    api.always["DOWN.US"] = "500"
    api.slow_s = 1.5
    r = fetch(api, tmp_path, "--tickers", "HANG.US,DOWN.US,AAPL.US", "--max-retries", "1", "--timeout", "0.5")
    assert r.returncode == 0, r.stderr
    assert "skipped HANG.US: ReadTimeout" in r.stdout and "gave up after 2 attempts" in r.stdout
    assert "skipped DOWN.US: server error (HTTP 500); gave up after 2 attempts" in r.stdout
    assert "tickers: 1 done, 0 already complete, 2 skipped" in r.stdout
    assert sorted(a["link"] for a in read_news(tmp_path)) == sorted(a["link"] for a in api.feeds["AAPL.US"])
    assert_no_key(r.stdout, r.stderr, out_dir=tmp_path)
    # a refused connection: requests puts the whole URL, token included, into the message
    dead = subprocess.run(
        eodhd_cmd(
            "http://127.0.0.1:9/api",
            str(tmp_path),
            "--tickers",
            "TSLA.US",
            "--max-retries",
            "1",
            "--backoff-base",
            "0.01",
        ),
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert dead.returncode == 2 and "TSLA.US offset 0: ConnectionError" in dead.stderr  # retried, stopped
    assert "api_token=***" in dead.stdout + dead.stderr
    assert_no_key(dead.stdout, dead.stderr, out_dir=tmp_path)


def test_no_connection_to_eodhd_stops_the_run_in_one_line_and_resumes(api, tmp_path):
    """DNS failure, refused connection, connect timeout: no other ticker would fare better, so the run stops
    with exit 2 instead of retrying ticker after ticker; what was stored is kept and a rerun resumes."""
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(6)]
    api.feeds["MSFT.US"] = [article(10 + i, ["MSFT.US"]) for i in range(3)]
    assert fetch(api, tmp_path, "--tickers", "AAPL.US", "--limit", "2", "--max-pages", "1").returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    quick = ["--limit", "2", "--max-retries", "1", "--backoff-base", "0.01"]
    cmd = eodhd_cmd("http://127.0.0.1:9/api", tmp_path, "--tickers", "AAPL.US,MSFT.US", *quick)
    dead = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)
    refused = "cannot connect to EODHD at 127.0.0.1:9 (ConnectionRefusedError"
    assert_error_last(dead, refused, "2 attempts", f"2 articles kept in {tmp_path}", "run the same command")
    assert "MSFT.US" not in dead.stdout + dead.stderr  # stopped at the first ticker
    assert_no_key(dead.stdout, dead.stderr, out_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing fetched is lost

    r = fetch(api, tmp_path, "--tickers", "AAPL.US,MSFT.US", "--limit", "2")
    assert r.returncode == 0, r.stderr
    assert [(s, off) for _, s, off, *_ in api.log][:2] == [("AAPL.US", 0), ("AAPL.US", 2)]  # resumed
    assert len(read_news(tmp_path)) == 9


def test_bad_key_exits_2_without_leaking_or_losing_data(api, tmp_path):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(4)]
    assert fetch(api, tmp_path, "--tickers", "AAPL.US").returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    wrong = "wrong-KEY-77aa"
    r = fetch(api, tmp_path, "--tickers", "AAPL.US,MSFT.US", "--restart", key=wrong)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        "error: EODHD rejected the API key (HTTP 401: Unauthenticated)"
    ), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert wrong not in r.stdout + r.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing fetched is lost
    for p in tmp_path.iterdir():
        assert wrong.encode() not in p.read_bytes()


def test_an_error_body_quoting_the_key_is_redacted_before_it_is_cut(api, tmp_path):
    """Error bodies are cut to fit one line (401/403 at 80 characters, other 4xx at 120): a cut through a
    quoted key must not leave its first characters behind."""
    api.feeds["AAPL.US"] = [article(1, ["AAPL.US"])]
    api.always["AAPL.US"] = "400"
    wrong = "wrong-KEY-77aa"
    api.token_echo = "x" * 67 + " token "  # the key starts 6 characters before the cut at 80
    r = fetch(api, tmp_path, "--tickers", "AAPL.US", key=wrong)
    assert_user_error(r, "EODHD rejected the API key (HTTP 401: xxx")
    assert wrong[:6] not in r.stderr and "token ***" in r.stderr
    api.token_echo = "x" * 107 + " token "  # ... and 6 before the cut at 120
    r = fetch(api, tmp_path, "--tickers", "AAPL.US")
    assert r.returncode == 0 and "skipped AAPL.US: HTTP 400: xxx" in r.stdout
    assert KEY[:6] not in r.stdout + r.stderr and "token ***" in r.stdout
    assert_no_key(r.stdout, r.stderr, out_dir=tmp_path)


def test_403_for_one_ticker_skips_it_once_the_key_was_taken(api, tmp_path):
    """EODHD answers 403 for tickers a key's plan does not cover (the demo key: all but a few): after the
    key has been taken, that ticker is skipped and the rest fetched; a 403 first of all stops the run."""
    for k, t in enumerate(("AAPL.US", "MSFT.US", "TSLA.US")):
        api.feeds[t] = [article(10 * k + i, [t]) for i in range(3)]
    api.always["MSFT.US"] = "403"
    r = fetch(api, tmp_path, "--tickers", "AAPL.US,MSFT.US,TSLA.US")
    assert r.returncode == 0, r.stderr
    assert (
        'skipped MSFT.US: HTTP 403 ({"error": "Forbidden"}): the API key was taken, but not for' in r.stdout
    )
    assert "tickers: 2 done, 0 already complete, 1 skipped" in r.stdout
    assert {a["symbols"][0] for a in read_news(tmp_path)} == {"AAPL.US", "TSLA.US"}
    assert [s for _, s, _, _, st, _ in api.log if st == 403] == ["MSFT.US"]  # not retried
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = fetch(api, tmp_path, "--tickers", "MSFT.US,AAPL.US", "--restart")
    assert_user_error(r, 'EODHD rejected the API key (HTTP 403: {"error": "Forbidden"})', "--api-key")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing fetched is lost


def test_tickers_file_saved_by_a_windows_editor(api, tmp_path):
    """A --tickers-file with a byte-order mark and CRLF line ends (Notepad's "UTF-8 with BOM", Excel's "CSV
    UTF-8"): its tickers are read, the mark is not part of the first one."""
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(3)]
    api.feeds["MSFT.US"] = [article(10 + i, ["MSFT.US"]) for i in range(3)]
    tickers = tmp_path / "tickers.txt"
    tickers.write_bytes("\ufeffAAPL.US\r\nMSFT # software\r\n".encode())
    r = fetch(api, tmp_path / "out", "--tickers-file", tickers)
    assert r.returncode == 0, r.stderr
    assert list(dict.fromkeys(s for _, s, _, _, _, _ in api.log)) == ["AAPL.US", "MSFT.US"]
    assert len(read_news(tmp_path / "out")) == 6


def test_demo_key_on_a_ticker_it_does_not_serve_says_which_it_serves(api, tmp_path):
    """The demo key is valid for two tickers only: a 403 on the first ticker asked names them instead of
    calling the key rejected; once the key was taken, other tickers are skipped as for any plan."""
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(3)]
    r = fetch(api, tmp_path, "--tickers", "MMM.US,AAPL.US", key="demo")
    assert_user_error(r, "the demo key serves AAPL.US and TSLA.US, not MMM.US", "--tickers")
    assert "rejected" not in r.stderr and not (tmp_path / "news.jsonl").exists()
    r = fetch(api, tmp_path, "--tickers", "AAPL.US,MMM.US", key="demo")
    assert r.returncode == 0, r.stderr
    assert "skipped MMM.US: HTTP 403" in r.stdout and len(read_news(tmp_path)) == 3


def test_quota_402_stops_cleanly_and_resumes(api, tmp_path):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(12)]
    api.feeds["TSLA.US"] = [article(100 + i, ["TSLA.US"]) for i in range(6)]
    api.quota = 3
    r = fetch(api, tmp_path, "--tickers", "AAPL.US,TSLA.US", "--limit", "4")
    assert r.returncode == 3
    assert "quota is spent (HTTP 402)" in r.stderr and "run the same command again" in r.stderr
    # the ticker the quota stopped and the one never reached are both counted
    assert "tickers: 0 done, 0 already complete, 0 skipped, 2 left for a rerun" in r.stdout
    assert "Traceback" not in r.stderr
    assert [a["link"] for a in read_news(tmp_path)] == [a["link"] for a in api.feeds["AAPL.US"]]
    progress = json.loads((tmp_path / "news_progress.json").read_text())
    assert progress["AAPL.US"] == {"from": None, "to": None, "offset": 12, "done": False}

    api.quota = None
    n_log = len(api.log)
    r2 = fetch(api, tmp_path, "--tickers", "AAPL.US,TSLA.US", "--limit", "4")
    assert r2.returncode == 0, r2.stderr
    resumed = [(s, off) for _, s, off, *_ in api.log[n_log:]]
    assert resumed[0] == ("AAPL.US", 12)  # picks up where the quota stopped it
    links = [a["link"] for a in read_news(tmp_path)]
    assert sorted(links) == sorted(all_links(api)) and len(links) == 18


def test_max_pages_then_continue(api, tmp_path):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(9)]
    r = fetch(api, tmp_path, "--tickers", "AAPL.US", "--limit", "2", "--max-pages", "2")
    assert r.returncode == 0 and "1 unfinished (--max-pages)" in r.stdout
    assert len(read_news(tmp_path)) == 4
    r = fetch(api, tmp_path, "--tickers", "AAPL.US", "--limit", "2")
    assert r.returncode == 0 and len(read_news(tmp_path)) == 9
    assert [off for _, _, off, *_ in api.log] == [0, 2, 4, 6, 8, 9]


def test_max_pages_with_restart_names_the_command_that_continues(api, tmp_path):
    """--restart pages every ticker from offset 0: run again, it fetched the same first --max-pages pages
    each time; the command the summary names (the same, less --restart) goes on from where it stopped."""
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(9)]
    flags = ["--tickers", "AAPL.US", "--limit", "2", "--max-pages", "2"]
    r = fetch(api, tmp_path, *flags, "--restart")
    assert r.returncode == 0 and len(read_news(tmp_path)) == 4, r.stderr
    assert "1 tickers stopped at --max-pages; run the same command again without --restart to" in r.stdout
    r = fetch(api, tmp_path, *flags)
    assert r.returncode == 0 and len(read_news(tmp_path)) == 8, r.stderr
    assert [off for _, _, off, *_ in api.log] == [0, 2, 4, 6]


def test_a_restart_run_stopped_by_the_quota_goes_on_without_restart(api, tmp_path):
    """A --restart run that the quota stops: run the same way again, it paged every ticker from offset 0, met
    the quota at the same place each day and never finished. The run records every ticker at offset 0 when
    it starts, and the line says to go on without --restart: the ticker it stopped in continues at its
    offset, and the one never reached, complete from an earlier run, is paged again as --restart asked."""
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(8)]
    api.feeds["TSLA.US"] = [article(100 + i, ["TSLA.US"]) for i in range(4)]
    flags = ["--tickers", "AAPL.US,TSLA.US", "--limit", "4"]
    assert fetch(api, tmp_path, *flags).returncode == 0  # both complete
    api.quota, n_log = 1, len(api.log)
    r = fetch(api, tmp_path, *flags, "--restart")
    assert r.returncode == 3, r.stderr
    assert "run the same command again without --restart after the quota resets" in r.stderr
    progress = json.loads((tmp_path / "news_progress.json").read_text())
    assert progress["AAPL.US"]["offset"] == 4 and progress["TSLA.US"] == {
        "from": None,
        "to": None,
        "offset": 0,
        "done": False,
    }
    api.quota = None
    r = fetch(api, tmp_path, *flags)
    assert r.returncode == 0, r.stderr
    assert [(s, off) for _, s, off, *_ in api.log[n_log + 2 :]] == [
        ("AAPL.US", 4),
        ("AAPL.US", 8),
        ("TSLA.US", 0),
        ("TSLA.US", 4),
    ]
    assert len(read_news(tmp_path)) == 12


def test_sigkill_mid_run_then_rerun_stores_every_article_once(api, tmp_path):
    tickers = ["AAA.US", "BBB.US", "CCC.US"]
    shared = [article(700 + i, tickers) for i in range(6)]
    for j, t in enumerate(tickers):
        own = [article(1000 * (j + 1) + i, [t]) for i in range(30)]
        api.feeds[t] = own[:10] + shared + own[10:]
    api.page_caps = {t: [3, 2] for t in tickers}
    api.delay_s = 0.03
    cmd = eodhd_cmd(
        api.base_url, str(tmp_path), "--tickers", ",".join(tickers), "--limit", "3", "--backoff-base", "0.01"
    )
    news = tmp_path / "news.jsonl"
    kills = 0
    for threshold in (8, 40, 75):  # kill -9 at three different points of the run
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
        deadline = time.time() + 60
        while time.time() < deadline and p.poll() is None:
            if news.exists() and news.read_bytes().count(b"\n") >= threshold:
                break
            time.sleep(0.005)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        assert p.returncode == -signal.SIGKILL
    assert kills == 3
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    stored = read_news(tmp_path)
    links = [a["link"] for a in stored]
    assert len(links) == len(set(links)) == 96 and set(links) == all_links(api)
    for a in stored:
        if a["link"] in {s["link"] for s in shared}:
            assert a["tickers"] == tickers
    assert not (tmp_path / "news_merges.jsonl").exists()
    docs = (tmp_path / "finance_corpus.txt").read_text()[:-1].split("\n\n")
    assert len(docs) == 96


def test_second_concurrent_run_is_refused(api, tmp_path):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(40)]
    api.delay_s = 0.3
    cmd = eodhd_cmd(api.base_url, str(tmp_path), "--tickers", "AAPL.US", "--limit", "2")
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    try:
        deadline = time.time() + 30
        while not ((tmp_path / "news.jsonl").exists() and (tmp_path / "news.jsonl").stat().st_size):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.01)
        second = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)
        assert first.poll() is None  # the first run was still writing throughout
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert "another fetch_news.py run is writing to" in second.stderr


def test_recovers_torn_line_and_pending_merges(api, tmp_path):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(6)]
    api.feeds["MSFT.US"] = [article(3, ["AAPL.US"])] + [article(10 + i, ["MSFT.US"]) for i in range(3)]
    assert fetch(api, tmp_path, "--tickers", "AAPL.US").returncode == 0
    news = tmp_path / "news.jsonl"
    # the state a kill -9 can leave: half of the last article written, progress not yet advanced,
    # and a merge recorded for an article that is on disk
    raw = news.read_bytes()
    last_line_start = raw.rindex(b"\n", 0, len(raw) - 1) + 1
    news.write_bytes(raw[: last_line_start + 25])
    (tmp_path / "news_progress.json").unlink()
    (tmp_path / "news_merges.jsonl").write_text(
        json.dumps(
            {"link": "https://news.example.com/story/3", "tickers": ["MSFT.US"], "symbols": ["MSFT.US"]}
        )
        + "\n"
    )
    r = fetch(api, tmp_path, "--tickers", "AAPL.US")  # MSFT.US is not fetched: the merge comes from the file
    assert r.returncode == 0, r.stderr
    assert "dropped 1 incomplete line(s)" in r.stderr
    stored = read_news(tmp_path)
    links = [a["link"] for a in stored]
    assert len(links) == len(set(links)) == 6 and set(links) == {a["link"] for a in api.feeds["AAPL.US"]}
    by_link = {a["link"]: a for a in stored}
    assert by_link["https://news.example.com/story/3"]["tickers"] == ["AAPL.US", "MSFT.US"]
    assert not (tmp_path / "news_merges.jsonl").exists()


def test_a_damaged_line_inside_news_jsonl_is_refused_not_dropped(api, tmp_path):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(4)]
    assert fetch(api, tmp_path, "--tickers", "AAPL.US").returncode == 0
    news, corpus = tmp_path / "news.jsonl", tmp_path / "finance_corpus.txt"
    lines = news.read_bytes().split(b"\n")
    lines[1] = b"\xff" + lines[1]  # no longer UTF-8: damaged, where a kill can only tear the last line
    news.write_bytes(b"\n".join(lines))
    kept = news.read_bytes(), corpus.read_bytes()
    api.log.clear()
    r = fetch(api, tmp_path, "--tickers", "AAPL.US", "--restart")
    assert_user_error(r, f"{news} line 2 is not an article (JSON object); nothing was changed")
    assert (news.read_bytes(), corpus.read_bytes()) == kept and api.log == []


def test_sp500_list_downloaded_cached_and_mapped(api, tmp_path):
    csv_text = (
        "Symbol,Security,GICS Sector\nAAPL,Apple Inc.,IT\nBRK.B,Berkshire Hathaway,Financials\n"
        "BF.B,Brown-Forman,Staples\nFOO BAR,A row that is no symbol,None\n"
    )
    api.files["/constituents.csv"] = ("text/csv", csv_text.encode())
    for n, t in enumerate(("AAPL.US", "BRK-B.US", "BF-B.US")):
        api.feeds[t] = [article(n, [t])]
    r = fetch(api, tmp_path, "--sp500", "--sp500-url", api.root + "/constituents.csv")
    assert r.returncode == 0, r.stderr
    assert sorted({s for _, s, *_ in api.log}) == ["AAPL.US", "BF-B.US", "BRK-B.US"]
    assert (tmp_path / "sp500_constituents.csv").read_text() == csv_text
    assert "skipped 1 row(s) that are not ticker symbols: ['FOO BAR']" in r.stderr
    # offline with a cache: use it, say so
    dead = "http://127.0.0.1:9/constituents.csv"
    r = fetch(api, tmp_path, "--sp500", "--sp500-url", dead, "--restart")
    assert r.returncode == 0 and "using the cached" in r.stderr
    # offline without a cache: one clear line, exit 2
    r = fetch(api, tmp_path / "fresh", "--sp500", "--sp500-url", dead)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no cached copy" in r.stderr


# -----------------------------------------------------------------------------
# news -> corpus


def test_news_corpus_cleaning_order_and_determinism(tmp_path):
    recs = [
        {
            "date": "2024-03-02T09:00:00-05:00",
            "link": "https://b.example/2",
            "title": "<b>Later</b> &amp; UTC 14:00",
            "content": "<div><p>Shares   rose\t3%.</p><script>var x = 1;</script>\n\n<p>Story continues</p>"
            "<p>Analysts&nbsp;were upbeat.</p><p>Click here to subscribe</p><p>Advertisement</p>"
            "<p>Subscribers grew 10%; related party deals did not.</p></div>",
        },
        {
            "date": "2024-03-02T13:00:00+00:00",
            "link": "https://a.example/1",
            "title": "Earlier at 13:00 UTC",
            "content": "Plain text body of a story.\r\nRead more: https://a.example/more\n"
            "\u00a9 2024 Example Media. All rights reserved.",
        },
        {
            "date": "2024-03-02T13:00:00+00:00",
            "link": "https://a.example/0",
            "title": "Same time, smaller link",
            "content": "Tie broken by link. Caf\u00e9 prices.",
        },
        {
            "date": "2024-03-03T00:00:00+00:00",
            "link": "https://c.example/3",
            "title": "Empty",
            "content": "<p> </p>",
        },
        {
            "date": "2024-03-04T00:00:00+00:00",
            "link": "https://c.example/4",
            "title": "Repeat",
            "content": "<p>Plain text body of a story.</p>",
        },
        {"date": "2024-03-01T00:00:00+00:00", "link": "https://c.example/5", "title": None, "content": None},
    ]
    (tmp_path / "news.jsonl").write_bytes(fetch_news.jsonl_bytes(recs))
    path, n_docs, n_bytes = fetch_news.write_news_corpus(str(tmp_path))
    first = Path(path).read_bytes()
    assert n_docs == 3 and n_bytes == len(first)
    assert first.decode("utf-8") == (
        "Same time, smaller link\nTie broken by link. Caf\u00e9 prices.\n\n"
        "Earlier at 13:00 UTC\nPlain text body of a story.\n\n"
        "Later & UTC 14:00\nShares rose 3%.\nAnalysts were upbeat.\nSubscribers grew 10%; related party "
        "deals did not.\n"
    )
    assert fetch_news.write_news_corpus(str(tmp_path))[2] == len(first)
    assert Path(path).read_bytes() == first
    # the same articles stored in another order give the same bytes
    (tmp_path / "news.jsonl").write_bytes(fetch_news.jsonl_bytes(recs[::-1]))
    fetch_news.write_news_corpus(str(tmp_path))
    assert Path(path).read_bytes() == first


def test_fetched_corpus_identical_across_runs(api, tmp_path):
    standard_feeds(api)
    api.script, api.always = {}, {}
    tickers = "AAPL.US,MSFT.US,RATE.US,FLAKY.US"
    assert fetch(api, tmp_path / "a", "--tickers", tickers, "--limit", "10").returncode == 0
    assert (
        fetch(
            api, tmp_path / "b", "--tickers", ",".join(reversed(tickers.split(","))), "--limit", "4"
        ).returncode
        == 0
    )
    a = (tmp_path / "a" / "finance_corpus.txt").read_bytes()
    assert a == (tmp_path / "b" / "finance_corpus.txt").read_bytes() and len(a) > 1000


# -----------------------------------------------------------------------------
# the offline market corpus (market_corpus.py, also behind fetch_news.py --source market)


COMMITTED = REPO / "data" / "finance_corpus.txt"
SCRIPTS = {"fetch_news": ["fetch_news.py", "--source", "market"], "market_corpus": ["market_corpus.py"]}


def build_cmd(script: str, out) -> list[str]:
    name, *args = SCRIPTS[script]
    return [sys.executable, str(REPO / name), *args, "--out-dir", str(out)]


@pytest.fixture(scope="module")
def stories():
    """(date, desk, text) of every story, built in-process; the committed corpus is exactly these texts."""
    st = market_corpus.market_stories()
    assert "\n\n".join(t for _, _, t in st) + "\n" == COMMITTED.read_text(encoding="utf-8")
    return st


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_market_corpus_rebuilds_byte_for_byte(tmp_path, script):
    r = subprocess.run(
        build_cmd(script, tmp_path), capture_output=True, text=True, env=clean_env(), timeout=300
    )
    assert r.returncode == 0, r.stderr
    built = (tmp_path / "finance_corpus.txt").read_bytes()
    assert built == COMMITTED.read_bytes()  # market_corpus.py run directly writes the same bytes
    assert 3_000_000 <= len(built) <= 8_000_000
    n_docs = built.count(b"\n\n") + 1
    assert (
        r.stdout == f"wrote {tmp_path / 'finance_corpus.txt'}: {n_docs:,} documents, "
        f"{len(built):,} bytes, {len(built):,} characters\n"
    )


DATELINE = re.compile(r"^(NEW YORK|WASHINGTON|CHICAGO)(, [A-Z][a-z]+ (\d{1,2}, )?\d{4})? -- [A-Z]")


def test_market_corpus_format_every_desk_and_news_structure(stories):
    text = COMMITTED.read_text(encoding="utf-8")
    assert text.isascii() and text.endswith("\n") and "\n\n\n" not in text
    docs = [t for _, _, t in stories]
    assert len(docs) > 10_000 and len(set(docs)) == len(docs)
    dates = [d for d, _, _ in stories]
    assert dates == sorted(dates)  # chronological: the held-out tail is the latest news
    counts = {desk: 0 for desk in market_corpus.DESKS}
    for d, desk, doc in stories:
        counts[desk] += 1
        head, lede, *body = doc.split("\n")
        assert not head[0].islower() and not head.endswith("."), doc
        assert DATELINE.match(lede), doc
        if desk in ("equities", "commodities", "volatility", "weekly"):  # daily news carries the full date
            assert f", {market_corpus.short_date(d)} -- " in lede, doc
        assert lede.endswith((".", '."')) and all(p.endswith(".") for p in body), doc
    assert counts["equities"] == 5030 and counts["weekly"] > 1000 and counts["monthly"] > 200
    assert (
        counts["credit"] == 1200 and counts["cpi"] > 700 and counts["factors"] > 1000 and counts["gdp"] > 200
    )
    assert min(counts.values()) >= 70, counts  # every desk writes
    eq = [t for _, desk, t in stories if desk == "equities"]
    assert sum(len(t.split("\n")) >= 3 for t in eq) > 0.95 * len(eq)  # headline, lede, body paragraphs
    # the same fact comes in many shapes: headline forms and lede openings
    assert len({" ".join(t.split("\n")[0].split()[:2]) for t in eq}) >= 60
    assert len({" ".join(t.split("\n")[1].split(" -- ")[1].split()[:3]) for t in eq}) >= 100
    title_case = [
        h
        for h in (t.split("\n")[0].split() for t in eq)
        if not any(w[0].islower() for w in h[1:] if w not in market_corpus.SMALL_WORDS)
    ]
    assert 1000 < len(title_case) < 3000  # two house styles for headlines


LEVEL = re.compile(
    r"(?<![\d.,$])\d{1,3}(?:,\d{3})*\.\d\d(?![\d%]| percentage| points| basis| billion| million)"
)


def sentences(doc: str) -> list[str]:
    return [s for line in doc.split("\n")[1:] for s in re.split(r"(?<=\.) (?=[A-Z])", line)]


def test_market_corpus_numbers_come_from_the_data(stories):
    # recompute with pandas through arch's own loaders, independently of market_corpus' parsing
    from arch.data import core_cpi, default, nasdaq, sp500, vix, wti

    sp, nq, vx, oil = sp500.load(), nasdaq.load(), vix.load()["vix"], wti.load()["DCOILWTICO"]
    by_day = {d: t for d, desk, t in stories if desk == "equities"}
    checked = 0
    for day in ("2008-10-15", "2008-10-13", "2001-09-17", "2016-01-04", "2018-12-24", "2018-12-26"):
        i = sp.index.get_loc(day)
        doc = by_day[sp.index[i].date()]
        c, pc = sp["Close"].iloc[i], sp["Close"].iloc[i - 1]
        assert f"{c:,.2f}" in doc and f"{abs(c / pc - 1) * 100:.2f}%" in doc, doc
        ma50, ma200 = sp["Close"].iloc[i - 49 : i + 1].mean(), sp["Close"].iloc[i - 199 : i + 1].mean()
        hi52 = sp["Close"].iloc[i - 251 : i + 1].max()
        for s in sentences(doc):
            if re.search(
                r"(million|billion) shares", s
            ):  # volume, against its average over the 50 sessions before
                v, av = sp["Volume"].iloc[i], sp["Volume"].iloc[i - 50 : i].mean()
                assert all(f"{x / 1e9:.2f} billion" in s or f"{x / 1e6:.0f} million" in s for x in (v, av)), s
            if not LEVEL.findall(s):
                continue
            if re.search(r"\b50-(day|session)", s):
                assert f"{ma50:,.2f}" in s, s
                checked += 1
            if re.search(r"\b200-(day|session)", s):
                assert f"{ma200:,.2f}" in s, s
            if "Nasdaq" in s and "52-week" not in s:
                assert f"{nq['Close'].iloc[i]:,.2f}" in s, s
                checked += 1
            if "VIX" in s:
                assert f"{vx.loc[day]:.2f}" in s, s
            if "$" in s:
                assert f"${oil.loc[day]:.2f}" in s, s
            if "52-week" in s and "Nasdaq" not in s:
                assert f"{hi52:,.2f}" in s, s
                checked += 1
            if re.search(r"\bopen(ed)? at", s):
                assert f"{sp['Open'].iloc[i]:,.2f}" in s, s
                checked += 1
    assert checked >= 6  # the sentences above did occur
    # the 2008 annual review: price return and the year's extreme closes; core CPI December to December
    annual = [t for d, desk, t in stories if desk == "annual" and d.year == 2008][0]
    y = sp.loc["2008", "Close"]
    ret = (y.iloc[-1] / sp.loc["2007", "Close"].iloc[-1] - 1) * 100
    assert f"{abs(ret):.2f}%" in annual and f"{y.max():,.2f}" in annual and f"{y.min():,.2f}" in annual
    cpi = core_cpi.load()["CPILFESL"]
    yoy = (cpi.loc["2008-12-01"] / cpi.loc["2007-12-01"] - 1) * 100
    assert f"Core CPI rose {yoy:.2f}% from December to December" in annual
    # the monthly core CPI story: month-on-month and year-on-year rates
    dec = [t for d, desk, t in stories if desk == "cpi" and (d.year, d.month) == (2008, 12)][0]
    mom = (cpi.loc["2008-12-01"] / cpi.loc["2008-11-01"] - 1) * 100
    assert f"{yoy:.2f}%" in dec and (f"{abs(mom):.2f}%" in dec or "unchanged" in dec), dec
    # credit spreads in basis points from Moody's Aaa/Baa
    cr = default.load()
    jan19 = [t for d, desk, t in stories if desk == "credit" and (d.year, d.month) == (1919, 1)][0]
    assert f"{round((cr['BAA'].iloc[0] - cr['AAA'].iloc[0]) * 100):.0f} basis points" in jan19
    assert f"{cr['AAA'].iloc[0]:.2f}%" in jan19 and f"{cr['BAA'].iloc[0]:.2f}%" in jan19
    # an oil story: the day's WTI price and its move
    d, _, doc = next(s for s in stories if s[1] == "commodities" and s[0] == dt.date(2008, 7, 3))
    k = oil.index.get_loc("2008-07-03")
    assert f"${oil.iloc[k]:.2f}" in doc and f"{abs(oil.iloc[k] / oil.iloc[k - 1] - 1) * 100:.2f}%" in doc, doc


def test_market_corpus_words_agree_with_their_numbers(stories):
    """Direction words and numbers tell the same story: nothing "lagged by 0.00 percentage points", a rate
    below zero keeps its sign, "too" follows a move the same way, a tally's words match its counts."""
    mc, data = market_corpus, market_corpus.load_market_data()
    text = "\n".join(t for _, _, t in stories)
    adverbs = {a.strip() for tier in mc.ADVERBS for a in tier if a.strip().endswith("ly")}
    assert not [a for a in adverbs if a[:-1] + "ies" in text.lower()]  # "rally sharply" -> "rallies sharply"
    for phrase in (
        "by 0.00 percentage points",
        "up 0.00% from the previous",
        "grew -",
        "grew +",
    ):
        assert phrase not in text, phrase
    assert not re.search(
        r"(?i)(index|CPI|inflation|cost of living) were unchanged", text
    )  # singular subjects
    assert not re.search(r"(?i)(holds?|held) steady \d", text)  # a flat headline verb takes no percentage
    assert not re.search(r"biggest move up, -", text)
    # the tallies ("Gains outnumbered losses on 3 of 5 days") are checked against the data in
    # test_wrap_tallies_leave_unchanged_sessions_out_of_the_losses
    # the Nasdaq moved "too" only when the S&P 500 moved the same way, by more than a flat day's move
    sp, nq = data["sp"].cols["close"], data["nq"].cols["close"]
    at = {d: i for i, d in enumerate(data["sp"].dates)}
    too = 0
    for d, desk, t in stories:
        m = re.search(r"Technology-heavy shares moved (higher|lower) too", t)
        if desk == "equities" and m:
            i, too = at[d], too + 1
            r, nr = mc.pct(sp[i], sp[i - 1]), mc.pct(nq[i], nq[i - 1])
            assert min(abs(r), abs(nr)) >= mc.EQUITY.flat and (r > 0) == (nr > 0) == (m[1] == "higher"), t
    assert too > 100
    # credit headlines give a direction only to what moved; core inflation "slowed" only when it printed lower
    keys = sorted(data["credit"])
    by_month = {(d.year, d.month): t for d, desk, t in stories if desk == "credit"}
    for k in range(1, len(keys)):
        (aaa, baa), (paaa, pbaa) = data["credit"][keys[k]], data["credit"][keys[k - 1]]
        head = by_month[keys[k]].split("\n")[0].lower()
        if re.search(r"spreads? (widened|narrowed)", head):
            assert round(abs((baa - aaa) - (pbaa - paaa)) * 100) >= 1, head
        if re.search(r"yields (rose|fell)", head):
            assert round(abs(aaa - paaa) * 100) >= 1, head
    cpi, ckeys = data["cpi"], sorted(data["cpi"])
    cpi_text = {(d.year, d.month): t for d, desk, t in stories if desk == "cpi"}
    for k in range(13, len(ckeys)):
        yoy = mc.f2(mc.pct(cpi[ckeys[k]], cpi[ckeys[k - 12]]))
        pyoy = mc.f2(mc.pct(cpi[ckeys[k - 1]], cpi[ckeys[k - 13]]))
        said = re.findall(r"annual rate (accelerated|slowed) from", cpi_text.get(ckeys[k], ""))
        assert not said or (said[0] == "accelerated") == (float(yoy) > float(pyoy)) and yoy != pyoy, ckeys[k]
    # a negative bill rate keeps its sign (February 1933: -0.03%)
    feb33 = [t for d, desk, t in stories if desk == "factors" and (d.year, d.month) == (1933, 2)][0]
    assert f"{data['ff'][(1933, 2)][3]:.2f}%" in feb33 and data["ff"][(1933, 2)][3] < 0, feb33


WRAP_PERIOD = {  # which sessions a wrap dated d covers
    "weekly": lambda a, d: a.isocalendar()[:2] == d.isocalendar()[:2],
    "monthly": lambda a, d: (a.year, a.month) == (d.year, d.month),
    "quarterly": lambda a, d: (a.year, (a.month - 1) // 3) == (d.year, (d.month - 1) // 3),
    "annual": lambda a, d: a.year == d.year,
}


def test_wrap_tallies_leave_unchanged_sessions_out_of_the_losses(stories):
    """A session that closed exactly where the last one did (2003-01-10, 2008-01-03, 2017-01-10) is
    neither a gain nor a loss: the week to January 13, 2017 had two of each, not three losses."""
    sp = market_corpus.load_ohlcv("sp500")
    c, dates = sp.cols["close"], sp.dates
    tallies = 0
    for d, desk, t in stories:
        if desk not in WRAP_PERIOD or not re.search(r"outnumbered|split evenly", t):
            continue
        idx = [i for i in range(1, len(dates)) if WRAP_PERIOD[desk](dates[i], d)]
        ups = sum(c[i] > c[i - 1] for i in idx)
        downs = sum(c[i] < c[i - 1] for i in idx)
        for form, counts, holds in (
            (r"Up days outnumbered down days (\d+) to (\d+)", (ups, downs), ups > downs),
            (r"Down days outnumbered up days (\d+) to (\d+)", (downs, ups), downs > ups),
            (r"Gains outnumbered losses on (\d+) of", (ups,), ups > downs),
            (r"Losses outnumbered gains on (\d+) of", (downs,), downs > ups),
            (r"split evenly, (\d+)", (ups,), ups == downs),
        ):
            said = re.search(form, t)
            if said:
                assert tuple(map(int, said.groups())) == counts and holds, (d, desk, said[0], ups, downs)
        tallies += 1
    assert tallies > 300
    week = next(t for d, desk, t in stories if desk == "weekly" and d == dt.date(2017, 1, 13))
    assert "Gains and losses split evenly, 2 days each." in week, week


def test_oil_at_a_52_week_extreme_is_said_to_be_there(stories):
    """On May 4, 2018 WTI closed at its 52-week high of $69.71: the story said it 'sits 0.00% below' it."""
    from arch.data import wti

    oil = wti.load()["DCOILWTICO"].dropna()
    at_high = oil == oil.rolling(252).max()
    at_low = oil == oil.rolling(252).min()
    assert "0.00% below its 52-week" not in "\n".join(t for _, desk, t in stories if desk == "commodities")
    said = 0
    for d, desk, t in stories:
        if desk != "commodities":
            continue
        day = oil.index.get_loc(str(d))
        if "The price is at its 52-week" in t:
            assert at_high.iloc[day], (d, t)
            said += 1
        if "the price is at the 52-week" in t:
            assert at_low.iloc[day], (d, t)
            said += 1
        if "The price sits" in t:
            assert not (at_high.iloc[day] or at_low.iloc[day]), (d, t)
    assert said > 100


def test_vix_sentences_read_whole(stories):
    """'At 33.46, the index signals high, signalling stress levels of anxiety' (February 8, 2018) and
    'the market's volatility expectations is 4.28 percentage points higher' (June 29, 2017)."""
    text = "\n".join(t for _, desk, t in stories if desk in ("volatility", "weekly"))
    assert "signals high levels of anxiety" in text and "signalling stress levels" not in text
    assert "expectations is" not in text
    assert "the market's expectation of volatility is" in text


def test_a_session_is_described_by_its_prices_only(stories):
    """'U.S. Stocks Plunge in Heavy Trade' on November 5, 2008 sat above 'Trading activity was about
    normal: 5.43 billion shares, 16.28% below the average': 'heavy trade' means volume, and a 'broad'
    rally means most stocks rose, which the index alone cannot show. The volume sentence alone judges
    volume."""
    eq = "\n".join(t for _, desk, t in stories if desk == "equities")
    sessions = r"(trade|session|trading|day|Monday|Tuesday|Wednesday|Thursday|Friday)\b"
    assert not re.search(r"(?i)\b(heavy|broad) " + sessions, eq)
    assert re.search(r"(?i)\brough " + sessions, eq) and re.search(r"(?i)\bbuoyant " + sessions, eq)


def test_a_monthly_decline_is_named_by_its_size(stories):
    """'Stocks slip in October; S&P 500 -16.94% for the month' (2008): a slip is under 1%, as in verb()."""
    sp = market_corpus.load_ohlcv("sp500")
    c, dates = sp.cols["close"], sp.dates
    named = 0
    for d, desk, t in stories:
        said = re.match(r"(?i)Stocks (slip|fall|slide|tumble) in [A-Z][a-z]+; S&P 500 ", t)
        if desk != "monthly" or not said:
            continue
        idx = [i for i, x in enumerate(dates) if (x.year, x.month) == (d.year, d.month)]
        a = abs(c[idx[-1]] / c[idx[0] - 1] - 1) * 100
        word = "slip" if a < 1 else "fall" if a < 4 else "slide" if a < 8 else "tumble"
        assert said[1].lower() == word, t
        named += 1
    assert named >= 20


def test_no_direction_for_a_move_that_prints_as_zero(stories):
    """'Shoppers' spending rose 0.00%' (1981 Q2: real consumption 3,822.8 both quarters), 'the market
    portfolio gained 0.00%' (June 1959), 'U.S. stocks
    posted a loss for the year: ... down 0.00%' (2011), 'ended higher over the week, with the S&P 500 up
    0.00%' (June 3, 2016), and 'Oil Sinks to Lowest in a Year at $24.65' on July 19, 2001, when WTI
    stood where it had closed the day before, at the low it had sunk to on July 18."""
    text = "\n".join(t for _, _, t in stories)
    moved = r"\b(rose|fell|up|down|grew|shrank|gained|lost|higher|lower|advanced|declined) 0\.00%"
    assert not re.findall(".{0,60}" + moved, text)
    from arch.data import wti

    oil = wti.load()["DCOILWTICO"].dropna()
    ret = oil.pct_change() * 100
    verbs = 0
    extreme = r"(hits|sinks to) (highest|lowest) in a year|to 52-week"
    for d, desk, t in stories:
        head = t.split("\n")[0].lower()
        if desk == "commodities" and re.search(extreme, head):
            assert abs(ret.loc[str(d)]) >= market_corpus.OIL.flat, (d, head)  # a real move took it there
            verbs += 1
    assert verbs > 100
    july19 = next(t for d, desk, t in stories if desk == "commodities" and d == dt.date(2001, 7, 19))
    assert july19.lower().startswith("wti crude holds at 52-week low of $24.65"), july19


def test_figures_read_aloud_take_the_right_article(stories):
    """'grew at a 8.37% annualized rate' (1965 Q3) and 'putting Brent at a $8.07 premium'."""
    words = ("8.37%", "$8.07", "11.20%", "18.00%", "1.80%", "80.1%", "elevated", "moderate")
    assert [market_corpus.a_an(w) for w in words] == ["an", "an", "an", "an", "a", "an", "an", "a"]
    text = "\n".join(t for _, _, t in stories)
    assert not re.search(r"\b[Aa] \$?(8|11\.|18\.)", text) and re.search(r"\ban \$?8", text)


WEEKDAY = "(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"


def previous_sessions_named(stories, dates) -> dict:
    """Checks that every equities story names only its own weekday, and the previous trading day for
    the previous session; returns {date: [how the previous session was named]}."""
    index = {d: i for i, d in enumerate(dates)}
    named, n_daily = {}, 0
    for d, desk, doc in stories:
        if desk != "equities":
            continue
        n_daily += 1
        prev = dates[index[d] - 1]
        names = []
        for long in re.findall(r"the close of (" + WEEKDAY[1:-1] + r", [A-Z][a-z]+ \d{1,2}, \d{4})", doc):
            assert long == market_corpus.long_date(prev), (d, long)
            names.append(long)
        rest = re.sub(r"the close of " + WEEKDAY + r", [A-Z][a-z]+ \d{1,2}, \d{4}", "", doc)
        for wd in re.findall(WEEKDAY + "'s close", rest):
            assert wd == market_corpus.WEEKDAYS[prev.weekday()], (d, prev, wd)
            names.append(wd)
        rest = re.sub(WEEKDAY + "'s close", "", rest)
        assert set(re.findall(WEEKDAY, rest)) <= {market_corpus.WEEKDAYS[d.weekday()]}, (d, doc)
        if names:
            named[d] = names
    assert n_daily == len(dates) - 1  # every session but the first has its story
    return named


def test_committed_daily_stories_name_only_the_right_days(stories):
    sp = market_corpus.load_ohlcv("sp500")
    named = previous_sessions_named(stories, sp.dates)
    assert len(named) >= 500
    after_break = [d for d in named if (d - sp.dates[sp.dates.index(d) - 1]).days > 3]
    assert len(after_break) >= 20  # long weekends are named right too (checked inside)


def test_market_reports_name_the_previous_trading_day_after_holidays():
    data = market_corpus.load_market_data()
    sp = data["sp"]
    dates = sp.dates
    good_friday_mondays = [
        d
        for i, d in enumerate(dates)
        if d.weekday() == 0 and (d - dates[i - 1]).days == 4 and d.month in (3, 4)
    ]
    assert dt.date(2000, 4, 24) in good_friday_mondays and len(good_friday_mondays) >= 15
    i = dates.index(dt.date(2000, 4, 24))
    assert dates[i - 1] == dt.date(2000, 4, 20)  # Good Friday 2000-04-21: no trading
    assert market_corpus.prior_close(dates[i], dates[i - 1]) == "Thursday's close"
    i = dates.index(dt.date(2001, 9, 17))  # closed for a week after September 11
    assert market_corpus.prior_close(dates[i], dates[i - 1]) == "the close of Monday, September 10, 2001"
    # open every session after a break 1% above the previous close: the sentence comparing the open
    # with the previous close then appears wherever the seeded phrasing picks it
    for i in range(1, len(dates)):
        if (dates[i] - dates[i - 1]).days > 1:
            sp.cols["open"][i] = sp.cols["close"][i - 1] * 1.01
    named = previous_sessions_named(market_corpus.market_stories(data), dates)
    after_good_friday = {d: n for d, n in named.items() if d in good_friday_mondays}
    assert len(after_good_friday) >= 5
    assert all(set(n) == {"Thursday"} for n in after_good_friday.values()), after_good_friday
    tuesdays_after_monday_holiday = [
        d for d in named if d.weekday() == 1 and (d - dates[dates.index(d) - 1]).days == 4
    ]
    assert len(tuesdays_after_monday_holiday) >= 20
    assert all(set(named[d]) == {"Friday"} for d in tuesdays_after_monday_holiday)


def run_stats(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "market_corpus.py"), "--stats", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )


def test_stats_match_hand_computed_values(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("aa bb aa\nbb 12\n\nbb 12 aa\n")
    r = run_stats(str(f), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["files"][0]
    assert (s["path"], s["documents"], s["words"], s["bytes"]) == (str(f), 2, 8, 25)
    # words: [aa bb aa bb 12] [bb 12 aa]; 1-grams aa, bb, 12: 3 distinct of 8
    g = s["ngrams"]
    assert (g["1"]["distinct"], g["1"]["total"], g["1"]["ratio"]) == (3, 8, 0.375)
    # 2-grams: (aa bb) (bb aa) (aa bb) (bb 12) | (bb 12) (12 aa): 4 distinct of 6
    assert (g["2"]["distinct"], g["2"]["total"], g["2"]["ratio"]) == (4, 6, 0.6667)
    assert (g["3"]["distinct"], g["3"]["total"]) == (4, 4) and (g["4"]["distinct"], g["4"]["total"]) == (2, 2)
    assert g["2"]["window_ratio"] == 0.6667  # one window: the file is shorter than a window
    # numbers masked: [aa bb aa bb <num>] [bb <num> aa]: same n-gram counts, 12 is the only number
    assert g["1"]["window_ratio_numbers_masked"] == 0.375
    # byte-level BPE: pre-tokens aa, Ġbb, Ġaa, bb, Ġ12; the 256 bytes plus one merge per new token:
    # aa, bb, Ġbb, Ġaa, Ġ1, Ġ12 (12 stays one digit group) -> 262
    assert (s["bpe_vocab"], s["bpe_vocab_asked"]) == (262, 8192)
    text = run_stats(str(f))
    assert text.returncode == 0 and "BPE vocab  262 reached of 8,192 asked" in text.stdout
    assert "  2-grams  0.6667 (4 of 6)  0.6667  0.6667" in text.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["{missing}"], "not found"),
        (["{empty}"], "is empty"),
        (["{dir}"], "is a folder"),
        (["{empty}", "--vocab-size", "12"], "must be between 257"),
        (["{empty}", "--vocab-size", "100000000000"], "and 2**20, got 100000000000"),
    ],
)
def test_stats_bad_input_one_line_exit_2(tmp_path, args, fragment):
    (tmp_path / "empty.txt").write_text("\n\n")
    paths = dict(missing=tmp_path / "nope.txt", empty=tmp_path / "empty.txt", dir=tmp_path)
    r = run_stats(*[a.format(**paths) for a in args])
    assert_user_error(r, fragment)


def test_market_corpus_flags_that_do_not_combine(tmp_path):
    for args, says in (
        (["--json"], "--json only applies with --stats"),
        (["--vocab-size", "4096", "--out-dir", str(tmp_path)], "--vocab-size only applies with --stats"),
        (["--stats", str(COMMITTED), "--out-dir", str(tmp_path)], "--out-dir does not apply with --stats"),
    ):
        r = subprocess.run(
            [sys.executable, str(REPO / "market_corpus.py"), *args],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
        assert_user_error(r, says)
    assert not any(tmp_path.iterdir())


def test_new_corpus_variety_beats_a_floor():
    s = market_corpus.corpus_stats(COMMITTED.read_text(encoding="utf-8"))
    # the report-template corpus this replaced reached 3,276 BPE tokens of 8,192 asked, and 0.042 / 0.070
    # distinct 3- / 4-grams per 100k words with numbers masked
    assert s["bpe_vocab"] > 4_500
    assert s["ngrams"]["3"]["window_ratio_numbers_masked"] > 0.08
    assert s["ngrams"]["4"]["window_ratio_numbers_masked"] > 0.13


# -----------------------------------------------------------------------------
# Retry-After, output locations, write failures, Ctrl-C


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_capped_by_backoff_max(api, tmp_path, form):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(6)]
    api.script["AAPL.US"] = ["429"]
    day = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    api.retry_after = "86400" if form == "seconds" else email.utils.format_datetime(day, usegmt=True)
    t0 = time.monotonic()
    r = fetch(api, tmp_path, "--tickers", "AAPL.US", "--backoff-max", "0.5", timeout=30)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 20
    assert re.search(
        r"AAPL\.US offset 0: rate limited \(HTTP 429\): server asked Retry-After 86[34]\d\d s; "
        r"waiting 0\.5 s \(--backoff-max\)",
        r.stderr,
    ), r.stderr
    times = [t for t, s, _, _, st, _ in api.log if s == "AAPL.US"]
    assert [st for _, s, _, _, st, _ in api.log if s == "AAPL.US"][:2] == [429, 200]
    assert 0.45 <= times[1] - times[0] < 5
    assert [a["link"] for a in read_news(tmp_path)] == [a["link"] for a in api.feeds["AAPL.US"]]


@contextlib.contextmanager
def output_problem(kind: str, tmp_path: Path, unwritable: Path):
    """(--out-dir, expected message) for an output folder that cannot be used."""
    if kind == "file":
        (tmp_path / "afile").write_text("x")
        yield tmp_path / "afile", f"--out-dir {tmp_path / 'afile'} is a file, not a folder"
    elif kind == "under-file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "sub" / "out"
        yield out, f"--out-dir {out} lies under a file ({tmp_path / 'afile'})"
    elif kind == "dangling-link":  # a link to a folder that was moved or not mounted
        (tmp_path / "link").symlink_to(tmp_path / "gone")
        out = tmp_path / "link"
        yield out, f"--out-dir {out}: {out} is a link to {tmp_path / 'gone'}, which does not exist"
    elif kind == "corpus-is-folder":
        (tmp_path / "out" / "finance_corpus.txt").mkdir(parents=True)
        yield tmp_path / "out", f"{tmp_path / 'out' / 'finance_corpus.txt'} is a folder, not a file"
    else:
        yield unwritable / "out", f"--out-dir {unwritable / 'out'} is not writable ("


KINDS = ["file", "under-file", "dangling-link", "corpus-is-folder", "not-writable"]


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("kind", KINDS)
def test_market_refuses_unusable_out_dir_before_building(tmp_path, unwritable_dir, kind, script):
    with output_problem(kind, tmp_path, unwritable_dir) as (out, message):
        cmd = build_cmd(script, out)
        r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=120)
        assert_user_error(r, message)
        assert "building" not in r.stderr  # refused before the build starts
        assert not (out / "finance_corpus.txt").is_file()


@pytest.mark.parametrize("kind", KINDS)
def test_eodhd_refuses_unusable_out_dir_before_any_request(api, tmp_path, unwritable_dir, kind):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(3)]
    api.files["/constituents.csv"] = ("text/csv", b"Symbol\nAAPL\n")
    with output_problem(kind, tmp_path, unwritable_dir) as (out, message):
        cmd = eodhd_cmd(
            api.base_url,
            str(out),
            "--tickers",
            "AAPL.US",
            "--sp500",
            "--sp500-url",
            api.root + "/constituents.csv",
        )
        r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)
        assert_user_error(r, message)
        assert api.log == [] and api.n_req == {}  # not even the S&P 500 list was asked for
        assert not (out / "news.jsonl").exists()


def limit_file_size(n_bytes: int):
    # a disk that fills up: writes past n_bytes fail with EFBIG (Python ignores SIGXFSZ)
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_market_write_failure_is_one_line_and_leaves_nothing(tmp_path, script):
    out = tmp_path / "new" / "out"
    cmd = build_cmd(script, out)
    r = subprocess.run(
        cmd, capture_output=True, text=True, env=clean_env(), timeout=120, preexec_fn=limit_file_size(100_000)
    )
    assert_error_last(
        r,
        f"cannot write {out / 'finance_corpus.txt'} (File too large); nothing written, "
        f"{out / 'finance_corpus.txt'} left as it was",
    )
    assert not (tmp_path / "new").exists()  # the folders it made are gone again, temp file included


def test_eodhd_write_failure_says_what_was_kept_and_resumes(api, tmp_path):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(40)]
    r = fetch(api, tmp_path, "--tickers", "AAPL.US", "--limit", "4")
    full_size = (tmp_path / "news.jsonl").stat().st_size
    shutil.rmtree(tmp_path)
    cmd = eodhd_cmd(api.base_url, str(tmp_path), "--tickers", "AAPL.US", "--limit", "4")
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        preexec_fn=limit_file_size(full_size // 3),
    )
    stored = read_news(tmp_path)  # whole lines only: the part of a page that did land was cut off again
    assert 0 < len(stored) < 40 and (tmp_path / "news.jsonl").read_bytes().endswith(b"}\n")
    assert_error_last(
        r,
        f"cannot write {tmp_path / 'news.jsonl'} (File too large); {len(stored)} articles kept in "
        f"{tmp_path / 'news.jsonl'}; "
        f"fix that and run the same command again",
    )
    assert not list(tmp_path.glob("*.tmp*"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(a["link"] for a in read_news(tmp_path)) == sorted(a["link"] for a in api.feeds["AAPL.US"])


def test_eodhd_full_disk_at_the_corpus_names_it_and_keeps_every_file(api, tmp_path):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(12)]
    assert fetch(api, tmp_path, "--tickers", "AAPL.US", "--limit", "5").returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    corpus = tmp_path / "finance_corpus.txt"
    cmd = eodhd_cmd(api.base_url, str(tmp_path), "--tickers", "AAPL.US", "--limit", "5")
    limit = limit_file_size(len(before["finance_corpus.txt"]) // 2)  # the rerun only rewrites the corpus
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60, preexec_fn=limit)
    kept = f"12 articles kept in {tmp_path / 'news.jsonl'}"
    assert_error_last(r, f"cannot write {corpus} (File too large); {kept}")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file either


def test_eodhd_full_disk_at_the_first_page_leaves_no_new_folder(api, tmp_path):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(12)]
    out = tmp_path / "fresh" / "news"
    cmd = eodhd_cmd(api.base_url, str(out), "--tickers", "AAPL.US", "--limit", "5")
    r = subprocess.run(
        cmd, capture_output=True, text=True, env=clean_env(), timeout=60, preexec_fn=limit_file_size(200)
    )
    assert_error_last(r, f"cannot write {out / 'news.jsonl'} (File too large); no articles stored yet")
    assert not (tmp_path / "fresh").exists()  # not even a torn news.jsonl


def test_rejected_key_leaves_no_new_folder(api, tmp_path):
    out = tmp_path / "fresh" / "news"
    r = fetch(api, out, "--tickers", "AAPL.US", key="wrong-KEY-77aa")
    assert_user_error(r, "EODHD rejected the API key")
    assert not (tmp_path / "fresh").exists()


def default_sigint():
    """In the child: SIGINT at its default, as in a terminal (a shell's background jobs, CI's among them,
    ignore it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sigint_when(proc, ready, timeout=30, sig=signal.SIGINT):
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "never got going"
        time.sleep(0.01)
    proc.send_signal(sig)
    return proc.communicate(timeout=60)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_mid_fetch_keeps_articles_and_says_so(api, tmp_path, sig, code):
    api.feeds["AAPL.US"] = [article(i, ["AAPL.US"]) for i in range(60)]
    api.delay_s = 0.2
    news = tmp_path / "news.jsonl"
    cmd = eodhd_cmd(api.base_url, str(tmp_path), "--tickers", "AAPL.US", "--limit", "3")
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        preexec_fn=default_sigint,
    )
    _, err = sigint_when(p, lambda: news.exists() and news.read_bytes().count(b"\n") >= 6, sig=sig)
    assert p.returncode == code and "Traceback" not in err, err
    stored = read_news(tmp_path)  # every line is whole JSON
    assert 6 <= len(stored) < 60
    assert err.strip().splitlines()[-1] == (
        f"interrupted: {len(stored)} articles kept in {news}; run the same command again to resume"
    )
    api.delay_s = 0.0
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert [a["link"] for a in read_news(tmp_path)] == [a["link"] for a in api.feeds["AAPL.US"]]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_ctrl_c_or_sigterm_while_building_market_corpus_writes_nothing(tmp_path, script, sig, code):
    out = tmp_path / "new" / "data"
    cmd = build_cmd(script, out)
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        preexec_fn=default_sigint,
    )
    first = p.stderr.readline()  # blocks until the build has started
    assert first.startswith("building the market corpus")
    time.sleep(0.3)
    p.send_signal(sig)
    for _ in range(20):  # a signal that went unanswered for 3 s (once, under load) is sent again
        try:
            _, err = p.communicate(timeout=3)
            break
        except subprocess.TimeoutExpired:
            p.send_signal(sig)
    assert p.returncode == code and "Traceback" not in err, err
    corpus = out / "finance_corpus.txt"
    assert err.strip().splitlines()[-1] == (
        f"interrupted: nothing written, {corpus} left as it was; run the same command again to build it"
    )
    assert not (tmp_path / "new").exists()


def test_odd_shapes_in_answers_and_progress_do_not_crash(api, tmp_path):
    shared = article(900, ["AAPL.US", "MSFT.US"])
    odd = dict(shared, symbols=5)  # the second ticker's copy has a malformed symbols field
    api.feeds["AAPL.US"] = [article(1, ["AAPL.US"]), shared]
    api.feeds["MSFT.US"] = [odd, article(2, ["MSFT.US"])]
    (tmp_path / "news_progress.json").write_text("[]")  # valid JSON of the wrong shape
    r = fetch(api, tmp_path, "--tickers", "AAPL.US,MSFT.US")
    assert r.returncode == 0, r.stderr
    assert "ignoring unreadable" in r.stderr
    by_link = {a["link"]: a for a in read_news(tmp_path)}
    assert len(by_link) == 3
    assert by_link[shared["link"]]["tickers"] == ["AAPL.US", "MSFT.US"]
    assert by_link[shared["link"]]["symbols"] == ["AAPL.US", "MSFT.US"]


def test_utf8_pages_read_as_utf8_whatever_charset_the_header_implies(api, tmp_path):
    """text/html without a charset means ISO-8859-1 to requests; JSON is UTF-8 all the same."""
    title, body = "Société Générale’s 2% rise — 日本", "Zürich: ünïcödé 📈 text, in UTF-8."
    api.feeds["GLE.PA"] = [article(1, ["GLE.PA"], content=body) | {"title": title}]
    api.news_ctype = "text/html"
    r = fetch(api, tmp_path, "--tickers", "GLE.PA")
    assert r.returncode == 0, r.stderr
    assert [(a["title"], a["content"]) for a in read_news(tmp_path)] == [(title, body)]
    assert (tmp_path / "finance_corpus.txt").read_text(encoding="utf-8") == f"{title}\n{body}\n"


def test_articles_the_json_allows_but_python_trips_on(api, tmp_path):
    """Half an emoji (a lone surrogate: valid JSON), a date whose UTC time is past year 9999, and articles
    without a link: every one is stored as it came, once, and the corpus is written."""
    cut = article(1, ["AAPL.US"], content="Emoji cut \ud83d in half. Shares rose.")
    late = dict(article(2, ["AAPL.US"]), date="9999-12-31T23:00:00-05:00")
    bare = [
        dict(article(n, ["AAPL.US"], content=f"Story {n} had no link."), link=None, date=None, title=None)
        for n in (3, 4)
    ]
    api.feeds["AAPL.US"] = [cut, late, *bare, article(5, ["AAPL.US"])]
    api.feeds["MSFT.US"] = [article(6, ["MSFT.US"])]
    for _ in range(2):  # the rerun finds every ticker complete and stores nothing twice
        r = fetch(api, tmp_path, "--tickers", "AAPL.US,MSFT.US")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "tickers: " in r.stdout and "0 left for a rerun" in r.stdout
        stored = read_news(tmp_path)
        assert len(stored) == 6
        assert stored[0]["content"] == cut["content"] and stored[1]["date"] == late["date"]
        assert [a["link"] for a in stored[2:4]] == [None, None]  # kept as the API gave it
    corpus = (tmp_path / "finance_corpus.txt").read_text(encoding="utf-8")
    assert "Emoji cut in half. Shares rose." in corpus
    order = [corpus.index(f"Body of story {n}") for n in (5, 6, 2)]  # 2024, 2024, then the year 9999
    assert order == sorted(order) and corpus.index("Story 4 had no link.") > order[-1]  # no date: last
    assert corpus.count("\n\n") == 5  # six documents


def test_cleaning_keeps_text_that_only_looks_like_markup_or_furniture():
    clean = fetch_news.clean_text
    assert clean("Net margin < 5% while peers report > 12% growth.") == (
        "Net margin < 5% while peers report > 12% growth."
    )
    assert clean("Costs fell <$1.10 a share<br>Revenue <b>rose</b> 4%<!-- ad -->.") == (
        "Costs fell <$1.10 a share\nRevenue rose 4% ."
    )
    news = "Copyright Office rejects AI art\nSubscribe to Netflix? Prices rise\nSign up numbers fell"
    assert clean(news) == news
    furniture = (
        "Copyright 2024 Reuters\nCopyright \u00a9 Example Media\nSubscribe to our newsletter\n"
        "Sign up for free\nDownload the Yahoo Finance app\nSubscribe\nShares rose."
    )
    assert clean(furniture) == "Shares rose."
    assert clean("Read more: the Fed", furniture=False) == "Read more: the Fed"  # titles keep every line


def test_html_escaped_twice_leaves_no_tags_in_the_corpus(api, tmp_path):
    """Some feeds escape an article's HTML twice: its tags arrive as &lt;p&gt; and must go all the same."""
    twice = "&lt;p&gt;Shares rose 4%.&lt;/p&gt;&lt;p&gt;P/E &amp;lt; 10 &amp;amp; a&amp;lt;b.&lt;/p&gt;"
    plain = "S&amp;amp;P 500 futures rose 1% &amp;mdash; a third day."  # no tags, entities escaped twice
    api.feeds["AAPL.US"] = [article(1, ["AAPL.US"], content=twice), article(2, ["AAPL.US"], content=plain)]
    assert fetch(api, tmp_path, "--tickers", "AAPL.US").returncode == 0
    corpus = (tmp_path / "finance_corpus.txt").read_text(encoding="utf-8")
    assert corpus == (
        "Headline number 1\nShares rose 4%.\nP/E < 10 & a<b.\n\n"
        "Headline number 2\nS&P 500 futures rose 1% \u2014 a third day.\n"
    )
    clean = fetch_news.clean_text  # escaped once, text that only looks like a tag is text
    assert clean("P/E &lt; 10 and a&lt;b, or &lt;b and c&gt;") == "P/E < 10 and a<b, or <b and c>"
    assert clean("R&amp;D; AT&amp;T; Q&amp;A") == "R&D; AT&T; Q&A"


def test_bodies_under_the_minimum_of_words_are_left_out_and_counted(api, tmp_path):
    """A headline-only item ("." or "Full story") is no article: it is stored, but not put into the corpus."""
    bodies = [".", "<p>Full story.</p>", "Read more", "Shares rose on Monday.", "Shares rose 4% on Monday."]
    api.feeds["AAPL.US"] = [article(n, ["AAPL.US"], content=b) for n, b in enumerate(bodies)]
    r = fetch(api, tmp_path, "--tickers", "AAPL.US")
    assert r.returncode == 0, r.stderr
    assert len(read_news(tmp_path)) == 5
    corpus = (tmp_path / "finance_corpus.txt").read_text(encoding="utf-8")
    assert corpus == "Headline number 4\nShares rose 4% on Monday.\n"
    assert f"1 documents, {len(corpus)} bytes; 4 articles left out: body under 5 words" in r.stdout
    usage = subprocess.run([sys.executable, str(REPO / "fetch_news.py"), "--help"], capture_output=True)
    assert b"a body under 5 words" in b" ".join(usage.stdout.split())  # --help says so


@pytest.mark.parametrize("down", ["slow", "500"])
def test_a_server_that_stops_answering_stops_the_run_after_a_few_tickers_and_resumes(api, tmp_path, down):
    """Timeouts, or server errors, ticker after ticker (not a 404 or 403: those are answers) mean EODHD is
    down: a long run stops after MAX_SILENT_TICKERS of them in a row instead of skipping every ticker; a rerun
    goes on from there."""
    tickers = ["AAPL.US", "H1.US", "H2.US", "NOPE.US", "H3.US", "H4.US", "H5.US", "MSFT.US"]
    for n, t in enumerate(tickers):
        api.feeds[t] = [article(10 * n + i, [t]) for i in range(2)]
        api.always[t] = down if t.startswith("H") else None
    del api.feeds["NOPE.US"]  # an answer (404) between timeouts: the count starts again
    api.slow_s = 1.0
    quick = ["--tickers", ",".join(tickers), "--timeout", "0.3", "--max-retries", "1"]
    r = fetch(api, tmp_path, *quick)
    host = urllib.parse.urlsplit(api.base_url).netloc
    assert fetch_news.MAX_SILENT_TICKERS == 3
    last = "ReadTimeout" if down == "slow" else "server error (HTTP 500)"
    silent = f"EODHD at {host} is not answering (3 tickers in a row; last: {last}"
    assert_error_last(r, silent, f"2 articles kept in {tmp_path}", "the same command again once it answers")
    assert "H2.US: skipped" in r.stderr and "H4.US: skipped" in r.stderr  # not H1-H3: the 404 came between
    assert f"H5.US offset 0: {last}" in r.stderr and "H5.US: skipped" not in r.stderr  # the third: stop
    assert "MSFT.US" not in {s for _, s, *_ in api.log}
    assert (tmp_path / "finance_corpus.txt").read_text().count("Headline number") == 2  # the corpus has them
    assert_no_key(r.stdout, r.stderr, out_dir=tmp_path)

    api.always, n_log = {}, len(api.log)  # the server is back
    r = fetch(api, tmp_path, *quick)
    assert r.returncode == 0, r.stderr
    assert "AAPL.US" not in {s for _, s, *_ in api.log[n_log:]}  # finished before the stop: not asked again
    assert "tickers: 6 done, 1 already complete, 1 skipped" in r.stdout and len(read_news(tmp_path)) == 14
