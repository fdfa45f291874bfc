"""
Build the finance text corpus that every model in this project trains on.

Two sources, one output format (UTF-8, documents separated by exactly one blank line):

  python fetch_news.py --source market            # offline default -> data/finance_corpus.txt
  python fetch_news.py --source eodhd --api-key demo --tickers AAPL.US,TSLA.US

--source market writes market_corpus.py's offline corpus: news-style stories written from real historical
series shipped inside installed packages, byte-identical on every run and machine. --source eodhd pages
through the EODHD financial-news API for a list of tickers into news.jsonl (one article per line,
de-duplicated by link, resumable after kill -9), then writes finance_corpus.txt beside it. Both write it
with market_corpus.py's writer (whole files through a temp file, never half of one).
"""

import argparse
import contextlib
import csv
import datetime as dt
import email.utils
import hashlib
import html
import io
import json
import os
import random
import re
import sys
import time
import traceback
import urllib.parse
from types import SimpleNamespace

import requests
import urllib3
from tqdm import tqdm

import market_corpus
from market_corpus import CORPUS_NAME, RERUN, UserError, atomic_open, check_out_dir, write_corpus

try:
    import fcntl  # POSIX: guards news.jsonl against two concurrent writers
except ImportError:  # Windows: no lock, everything else works
    fcntl = None

# -----------------------------------------------------------------------------
# constants (the flags' defaults are in the FLAGS table at the end)

BASE_URL = "https://eodhd.com/api"
MAX_WAIT_S = 86400.0  # a day: the cap on --timeout and --backoff-*; far more overflows sleep() and sockets
CALLS_PER_NEWS_REQUEST = 5  # EODHD bills each /news request as 5 API calls
SP500_CACHE = "sp500_constituents.csv"
BAR = dict(desc="news", unit="ticker", file=sys.stderr, dynamic_ncols=True)
EXIT_BAD_INPUT = 2  # bad flags, files or API key: one line on stderr
EXIT_QUOTA = 3  # daily quota spent: everything fetched is kept, rerun resumes
MAX_SILENT_TICKERS = 3  # tickers in a row whose every try timed out, lost its connection or got a 5xx
DAMAGED = "nothing was changed: restore the file from a copy, or move it away to start afresh"


class FolderBusy(UserError): ...  # another run holds --out-dir: its files are not ours to tidy up


class QuotaExhausted(Exception): ...  # HTTP 402: the day's API quota is spent


class TickerFailed(Exception): ...  # retries spent, or a 4xx that retrying cannot help (404): skip it


# -----------------------------------------------------------------------------
# eodhd: the API key never leaves the process: it is in URLs, which exceptions quote (hence redact())


class Redactor:
    def __init__(self, secret: str):
        forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
        self.secrets = [s for s in forms if s and s != "demo"]  # EODHD's public key: no secret to keep

    def __call__(self, text) -> str:
        text = str(text)
        for s in self.secrets:
            text = text.replace(s, "***")
        return re.sub(r"(api_token=)[^&\s'\"]+", r"\1***", text)


class NewsClient:
    """GET <base-url>/news with retries. Returns one page (a list of article dicts) or raises: UserError
    (a rejected key, no connection), QuotaExhausted (402), TickerFailed (404, 403 for the ticker, gave up)."""

    def __init__(self, args, api_key: str, log):
        self.args, self.api_key, self.log, self.redact = args, api_key, log, Redactor(api_key)
        self.url = args.base_url.rstrip("/") + "/news"
        self.session = requests.Session()  # one connection pool: keep-alive across pages and tickers
        self.session.headers["User-Agent"] = "fetch_news.py (finance corpus builder)"
        self.requests_ok = self.unanswered = 0  # requests answered 200: CALLS_PER_NEWS_REQUEST API calls each
        self.jitter = random.Random()  # jitter de-synchronises clients; it does not need to be reproducible

    def backoff(self, attempt: int) -> float:
        # exponential backoff with jitter: base * 2^attempt, scaled by a random factor in [0.5, 1]
        return min(self.args.backoff_max, self.args.backoff_base * (2**attempt)) * self.jitter.uniform(0.5, 1)

    def rate_limited(self, resp, attempt: int) -> tuple:
        """(reason, wait) for a 429: Retry-After (seconds or an HTTP date), at most --backoff-max."""
        value, ra, cap = resp.headers.get("Retry-After", "").strip(), None, self.args.backoff_max
        with contextlib.suppress(ValueError):
            ra = max(0.0, float(value))
        if ra is None:
            with contextlib.suppress(TypeError, ValueError):
                when = email.utils.parsedate_to_datetime(value)
                ra = max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())
        if ra is None or ra <= cap:  # no usable Retry-After: the usual backoff
            return "rate limited (HTTP 429)", self.backoff(attempt) if ra is None else ra
        capped = f"server asked Retry-After {ra:.0f} s; waiting {cap:g} s (--backoff-max)"
        return f"rate limited (HTTP 429): {capped}", cap

    def refused(self, resp, ticker: str) -> Exception:
        """401/403: a rejected key stops the run; a 403 once the key was taken skips the ticker (plan)."""
        code, body = resp.status_code, self.redact(" ".join(resp.text.split()) or resp.reason)[:80]
        if code == 403 and self.requests_ok:
            return TickerFailed(f"HTTP 403 ({body}): the API key was taken, but not for this ticker")
        if self.api_key == "demo":  # EODHD's public key: valid, for two tickers only
            return UserError(f"the demo key serves AAPL.US and TSLA.US, not {ticker}: pass those --tickers")
        fix = "pass a valid --api-key or set EODHD_API_KEY"
        return UserError(f"EODHD rejected the API key (HTTP {code}: {body}); {fix}")

    def unreachable(self, why: str) -> UserError:  # no other ticker would fare better: the run stops
        a = self.args
        return UserError(self.redact(f"{why}; {eodhd_kept(a.out_dir)}; {a.rerun} once it answers"))

    def page(self, ticker: str, offset: int) -> list:
        a = self.args
        params = {"s": ticker, "offset": offset, "limit": a.limit, "api_token": self.api_key, "fmt": "json"}
        params.update((k, v) for k, v in (("from", a.date_from), ("to", a.date_to)) if v)
        for attempt in range(a.max_retries + 1):
            try:
                resp = self.session.get(self.url, params=params, timeout=a.timeout)
            except requests.RequestException as e:  # timeouts, refused and reset connections
                reason, wait = f"{type(e).__name__}: {self.redact(e)}", self.backoff(attempt)
                down = getattr(e.args[0] if e.args else None, "reason", None)  # urllib3's, in requests' error
                self.unanswered += 1  # tries in a row, across tickers, without any answer (or only 5xx)
            else:
                code, down = resp.status_code, None
                self.unanswered = self.unanswered + 1 if code >= 500 else 0  # a server error answers nothing
                if code == 200:
                    self.requests_ok += 1
                    with contextlib.suppress(ValueError):
                        items = json.loads(resp.content.decode("utf-8", "replace"))  # RFC 8259: JSON is UTF-8
                        if isinstance(items, list):
                            return items
                    reason, wait = "answer is not a JSON list of articles", self.backoff(attempt)
                elif code in (401, 403):
                    raise self.refused(resp, ticker)
                elif code in (402, 404):  # the day's quota is spent; no such ticker
                    raise QuotaExhausted() if code == 402 else TickerFailed("unknown ticker (HTTP 404)")
                elif code == 429:
                    reason, wait = self.rate_limited(resp, attempt)
                elif code >= 500:
                    reason, wait = f"server error (HTTP {code})", self.backoff(attempt)
                else:  # other 4xx: retrying the same request cannot help
                    raise TickerFailed(f"HTTP {code}: {self.redact(' '.join(resp.text.split()))[:120]}")
            if attempt == a.max_retries:
                at, n = f"EODHD at {urllib.parse.urlsplit(self.url).netloc}", attempt + 1
                if isinstance(down, urllib3.exceptions.ConnectTimeoutError):  # DNS, refused, connect timeout
                    d = down.__cause__ or down
                    raise self.unreachable(f"cannot connect to {at} ({type(d).__name__}: {d}; {n} attempts)")
                if self.unanswered >= MAX_SILENT_TICKERS * n:  # timeouts, lost connections, 5xx: it is down
                    why = f"{at} is not answering ({MAX_SILENT_TICKERS} tickers in a row; last: {reason})"
                    raise self.unreachable(why)
                raise TickerFailed(f"{reason}; gave up after {n} attempts")
            retry = f"retry {attempt + 1}/{a.max_retries} in {wait:.2f}s"
            self.log(f"{ticker} offset {offset}: {reason}; {retry}")
            time.sleep(wait)


# -----------------------------------------------------------------------------
# eodhd: crash-safe storage
#
# news.jsonl          one article per line, each link exactly once; appended page by page (flush + fsync)
# news_merges.jsonl   extra tickers for articles already in news.jsonl (appended, fsynced); compact()
#                     folds them in, rewriting news.jsonl via temp file + os.replace
# news_progress.json  per ticker: the query (from, to), the next offset, done; atomic rewrite per page
#
# Order per page: append articles -> append merges -> record the new offset. A kill -9 anywhere in between
# only means the page is fetched again; the link index rebuilt from news.jsonl (+ merges) at start-up turns
# those repeats into no-ops. A torn last line (a kill mid-append) is dropped at start-up and refetched.


def str_list(v) -> list:
    """The strings of a tickers/symbols field; anything else an answer or an edited file holds is ignored."""
    return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []


def article_key(a: dict) -> str:
    link = a.get("link")
    if isinstance(link, str) and link.strip():
        return link.strip()
    fields = json.dumps([a.get("date"), a.get("title"), a.get("content")], default=str)  # no link: by these
    return "no-link:" + hashlib.sha256(fields.encode()).hexdigest()[:32]


def scan_jsonl(path: str):
    """Yield (byte offset, dict or None) per line, streaming; a torn last line (no newline) is None."""
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:  # no file: no lines
        off = 0
        for line in f:
            obj = None
            with contextlib.suppress(ValueError):
                obj = json.loads(line) if line.endswith(b"\n") else None
            yield off, (obj if isinstance(obj, dict) else None)
            off += len(line)


def jsonl_bytes(records) -> bytes:
    """One JSON line per record. A lone surrogate (valid JSON: half an emoji) goes back to its \\u escape."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return text.encode("utf-8", "backslashreplace")


class NewsStore:
    def __init__(self, out_dir: str, log):
        os.makedirs(out_dir, exist_ok=True)
        self.log, names = log, ("news.jsonl", "news_merges.jsonl", "news_progress.json")
        self.path, self.merges_path, self.progress_path = (os.path.join(out_dir, n) for n in names)
        # one writer per folder (appends would interleave); the kernel drops a flock when its process dies
        self.lock = open(os.path.join(out_dir, "news.lock"), "w")
        try:
            if fcntl is not None:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            busy = f"another fetch_news.py run is writing to {out_dir}; wait for it or use another --out-dir"
            raise FolderBusy(busy)
        for name in os.listdir(out_dir):  # temp files of a run killed during a rewrite
            if re.fullmatch(r"(news\.jsonl|news_progress\.json|finance_corpus\.txt)\.tmp\d+", name):
                os.remove(os.path.join(out_dir, name))
        self.compact(startup=True)
        try:
            with open(self.progress_path, encoding="utf-8") as f:
                self.progress = json.load(f)
        except (FileNotFoundError, ValueError):  # ValueError: impossible with os.replace, never fatal
            self.progress = None if os.path.exists(self.progress_path) else {}
        if not isinstance(self.progress, dict):
            self.progress = {}
            self.log(f"ignoring unreadable {self.progress_path}; every ticker restarts at offset 0")

    def compact(self, startup: bool = False) -> int:
        """Fold pending merges into news.jsonl, drop a torn tail or any repeated link, and rebuild the
        link index. Holds an index entry per article in memory, never the articles. Returns #articles."""
        merges = {}  # link -> (tickers, symbols) still to fold in
        for _, m in scan_jsonl(self.merges_path):
            if m is not None:
                t, sy = merges.setdefault(article_key(m), (set(), set()))
                t.update(str_list(m.get("tickers")))
                sy.update(str_list(m.get("symbols")))
        index, first, rewrite, bad = {}, [], False, 0  # first: (offset, link) of each link's first line
        for line, (off, obj) in enumerate(scan_jsonl(self.path), start=1):
            if bad:  # a kill can tear only the last line: one before it was damaged by something else
                raise UserError(f"{self.path} line {line - 1} is not an article (JSON object); {DAMAGED}")
            if obj is None:
                bad += 1
                continue
            k = article_key(obj)
            if k in index:
                rewrite = True
                continue
            tickers, symbols = set(str_list(obj.get("tickers"))), set(str_list(obj.get("symbols")))
            more_tickers, more_symbols = merges.get(k, (set(), set()))
            rewrite |= not (more_tickers <= tickers and more_symbols <= symbols)
            index[k] = tickers | more_tickers  # link -> the tickers it is stored under: the dedup index
            first.append((off, k))
        if bad and startup:
            why = "left by an interrupted run; their articles are fetched again"
            self.log(f"{self.path}: dropped {bad} incomplete line(s) {why}")
        if rewrite or bad:
            with atomic_open(self.path) as out, open(self.path, "rb") as src:
                for off, k in first:
                    src.seek(off)
                    line = src.readline()
                    if k in merges:  # only these are re-serialised: the others keep their original bytes
                        obj = json.loads(line)
                        obj["tickers"] = sorted(set(str_list(obj.get("tickers"))) | merges[k][0])
                        obj["symbols"] = sorted(set(str_list(obj.get("symbols"))) | merges[k][1])
                        line = jsonl_bytes([obj])
                    out.write(line)
        # news.jsonl holds the merges now (one for an article lost in a torn tail is dropped: it is refetched)
        if os.path.exists(self.merges_path):
            os.remove(self.merges_path)
        self.tickers = index
        return len(index)

    def add_page(self, ticker: str, items: list) -> int:
        """Store one page: new articles appended, known ones get this ticker merged. Returns #new."""
        new, merges = [], []
        for a in (a for a in items if isinstance(a, dict)):  # anything else in a page is not an article
            k = article_key(a)
            if k not in self.tickers:
                self.tickers[k] = {ticker}
                new.append(dict(a, tickers=[ticker]))  # as the API gave it: article_key(a) finds it again
            elif ticker not in self.tickers[k]:  # a page repeating a link merges it once
                self.tickers[k].add(ticker)
                symbols = sorted(set(str_list(a.get("symbols"))))
                merges.append({"link": k, "tickers": [ticker], "symbols": symbols})
        if new:
            market_corpus.append_whole(self.path, jsonl_bytes(new))
        if merges:
            market_corpus.append_whole(self.merges_path, jsonl_bytes(merges))
        return len(new)

    def save_progress(self, states: dict) -> None:  # ticker -> its state
        self.progress.update(states)
        with atomic_open(self.progress_path) as f:
            f.write(json.dumps(self.progress, indent=1, sort_keys=True).encode())


# -----------------------------------------------------------------------------
# eodhd: tickers

TICKER_RE = re.compile(r"^[A-Z0-9^][A-Z0-9.\-_=]*$")


def normalise_ticker(t: str) -> str:
    t = t.strip().upper()
    if not TICKER_RE.match(t):
        raise UserError(f"not a ticker: {t!r} (expected e.g. AAPL.US)")
    return t if "." in t else t + ".US"  # EODHD needs the exchange; US is the common case


def sp500_symbols(text: str) -> list[str]:
    return [row["Symbol"] for row in csv.DictReader(io.StringIO(text)) if (row.get("Symbol") or "").strip()]


def load_sp500(args, log) -> list[str]:
    """The current S&P 500 constituents: downloaded when online (and cached), else the cache."""
    url, cache = args.sp500_url, os.path.join(args.out_dir, SP500_CACHE)
    try:
        r = requests.get(url, timeout=args.timeout)
        r.raise_for_status()
        syms = sp500_symbols(r.text)
        if not syms:
            raise ValueError("no Symbol column")
        with atomic_open(cache) as f:
            f.write(r.text.encode("utf-8"))
    except (requests.RequestException, ValueError) as e:
        why = type(e).__name__ if isinstance(e, requests.RequestException) else str(e)
        if not os.path.exists(cache):
            raise UserError(f"cannot get the S&P 500 list from {url} ({why}) and no cached copy at {cache}")
        log(f"S&P 500 list not downloaded ({why}); using the cached {cache}")
        with open(cache, encoding="utf-8") as f:
            syms = sp500_symbols(f.read())
        if not syms:
            raise UserError(f"{cache} has no Symbol column; delete it and run again online")
    syms = [s.strip().upper().replace(".", "-") for s in syms]  # class shares: BRK.B is BRK-B.US on EODHD
    if bad := [s for s in syms if not TICKER_RE.match(s)]:
        log(f"S&P 500 list: skipped {len(bad)} row(s) that are not ticker symbols: {bad[:3]}")
    return [s + ".US" for s in syms if s not in bad]


def collect_tickers(args, log) -> list[str]:
    out = [normalise_ticker(t) for t in (args.tickers or "").split(",") if t.strip()]
    if args.tickers_file:
        try:
            with open(args.tickers_file, encoding="utf-8-sig") as f:  # a byte-order mark is not a ticker
                lines = f.read().splitlines()
        except OSError as e:
            raise UserError(f"cannot read --tickers-file {args.tickers_file}: {e.strerror}")
        except UnicodeDecodeError:
            raise UserError(f"--tickers-file {args.tickers_file} is not UTF-8 text")
        found = [t for ln in lines for t in ln.split("#")[0].replace(",", " ").split()]
        if not found:
            raise UserError(f"--tickers-file {args.tickers_file} lists no tickers")
        out += [normalise_ticker(t) for t in found]
    out += load_sp500(args, log) if args.sp500 else []
    if not out:
        raise UserError("no tickers: give --tickers, --tickers-file or --sp500")
    return list(dict.fromkeys(out))  # de-duplicate, keep order


# -----------------------------------------------------------------------------
# eodhd: from news.jsonl to the corpus

MIN_BODY_WORDS = 5  # a shorter cleaned body ("." or "Full story") is a headline-only item, not an article
# site furniture, not news: matched at the start of a line under 200 chars (not "Copyright Office rules...")
BOILERPLATE = re.compile(
    r"(?i)^(?:(?:story continues|continue reading|read more|read the (?:full|original) (?:story|article)"
    r"|view comments|recommended stories|click here|follow us|share this|download (?:the|our) (?:\w+ ){,3}app"
    r"|(?:sign up|subscribe)(?: now| here| today|$| for (?:free|our|the)| to (?:our|receive|get|the \w+ ne))"
    r"|(?:this|the) (?:article|story|post) (?:was )?(?:originally |first )?(?:appeared|published|featured)"
    r"|originally published|all rights reserved)\b"
    r"|(?:related(?: articles| stories)?|see also|read also|photo|image source)\s*:"
    r"|advertisement$|\u00a9|\(c\) ?\d{4}|copyright\s*(?:\u00a9|\(c\)|\d{4}))"
)
TAG = re.compile(r"</?[A-Za-z][\w:-]*(?:\s[^<>]*)?/?>|<[!?][^<>]*>")  # not the "<" of "margin < 5%"
ESCAPED_HTML = re.compile(r"(?i)</[a-z][\w:-]*\s*>|<br\s*/?>|&#?\w+;")  # left by one unescape; "a<b" is not


def strip_markup(s: str) -> str:
    s = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>|<!--.*?-->", " ", s)
    s = re.sub(r"(?i)<br\s*/?>|</?(p|div|li|h[1-6]|tr|blockquote)\b[^<>]*>", "\n", s)
    return html.unescape(TAG.sub(" ", s))


def clean_text(s, furniture: bool = True) -> str:
    """HTML to plain text without tags, entities or furniture lines; single spaces, never a blank line."""
    s = s.encode("utf-8", "ignore").decode("utf-8") if isinstance(s, str) else ""  # lone surrogates: not text
    s = strip_markup(s)
    s = strip_markup(s) if ESCAPED_HTML.search(s) else s  # escaped twice (&lt;p&gt;, &amp;amp;): once more
    lines = (" ".join(ln.split()) for ln in s.splitlines())  # split() also takes non-breaking spaces
    return "\n".join(ln for ln in lines if ln and not (furniture and len(ln) < 200 and BOILERPLATE.match(ln)))


def date_key(s) -> str:
    """ISO-8601 with any offset -> a UTC string that sorts chronologically; anything else as it is."""
    try:
        d = dt.datetime.fromisoformat(str(s).replace("Z", "+00:00"))
        d = d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)
        return d.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    except (ValueError, OverflowError):  # not a date, or one whose UTC time leaves the calendar (year 9999)
        return str(s)


def news_docs(src_path: str, tally: SimpleNamespace):
    """news.jsonl's documents ('title\\nbody', cleaned) by (date, link), no repeated or short body (tally)."""
    articles = ((off, obj) for off, obj in scan_jsonl(src_path) if obj is not None)
    order = sorted((date_key(obj.get("date", "")), article_key(obj), off) for off, obj in articles)
    seen_bodies = set()
    with contextlib.suppress(FileNotFoundError), open(src_path, "rb") as src:  # no news.jsonl: no documents
        for _, _, off in order:
            src.seek(off)
            r = json.loads(src.readline())
            title, body = " ".join(clean_text(r.get("title"), False).split()), clean_text(r.get("content"))
            h = hashlib.sha256(body.encode("utf-8")).digest()
            if len(body.split()) < MIN_BODY_WORDS:
                tally.short += 1
            elif h not in seen_bodies:
                seen_bodies.add(h)
                yield (f"{title}\n{body}" if title else body).encode("utf-8")


def write_news_corpus(out_dir: str, tally=None) -> tuple:
    """news.jsonl -> finance_corpus.txt: (path, #documents, #bytes); (path, 0, 0), unwritten, if none."""
    path, tally = os.path.join(out_dir, CORPUS_NAME), tally or SimpleNamespace(short=0)
    return path, *write_corpus(path, news_docs(os.path.join(out_dir, "news.jsonl"), tally))


# -----------------------------------------------------------------------------
# eodhd: the fetch loop

EODHD_FILES = ("news.jsonl", "news_merges.jsonl", "news_progress.json", "news.lock", CORPUS_NAME, SP500_CACHE)


def eodhd_kept(out_dir: str) -> str:
    """What a stopped run leaves behind, for its last line; read from disk, whatever stopped the run."""
    path = os.path.join(out_dir, "news.jsonl")
    try:
        n = len({article_key(obj) for _, obj in scan_jsonl(path) if obj is not None})
    except OSError:
        return f"the articles stored so far are kept in {path}"
    return f"{n} articles kept in {path}" if n else "no articles stored yet"


def resume_offset(state, query: dict, restart: bool):
    """A ticker's first offset: its own under the same query, else 0; None if that query finished it."""
    st = state if isinstance(state, dict) else {}
    same_query = not restart and st.get("from") == query["from"] and st.get("to") == query["to"]
    if same_query and st.get("done"):
        return None
    offset = st.get("offset", 0) if same_query else 0
    return offset if isinstance(offset, int) and offset >= 0 else 0


def fetch_all(args, tickers: list[str], store: NewsStore, client: NewsClient, log) -> SimpleNamespace:
    """Page each ticker to an empty page (or --max-pages), storing each page; quota or Ctrl-C: `stop`."""
    t = SimpleNamespace(done=0, already=0, new=0, unfinished=[], skipped={}, stop=None)
    query, bar = {"from": args.date_from, "to": args.date_to}, None
    try:
        for ticker in tickers:
            offset = resume_offset(store.progress.get(ticker), query, args.restart)
            if offset is None:
                t.already += 1
                continue
            for _ in range(args.max_pages or sys.maxsize):  # one request per pass
                try:
                    items = client.page(ticker, offset)
                except TickerFailed as e:
                    items, t.skipped[ticker] = None, str(e)
                    log(f"{ticker}: skipped: {e}")
                if bar is None:  # shown only once the API took the key: a rejected key prints one line
                    bar = tqdm(total=len(tickers), initial=t.already, **BAR)
                    if args.restart:  # every ticker recorded at 0: a stop from here goes on without the flag
                        store.save_progress({tk: dict(query, offset=0, done=False) for tk in tickers})
                        args.rerun += " without --restart"
                if items is None:
                    break
                bar.set_postfix(new=t.new, calls=client.requests_ok * CALLS_PER_NEWS_REQUEST)
                if not items:  # only an empty page ends a ticker: short pages happen mid-stream
                    store.save_progress({ticker: dict(query, offset=offset, done=True)})
                    t.done += 1
                    break
                t.new += store.add_page(ticker, items)
                offset += len(items)  # advance by what came back, not by --limit
                store.save_progress({ticker: dict(query, offset=offset, done=False)})
            else:  # --max-pages requests and no empty page yet
                t.unfinished.append(ticker)
            bar.update(1)  # every ticker that reaches here made a request, so the bar exists
    except QuotaExhausted:
        t.stop = "quota"
    except UserError:  # a rejected key, EODHD down: fold what is stored and write its corpus, then stop
        store.compact()
        write_news_corpus(args.out_dir)  # a rerun cannot, while EODHD stays down
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (market_corpus.Terminated): its exit code
        t.stop = market_corpus.interrupted_exit_code(e)
    finally:
        if bar is not None:
            bar.close()
    return t


def finish(args, t: SimpleNamespace, n_tickers: int, store: NewsStore, client: NewsClient) -> int:
    """Fold pending merges, write the corpus, print the summary (on stderr why a run stopped early)."""
    total, tally = store.compact(), SimpleNamespace(short=0)
    path, n_docs, n_bytes = write_news_corpus(args.out_dir, tally)
    left = n_tickers - t.done - t.already - len(t.skipped) - len(t.unfinished)  # a stop came before them
    counts = f"{t.done} done, {t.already} already complete, {len(t.skipped)} skipped, {left} left for a rerun"
    print(f"tickers: {counts}, {len(t.unfinished)} unfinished (--max-pages), {n_tickers} requested")
    print("".join(f"  skipped {ticker}: {why}\n" for ticker, why in t.skipped.items()), end="")
    print(f"articles: {t.new} new, {total} total in {store.path}")
    calls = client.requests_ok * CALLS_PER_NEWS_REQUEST
    print(f"API calls spent: {calls} ({client.requests_ok} news requests x {CALLS_PER_NEWS_REQUEST})")
    short = f"; {tally.short} articles left out: body under {MIN_BODY_WORDS} words" if tally.short else ""
    written = f"{path}, {n_docs} documents, {n_bytes:,} bytes"
    print(f"corpus: {written if n_docs else f'no usable articles yet; {path} left as it was'}{short}")
    if t.stop == "quota":
        why = f"the EODHD daily API quota is spent (HTTP 402). Everything fetched is saved; {args.rerun}"
        print(f"stopped: {why} after the quota resets to resume where it stopped.", file=sys.stderr)
        return EXIT_QUOTA
    if t.stop in (130, 143):
        print(f"interrupted: {eodhd_kept(args.out_dir)}; {args.rerun} to resume", file=sys.stderr)
        return t.stop
    if n := len(t.unfinished):  # --restart again would page them from offset 0: the same pages each time
        print(f"{n} tickers stopped at --max-pages; {args.rerun} to go on.")
    return 0


def run_eodhd(args, api_key: str) -> int:
    log = lambda msg: tqdm.write(msg, file=sys.stderr)  # noqa: E731  (keeps the bar intact)
    # everything that can be refused is refused before the first request (the S&P 500 list's included)
    if not api_key.strip():
        raise UserError("no API key: pass --api-key or set EODHD_API_KEY (--api-key demo: AAPL.US, TSLA.US)")
    if args.date_from and args.date_to and args.date_from > args.date_to:
        raise UserError(f"--from {args.date_from} is after --to {args.date_to}")
    bad_url = True
    with contextlib.suppress(ValueError):  # urlsplit and .port raise on an unclosed IPv6 host, a bad port
        url = urllib.parse.urlsplit(args.base_url)
        bad_url = url.scheme not in ("http", "https") or not url.hostname or url.port == 0
    if bad_url:
        base_url = Redactor(api_key)(args.base_url)  # before repr(), which could escape the key's characters
        raise UserError(f"--base-url must be an http:// or https:// URL with a host, got {base_url!r}")
    check_out_dir(args.out_dir, EODHD_FILES)
    tickers = collect_tickers(args, log)
    store, client = NewsStore(args.out_dir, log), NewsClient(args, api_key, log)
    return finish(args, fetch_all(args, tickers, store, client, log), len(tickers), store, client)


# -----------------------------------------------------------------------------
# command line: typed flag values, so a bad one is refused by the parser before anything runs


def number_flag(cast, ok, rule: str):
    """An argparse type: cast(s), refused with one line unless ok(value) (nan fails every comparison)."""
    what = "a whole number" if cast is int else "a number of seconds"

    def parse(s: str):
        try:
            x = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {x if cast is int else repr(s)}")
        return x

    return parse


def iso_date(s: str) -> str:
    with contextlib.suppress(ValueError):
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s) and dt.date.fromisoformat(s):
            return s
    raise argparse.ArgumentTypeError(f"must be a date as YYYY-MM-DD, got {s!r}")


def folder(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return os.path.expanduser(s)  # "--out-dir=~/news" reaches here unexpanded


DAY = f"{MAX_WAIT_S:.0f} seconds"
positive_seconds = number_flag(float, lambda x: 0 < x <= MAX_WAIT_S, f"more than 0 and at most {DAY}")
non_negative_seconds = number_flag(float, lambda x: 0 <= x <= MAX_WAIT_S, f"between 0 and {DAY}")
page_size = number_flag(int, lambda n: 1 <= n <= 1000, "between 1 and 1000 (EODHD's largest page)")
positive_int = number_flag(int, lambda n: n >= 1, "at least 1")
non_negative_int = number_flag(int, lambda n: n >= 0, "0 or more")
SP500_URL = "https://raw.githubusercontent.com/datasets/s-and-p-500-companies/main/data/constituents.csv"

# fmt: off
# one row per flag (ruff would spread each over several lines); every help states its default
FLAGS = [
    ("--source",       dict(choices=["market", "eodhd"], default="market", help="market: offline stories "
        "from bundled historical series; eodhd: news from the EODHD API (default: %(default)s)")),
    ("--out-dir",      dict(type=folder, default="data", help="where finance_corpus.txt (and for eodhd "
        "news.jsonl, progress and the S&P 500 list cache) are written (default: %(default)s)")),
    ("--tickers",      dict(help="comma list of tickers: AAPL.US,MSFT.US (no suffix: .US) (default: none)")),
    ("--tickers-file", dict(type=os.path.expanduser, help="ticker file; # starts a comment (default: none)")),
    ("--sp500",        dict(action="store_true", help="add the S&P 500 constituents: from --sp500-url "
        f"when online, cached as <out-dir>/{SP500_CACHE} for offline runs; BRK.B: BRK-B.US (default: off)")),
    ("--sp500-url",    dict(default=SP500_URL,
        help="CSV with a Symbol column listing the S&P 500 (default: %(default)s)")),
    ("--from",         dict(dest="date_from", type=iso_date, metavar="YYYY-MM-DD",
        help="oldest article date, YYYY-MM-DD (default: none, the API's own range)")),
    ("--to",           dict(dest="date_to", type=iso_date, metavar="YYYY-MM-DD",
        help="newest article date, YYYY-MM-DD (default: none)")),
    ("--limit",        dict(type=page_size, default=1000,  # EODHD's maximum page size for /news
        help="articles per request, 1-1000 (default: %(default)s)")),
    ("--max-pages",    dict(type=positive_int, help="stop each ticker after this many requests this run; "
        "a rerun continues (default: no cap, page until an empty page)")),
    ("--api-key",      dict(help="EODHD API token; never printed or stored (default: $EODHD_API_KEY; "
        "'demo' serves AAPL.US and TSLA.US)")),
    ("--base-url",     dict(default=BASE_URL,  # build_parser puts $EODHD_BASE_URL first
        help=f"API root; requests go to <base-url>/news (default: $EODHD_BASE_URL or {BASE_URL})")),
    ("--timeout",      dict(type=positive_seconds, default=30.0, help="seconds to wait for a connection "
        "or an answer, at most a day (default: %(default)s)")),
    ("--max-retries",  dict(type=non_negative_int, default=5,
        help="retries after a 429, 5xx, timeout or bad JSON, then the ticker is skipped; no connection, or "
        f"{MAX_SILENT_TICKERS} tickers in a row of only 5xx/timeouts, stop the run (default: %(default)s)")),
    ("--backoff-base", dict(type=non_negative_seconds, default=1.0, help="first retry wait in seconds, "
        "doubled each retry, with jitter; a 429's Retry-After overrides it (default: %(default)s)")),
    ("--backoff-max",  dict(type=non_negative_seconds, default=60.0, help="cap in seconds on one wait before "
        "a retry, a 429's Retry-After included: a longer one is cut to this (default: %(default)s)")),
    ("--restart",      dict(action="store_true", help="page every ticker from offset 0; stored articles are "
        "not duplicated, and a stopped run goes on without the flag (default: off, resume)")),
]
# fmt: on
EPILOG = (
    "exit codes: 0 done (skipped tickers are listed in the summary); 2 bad input, an output that cannot be "
    f"written, a rejected API key, no connection to EODHD or no answer (but 5xx) for {MAX_SILENT_TICKERS} "
    "tickers in a row; 3 EODHD daily quota spent; 130 Ctrl-C and 143 SIGTERM, which stops it the same way "
    "(everything fetched is kept; rerun the same command to resume). "
    "--source eodhd writes news.jsonl, news_progress.json and finance_corpus.txt (title and body as plain "
    f"text; a body under {MIN_BODY_WORDS} words or repeating another's is left out) into --out-dir."
)
EODHD_ONLY = [settings.get("dest", flag[2:].replace("-", "_")) for flag, settings in FLAGS[2:]]  # eodhd group


def build_parser() -> argparse.ArgumentParser:
    about = __doc__.split("\n\n")[0].strip() + " See the module docstring for details."
    p = market_corpus.ArgumentParser(description=about, epilog=EPILOG)  # bad flags: one line, exit 2
    eodhd = p.add_argument_group("eodhd source")
    for flag, settings in FLAGS:
        (p if flag in ("--source", "--out-dir") else eodhd).add_argument(flag, **settings)
    p.set_defaults(rerun=RERUN, base_url=os.environ.get("EODHD_BASE_URL", BASE_URL))  # the env read now
    return p


def stop_line(e: BaseException, args, redact: Redactor) -> str:
    """The one stderr line of a fetch stopped by a user mistake, a failed write, Ctrl-C or SIGTERM."""
    if isinstance(e, UserError):
        return f"error: {redact(e)}"
    kept = eodhd_kept(args.out_dir)
    if isinstance(e, KeyboardInterrupt):
        return redact(f"interrupted: {kept}; {args.rerun} to resume")
    where = e.filename or f"to {args.out_dir}"  # a failed write() does not say which file
    return redact(f"error: cannot write {where} ({e.strerror or e}); {kept}; fix that and {args.rerun}")


def main(argv=None) -> int:
    args = (parser := build_parser()).parse_args(argv)
    market_corpus.terminate_as_interrupt()
    if args.source == "market":  # an eodhd flag set to anything but its default would be silently ignored
        used = [n for n in EODHD_ONLY if getattr(args, n) != parser.get_default(n)]
        if not used:
            return market_corpus.build_corpus(args.out_dir)
        flag = "--" + used[0].replace("_", "-").replace("date-", "")  # date_from is --from
        print(f"error: {flag} only applies to --source eodhd", file=sys.stderr)
        return EXIT_BAD_INPUT
    api_key = args.api_key if args.api_key is not None else os.environ.get("EODHD_API_KEY", "")
    created = market_corpus.first_missing(args.out_dir)  # folders this run makes; removed if it fails
    try:
        return run_eodhd(args, api_key)
    # user mistakes; disk full or permissions changed mid-run (the machine's problem, not a bug); Ctrl-C
    except (UserError, OSError, KeyboardInterrupt) as e:
        if not isinstance(e, FolderBusy):  # another run's folder: nothing in it is ours to remove
            market_corpus.remove_created(created, args.out_dir, litter="news.lock")
        print(stop_line(e, args, Redactor(api_key)), file=sys.stderr)
        return market_corpus.interrupted_exit_code(e) if isinstance(e, KeyboardInterrupt) else EXIT_BAD_INPUT
    except Exception:  # a bug: show the traceback, but never the key
        print(Redactor(api_key)(traceback.format_exc()), file=sys.stderr, end="")
        return 1


if __name__ == "__main__":
    sys.exit(main())
