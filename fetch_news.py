"""
Build the finance text corpus that every model in this project trains on.

Two sources, one output format (UTF-8, documents separated by exactly one blank line):

  python fetch_news.py --source market            # offline default -> data/finance_corpus.txt
  python fetch_news.py --source eodhd --api-key demo --tickers AAPL.US,TSLA.US

--source market writes the offline corpus of market_corpus.py: news-style stories written from real
historical series shipped inside installed packages, byte-identical on every run and machine.

--source eodhd pages through the EODHD financial-news API for a list of tickers into
news.jsonl (one article per line, de-duplicated by link, resumable after kill -9) and then
writes finance_corpus.txt beside it.
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
import math
import os
import random
import re
import sys
import tempfile
import time
import traceback
import urllib.parse
from types import SimpleNamespace

import requests
from tqdm import tqdm

import market_corpus

try:
    import fcntl  # POSIX: guards news.jsonl against two concurrent writers
except ImportError:  # Windows: no lock, everything else works
    fcntl = None

# -----------------------------------------------------------------------------
# defaults

SOURCE = "market"
OUT_DIR = "data"
CORPUS_NAME = "finance_corpus.txt"
BASE_URL = "https://eodhd.com/api"
LIMIT = 1000  # EODHD's maximum page size for /news
TIMEOUT_S = 30.0
MAX_RETRIES = 5
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
CALLS_PER_NEWS_REQUEST = 5  # EODHD bills each /news request as 5 API calls
SP500_URL = "https://raw.githubusercontent.com/datasets/s-and-p-500-companies/main/data/constituents.csv"
SP500_CACHE = "sp500_constituents.csv"

RERUN = "run the same command again"  # every stop keeps what was done: a rerun goes on from there
EXIT_BAD_INPUT = 2  # bad flags, files or API key: one line on stderr
EXIT_QUOTA = 3  # daily quota spent: everything fetched is kept, rerun resumes


class UserError(Exception):
    """A mistake the user can fix: reported as one line on stderr, exit code 2."""


class FolderBusy(UserError):
    """Another run holds --out-dir: its files are not ours to tidy up."""


# -----------------------------------------------------------------------------
# shared file helpers


@contextlib.contextmanager
def atomic_open(path: str):
    """Write a whole file through a temp file in the same directory + os.replace: readers (and a
    run killed half-way) see the old file or the new one, never a mix. On error the old file stays."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # os.replace is atomic, but the rename only survives a power cut once the folder entry is on disk
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_out_dir(path: str, names) -> None:
    """Refuse an --out-dir that cannot be written, before any work is done: it is a file, it lies
    under a file, or its nearest existing folder does not let us create files (probing with a temp
    file answers for read-only mounts, modes and ACLs alike, and creates no folder). A folder where
    an output file of `names` should be would only fail at os.replace, after the work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out-dir {path} is a file, not a folder")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"--out-dir {path} lies under a file ({probe})")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise UserError(f"--out-dir {path} is not writable ({e.strerror})")
    for out in (os.path.join(path, name) for name in names):
        if os.path.isdir(out):
            raise UserError(f"{out} is a folder, not a file; move it away or use another --out-dir")


def first_missing(path: str):
    """The topmost folder of path that does not exist yet (what a run will create), or None."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path):
        path, top = os.path.dirname(path), path
    return top


def remove_created(top, out_dir: str) -> None:
    """Undo the folders a failed run created, as long as they hold nothing of value: only empty
    folders go (and the lock file, when it is all there is)."""
    if top is None:
        return
    out_dir = os.path.abspath(out_dir)
    with contextlib.suppress(OSError):
        if os.listdir(out_dir) == ["news.lock"]:
            os.remove(os.path.join(out_dir, "news.lock"))
    d = out_dir
    while d == top or d.startswith(top + os.sep):
        try:
            os.rmdir(d)
        except OSError:
            return
        d = os.path.dirname(d)


def run_market(out_dir: str) -> None:
    path = os.path.join(out_dir, CORPUS_NAME)
    check_out_dir(out_dir, [CORPUS_NAME])
    print(f"building the market corpus for {path} ...", file=sys.stderr, flush=True)
    docs = [d.strip() for d in market_corpus.build_market_docs()]
    # the project-wide corpus format: documents joined by one blank line, trailing newline
    assert all(docs) and not any("\n\n" in d for d in docs), "documents must be non-empty, no blank lines"
    data = ("\n\n".join(docs) + "\n").encode("utf-8")
    with atomic_open(path) as f:
        f.write(data)
    chars = len(data.decode("utf-8"))
    print(f"wrote {path}: {len(docs):,} documents, {len(data):,} bytes, {chars:,} characters")


# -----------------------------------------------------------------------------
# eodhd: the API key never leaves the process (requests puts it in URLs, and URLs end up
# in exception messages, so every message we print goes through redact())


def api_key_of(args) -> str:
    return args.api_key if args.api_key is not None else os.environ.get("EODHD_API_KEY", "")


class Redactor:
    def __init__(self, secret: str):
        self.secrets = [
            s for s in {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)} if s
        ]

    def __call__(self, text) -> str:
        text = str(text)
        for s in self.secrets:
            text = text.replace(s, "***")
        return re.sub(r"(api_token=)[^&\s'\"]+", r"\1***", text)


class AuthError(UserError): ...


class QuotaExhausted(Exception): ...


class TickerNotFound(Exception): ...


class TickerFailed(Exception): ...


class NewsClient:
    """GET {base_url}/news with retries. Returns one page (a list of article dicts) or raises:
    AuthError (401/403), QuotaExhausted (402), TickerNotFound (404), TickerFailed (gave up)."""

    def __init__(self, args, api_key: str, log):
        self.url = args.base_url.rstrip("/") + "/news"
        self.api_key, self.timeout, self.log = api_key, args.timeout, log
        self.max_retries = args.max_retries
        self.backoff_base, self.backoff_max = args.backoff_base, args.backoff_max
        self.redact = Redactor(api_key)
        self.session = requests.Session()  # one connection pool: keep-alive across pages and tickers
        self.session.headers["User-Agent"] = "fetch_news.py (finance corpus builder)"
        self.requests_ok = 0  # requests answered 200: each costs CALLS_PER_NEWS_REQUEST API calls
        self.jitter = random.Random()  # jitter de-synchronises clients; it does not need to be reproducible

    def backoff(self, attempt: int) -> float:
        # exponential backoff with jitter: base * 2^attempt, scaled by a random factor in [0.5, 1]
        return min(self.backoff_max, self.backoff_base * (2**attempt)) * (0.5 + 0.5 * self.jitter.random())

    def rate_limited(self, resp, attempt: int) -> tuple:
        """(reason, wait) for a 429. Retry-After (seconds or an HTTP date) is honoured up to
        --backoff-max: a server asking for a day's pause must not stall the fetch for a day."""
        value, ra = resp.headers.get("Retry-After", "").strip(), None
        with contextlib.suppress(ValueError):
            ra = max(0.0, float(value))
        if ra is None:
            with contextlib.suppress(TypeError, ValueError):
                when = email.utils.parsedate_to_datetime(value)
                ra = max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())
        if ra is None:
            return "rate limited (HTTP 429)", self.backoff(attempt)
        if ra <= self.backoff_max:
            return "rate limited (HTTP 429)", ra
        return (
            f"rate limited (HTTP 429): server asked Retry-After {ra:.0f} s; "
            f"waiting {self.backoff_max:g} s (--backoff-max)",
            self.backoff_max,
        )

    def page(self, ticker: str, offset: int, limit: int, date_from, date_to) -> list:
        params = {"s": ticker, "offset": offset, "limit": limit, "api_token": self.api_key, "fmt": "json"}
        params.update((k, v) for k, v in (("from", date_from), ("to", date_to)) if v)
        for attempt in range(self.max_retries + 1):
            try:
                resp = self.session.get(self.url, params=params, timeout=self.timeout)
            except requests.RequestException as e:  # timeouts, refused and reset connections
                reason, wait = f"{type(e).__name__}: {self.redact(e)}", self.backoff(attempt)
            else:
                code = resp.status_code
                if code == 200:
                    self.requests_ok += 1
                    items = None
                    with contextlib.suppress(ValueError):
                        items = json.loads(resp.text)
                    if isinstance(items, list):
                        return items
                    reason, wait = "answer is not a JSON list of articles", self.backoff(attempt)
                elif code in (401, 403):
                    body = " ".join(resp.text.split())[:80] or resp.reason
                    raise AuthError(
                        f"EODHD rejected the API key (HTTP {code}: {self.redact(body)}); "
                        f"pass a valid --api-key or set EODHD_API_KEY"
                    )
                elif code in (402, 404):  # the day's quota is spent; no such ticker
                    raise QuotaExhausted() if code == 402 else TickerNotFound()
                elif code == 429:
                    reason, wait = self.rate_limited(resp, attempt)
                elif code >= 500:
                    reason, wait = f"server error (HTTP {code})", self.backoff(attempt)
                else:  # other 4xx: retrying the same request cannot help
                    raise TickerFailed(f"HTTP {code}: {self.redact(' '.join(resp.text.split())[:120])}")
            if attempt == self.max_retries:
                raise TickerFailed(f"{reason}; gave up after {attempt + 1} attempts")
            self.log(
                f"{ticker} offset {offset}: {reason}; retry {attempt + 1}/{self.max_retries} in {wait:.2f}s"
            )
            time.sleep(wait)
        raise AssertionError("unreachable")


# -----------------------------------------------------------------------------
# eodhd: crash-safe storage
#
# news.jsonl   one article per line, each link exactly once; appended page by page (flush + fsync)
# news_merges.jsonl   extra tickers for articles already in news.jsonl (appended, fsynced); folded
#                     into news.jsonl by compact(), which rewrites it via temp file + os.replace
# news_progress.json  per ticker: the query (from, to), the next offset, done; atomic rewrite per page
#
# Order per page: append articles -> append merges -> record the new offset. A kill -9 anywhere in
# between only means the page is fetched again on the next run; the link index rebuilt from
# news.jsonl (+ merges) at start-up turns those repeats into no-ops. A torn last line (killed
# mid-append) is dropped at start-up; its articles come back with the refetched page.


def str_list(v) -> list:
    """The strings of a tickers/symbols field; anything else an answer or an edited file holds is ignored."""
    return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []


def article_key(a: dict) -> str:
    link = a.get("link")
    if isinstance(link, str) and link.strip():
        return link.strip()
    return "no-link:" + str(a.get("date", "")) + "|" + str(a.get("title", ""))


def scan_jsonl(path: str):
    """Yield (byte offset, parsed dict or None) per line, streaming. A last line without its
    newline is torn (the writer was killed mid-append) and yields None as well."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        off = 0
        for line in f:
            obj = None
            with contextlib.suppress(ValueError):
                obj = json.loads(line) if line.endswith(b"\n") else None
            yield off, (obj if isinstance(obj, dict) else None)
            off += len(line)


def jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)


def append_fsync(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class NewsStore:
    def __init__(self, out_dir: str, log):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "news.jsonl")
        self.merges_path = os.path.join(out_dir, "news_merges.jsonl")
        self.progress_path = os.path.join(out_dir, "news_progress.json")
        self.log = log
        # one writer per folder: a second concurrent run would interleave appends. flock is
        # released by the kernel when the process dies, kill -9 included
        self.lock = open(os.path.join(out_dir, "news.lock"), "w")
        try:
            if fcntl is not None:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FolderBusy(
                f"another fetch_news.py run is writing to {out_dir}; wait for it or use another --out-dir"
            )
        for name in os.listdir(out_dir):  # temp files of a run killed during a rewrite
            if re.fullmatch(r"(news\.jsonl|news_progress\.json|finance_corpus\.txt)\.tmp\d+", name):
                os.remove(os.path.join(out_dir, name))
        self.tickers: dict[str, set] = {}  # link -> tickers it is stored under (the dedup index)
        self.compact(startup=True)
        self.progress = {}
        if os.path.exists(self.progress_path):
            try:
                with open(self.progress_path, encoding="utf-8") as f:
                    self.progress = json.load(f)
                if not isinstance(self.progress, dict):
                    raise ValueError
            except ValueError:  # cannot happen with os.replace, but never lose articles over it
                self.progress = {}
                self.log(f"ignoring unreadable {self.progress_path}; every ticker restarts at offset 0")

    def compact(self, startup: bool = False) -> int:
        """Fold pending merges into news.jsonl, drop a torn tail or any repeated link, and rebuild
        the link index. Streams the file, so its size is not limited by memory. Returns #articles."""
        merges = {}  # link -> (tickers, symbols) still to fold in
        for _, m in scan_jsonl(self.merges_path):
            if m is not None:
                t, sy = merges.setdefault(article_key(m), (set(), set()))
                t.update(str_list(m.get("tickers")))
                sy.update(str_list(m.get("symbols")))
        index, rewrite, bad = {}, False, 0
        for _, obj in scan_jsonl(self.path):
            if obj is None:
                bad += 1
                continue
            k = article_key(obj)
            if k in index:
                rewrite = True
                continue
            index[k] = set(str_list(obj.get("tickers")))
            symbols = set(str_list(obj.get("symbols")))
            if k in merges and not (merges[k][0] <= index[k] and merges[k][1] <= symbols):
                rewrite = True
        if bad and startup:
            self.log(
                f"{self.path}: dropped {bad} incomplete line(s) left by an interrupted run; "
                f"their articles are fetched again"
            )
        if rewrite or bad:
            with atomic_open(self.path) as out, open(self.path, "rb") as src:
                written = set()
                for off, obj in scan_jsonl(self.path):
                    if obj is None or article_key(obj) in written:
                        continue
                    k = article_key(obj)
                    written.add(k)
                    if k in merges:
                        obj["tickers"] = sorted(set(str_list(obj.get("tickers"))) | merges[k][0])
                        obj["symbols"] = sorted(set(str_list(obj.get("symbols"))) | merges[k][1])
                        out.write(jsonl_bytes([obj]))
                    else:  # copy the original bytes: no re-serialisation for untouched articles
                        src.seek(off)
                        out.write(src.readline())
        if os.path.exists(self.merges_path):
            os.remove(self.merges_path)  # only once news.jsonl holds the merged tickers
        for k, (t, _) in merges.items():
            if k in index:  # a merge for an article lost in a torn tail is dropped: it gets refetched
                index[k] |= t
        self.tickers = index
        return len(index)

    def add_page(self, ticker: str, items: list) -> int:
        """Store one page: new articles appended, known ones get this ticker merged. Returns #new."""
        new, merges = [], []
        for a in items:
            if not isinstance(a, dict):
                continue
            k = article_key(a)
            if k not in self.tickers:
                self.tickers[k] = {ticker}
                new.append(dict(a, link=k, tickers=[ticker]))
            elif ticker not in self.tickers[k]:  # a page repeating a link merges it once
                self.tickers[k].add(ticker)
                symbols = sorted(set(str_list(a.get("symbols"))))
                merges.append({"link": k, "tickers": [ticker], "symbols": symbols})
        if new:
            append_fsync(self.path, jsonl_bytes(new))
        if merges:
            append_fsync(self.merges_path, jsonl_bytes(merges))
        return len(new)

    def save_progress(self, ticker: str, state: dict) -> None:
        self.progress[ticker] = state
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


def load_sp500(out_dir: str, url: str, timeout: float, log) -> list[str]:
    """The current S&P 500 constituents: downloaded when online (and cached), else the cache."""
    cache = os.path.join(out_dir, SP500_CACHE)
    try:
        r = requests.get(url, timeout=timeout)
        r.raise_for_status()
        syms = sp500_symbols(r.text)
        if not syms:
            raise ValueError("no Symbol column")
        with atomic_open(cache) as f:
            f.write(r.text.encode("utf-8"))
    except (requests.RequestException, ValueError) as e:
        why = type(e).__name__ if isinstance(e, requests.RequestException) else str(e)
        if not os.path.exists(cache):
            raise UserError(
                f"cannot get the S&P 500 list from {url} ({why}) and there is no cached copy at {cache}"
            )
        log(f"S&P 500 list not downloaded ({why}); using the cached {cache}")
        with open(cache, encoding="utf-8") as f:
            syms = sp500_symbols(f.read())
        if not syms:
            raise UserError(f"{cache} has no Symbol column; delete it and run again online")
    # class shares: the constituents list writes BRK.B, EODHD wants BRK-B.US
    return [s.strip().upper().replace(".", "-") + ".US" for s in syms]


def collect_tickers(args, log) -> list[str]:
    out = []
    if args.tickers:
        out += [normalise_ticker(t) for t in args.tickers.split(",") if t.strip()]
    if args.tickers_file:
        try:
            with open(args.tickers_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise UserError(f"cannot read --tickers-file {args.tickers_file}: {e.strerror}")
        except UnicodeDecodeError:
            raise UserError(f"--tickers-file {args.tickers_file} is not UTF-8 text")
        found = [t for ln in lines for t in ln.split("#")[0].replace(",", " ").split()]
        if not found:
            raise UserError(f"--tickers-file {args.tickers_file} lists no tickers")
        out += [normalise_ticker(t) for t in found]
    if args.sp500:
        out += load_sp500(args.out_dir, args.sp500_url, args.timeout, log)
    if not out:
        raise UserError("no tickers: give --tickers, --tickers-file or --sp500")
    return list(dict.fromkeys(out))  # de-duplicate, keep order


# -----------------------------------------------------------------------------
# eodhd: from news.jsonl to the corpus

# lines that are site furniture rather than news (matched at the start of a line under 200 chars)
BOILERPLATE = re.compile(
    r"^(?:(?:story continues|continue reading|read more|read the (?:full|original) (?:story|article)"
    r"|view comments|recommended stories|click here|sign up|subscribe|download the|follow us|share this"
    r"|(?:this|the) (?:article|story|post) (?:was )?(?:originally |first )?(?:appeared|published|featured)"
    r"|originally published|copyright|all rights reserved)\b"
    r"|(?:related(?: articles| stories)?|see also|read also|photo|image source)\s*:"
    r"|advertisement$|\u00a9|\(c\) ?\d{4})",
    re.IGNORECASE,
)


def clean_text(s) -> str:
    """HTML to plain text: tags and entities gone, boilerplate lines dropped, whitespace normalised
    (single spaces within a line, no empty lines, so a document never contains a blank line)."""
    if not isinstance(s, str):
        return ""
    s = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", s)
    s = re.sub(r"(?i)<br\s*/?>|</?(p|div|li|h[1-6]|tr|blockquote)\b[^>]*>", "\n", s)
    s = re.sub(r"<[^>]*>", " ", s)
    s = html.unescape(s)
    lines = []
    for ln in s.splitlines():
        ln = " ".join(ln.split())  # str.split() also splits on non-breaking and other unicode spaces
        if ln and not (len(ln) < 200 and BOILERPLATE.match(ln)):
            lines.append(ln)
    return "\n".join(lines)


def date_key(s) -> str:
    """ISO-8601 with any offset -> a UTC string that sorts chronologically."""
    try:
        d = dt.datetime.fromisoformat(str(s).replace("Z", "+00:00"))
    except ValueError:
        return str(s)
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return d.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def news_doc(r: dict) -> tuple:
    """(title, cleaned body) of one article; the document is 'title\nbody'."""
    return " ".join(clean_text(r.get("title")).split()), clean_text(r.get("content"))


def news_docs(src_path: str):
    """The documents of news.jsonl as bytes (title line, then body), sorted by (date, link); empty
    and repeated bodies dropped (the earliest copy is kept). Holds only (date, link, offset) per
    article and a hash per body in memory; the articles themselves are read back one at a time."""
    order = sorted(
        (date_key(obj.get("date", "")), article_key(obj), off)
        for off, obj in scan_jsonl(src_path)
        if obj is not None
    )
    if not order:
        return
    seen_bodies = set()
    with open(src_path, "rb") as src:
        for _, _, off in order:
            src.seek(off)
            title, body = news_doc(json.loads(src.readline()))
            h = hashlib.sha256(body.encode("utf-8")).digest()
            if body and h not in seen_bodies:
                seen_bodies.add(h)
                yield (f"{title}\n{body}" if title else body).encode("utf-8")


def write_news_corpus(out_dir: str) -> tuple:
    """news.jsonl -> finance_corpus.txt. Returns (path, #documents, #bytes); (path, 0, 0) when no
    article has a body, and then an existing corpus (e.g. the market one) is left as it was."""
    path = os.path.join(out_dir, CORPUS_NAME)
    docs = news_docs(os.path.join(out_dir, "news.jsonl"))
    first = next(docs, None)
    if first is None:
        return path, 0, 0
    with atomic_open(path) as out:
        out.write(first)
        n_docs = 1
        for doc in docs:
            out.write(b"\n\n" + doc)
            n_docs += 1
        out.write(b"\n")
        n_bytes = out.tell()
    return path, n_docs, n_bytes


# -----------------------------------------------------------------------------
# eodhd: the fetch loop

BAR = dict(desc="news", unit="ticker", file=sys.stderr, dynamic_ncols=True)
EODHD_FILES = ("news.jsonl", "news_merges.jsonl", "news_progress.json", "news.lock", CORPUS_NAME, SP500_CACHE)


def eodhd_kept(out_dir: str) -> str:
    """What a stopped run leaves behind, for its last line; read from disk, whatever stopped the run."""
    path = os.path.join(out_dir, "news.jsonl")
    try:
        n = len({article_key(obj) for _, obj in scan_jsonl(path) if obj is not None})
    except OSError:
        return f"the articles stored so far are kept in {path}"
    return f"{n} articles kept in {path}" if n else "no articles stored yet"


def check_eodhd_args(args, api_key: str) -> None:
    """Everything that can be refused before the first request (the S&P 500 list's included)."""
    if not api_key.strip():
        raise UserError(
            "no API key: pass --api-key or set EODHD_API_KEY (--api-key demo serves AAPL.US and TSLA.US)"
        )
    if args.date_from and args.date_to and args.date_from > args.date_to:
        raise UserError(f"--from {args.date_from} is after --to {args.date_to}")
    if not re.match(r"^https?://", args.base_url):
        base_url = Redactor(api_key)(args.base_url)
        raise UserError(f"--base-url must start with http:// or https://, got {base_url!r}")
    check_out_dir(args.out_dir, EODHD_FILES)


def resume_offset(state, query: dict, restart: bool):
    """Where a ticker's paging starts: its recorded offset when the query is the same, else 0;
    None when the same query already paged it to the end."""
    st = state if isinstance(state, dict) else {}
    same_query = not restart and st.get("from") == query["from"] and st.get("to") == query["to"]
    if same_query and st.get("done"):
        return None
    offset = st.get("offset", 0) if same_query else 0
    return offset if isinstance(offset, int) and offset >= 0 else 0


def fetch_all(args, tickers: list[str], store: NewsStore, client: NewsClient, log) -> SimpleNamespace:
    """Page every ticker until an empty page (or --max-pages), storing each page as it comes. A
    spent quota or Ctrl-C ends the loop early and says so in the returned tally's `stop`."""
    t = SimpleNamespace(done=0, already=0, new=0, unfinished=[], skipped={}, stop=None)
    query = {"from": args.date_from, "to": args.date_to}
    bar = None
    try:
        for ticker in tickers:
            offset = resume_offset(store.progress.get(ticker), query, args.restart)
            if offset is None:
                t.already += 1
                continue
            pages = 0
            while True:
                if args.max_pages is not None and pages >= args.max_pages:
                    t.unfinished.append(ticker)
                    break
                try:
                    items = client.page(ticker, offset, args.limit, args.date_from, args.date_to)
                except TickerNotFound:
                    items, t.skipped[ticker] = None, "unknown ticker (HTTP 404)"
                    log(f"{ticker}: unknown ticker (HTTP 404), skipped")
                except TickerFailed as e:
                    items, t.skipped[ticker] = None, str(e)
                    log(f"{ticker}: skipped: {e}")
                if bar is None:  # shown only once the API took the key: a rejected key prints one line
                    bar = tqdm(total=len(tickers), initial=t.already, **BAR)
                if items is None:
                    break
                pages += 1
                bar.set_postfix(new=t.new, calls=client.requests_ok * CALLS_PER_NEWS_REQUEST)
                if not items:  # only an empty page ends a ticker: short pages happen mid-stream
                    store.save_progress(ticker, dict(query, offset=offset, done=True))
                    t.done += 1
                    break
                t.new += store.add_page(ticker, items)
                offset += len(items)  # advance by what came back, not by --limit
                store.save_progress(ticker, dict(query, offset=offset, done=False))
            if bar is not None:
                bar.update(1)
    except QuotaExhausted:
        t.stop = "quota"
    except AuthError:
        store.compact()
        raise
    except KeyboardInterrupt:
        t.stop = "interrupt"
    finally:
        if bar is not None:
            bar.close()
    return t


def finish(args, t: SimpleNamespace, n_tickers: int, store: NewsStore, client: NewsClient) -> int:
    """Fold pending merges, write the corpus, print the summary (and on stderr why the run stopped
    early); returns the exit code."""
    total = store.compact()
    path, n_docs, n_bytes = write_news_corpus(args.out_dir)
    calls = client.requests_ok * CALLS_PER_NEWS_REQUEST
    print(
        f"tickers: {t.done} done, {t.already} already complete, {len(t.skipped)} skipped, "
        f"{len(t.unfinished)} unfinished (--max-pages), {n_tickers} requested"
    )
    for ticker, why in t.skipped.items():
        print(f"  skipped {ticker}: {why}")
    print(f"articles: {t.new} new, {total} total in {store.path}")
    print(f"API calls spent: {calls} ({client.requests_ok} news requests x {CALLS_PER_NEWS_REQUEST})")
    if n_docs:
        print(f"corpus: {path}, {n_docs} documents, {n_bytes:,} bytes")
    else:
        print(f"corpus: no usable articles yet; {path} left as it was")
    if t.stop == "quota":
        print(
            "stopped: the EODHD daily API quota is spent (HTTP 402). Everything fetched is saved; "
            f"{RERUN} after the quota resets to resume where it stopped.",
            file=sys.stderr,
        )
        return EXIT_QUOTA
    if t.stop == "interrupt":
        print(f"interrupted: {eodhd_kept(args.out_dir)}; {RERUN} to resume", file=sys.stderr)
        return 130
    if t.unfinished:
        print(f"{len(t.unfinished)} tickers stopped at --max-pages; {RERUN} to continue them.")
    return 0


def run_eodhd(args) -> int:
    log = lambda msg: tqdm.write(msg, file=sys.stderr)  # noqa: E731  (keeps the bar intact)
    api_key = api_key_of(args)
    check_eodhd_args(args, api_key)
    tickers = collect_tickers(args, log)
    store = NewsStore(args.out_dir, log)
    client = NewsClient(args, api_key, log)
    return finish(args, fetch_all(args, tickers, store, client, log), len(tickers), store, client)


# -----------------------------------------------------------------------------
# command line: typed flag values, so a bad one is refused by the parser before anything runs

MAX_WAIT_S = 86400.0  # a day; far larger values overflow sleep() and socket timeouts


def int_flag(lo: int, hi: float, rule: str):
    def parse(s: str) -> int:
        try:
            n = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {s!r}")
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {n}")
        return n

    return parse


def seconds_flag(allow_zero: bool):
    def parse(s: str) -> float:
        try:
            x = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds, got {s!r}")
        if not (0.0 <= x <= MAX_WAIT_S) or (x == 0.0 and not allow_zero):  # nan fails every comparison
            rule = "between 0 and" if allow_zero else "more than 0 and at most"
            raise argparse.ArgumentTypeError(f"must be {rule} {MAX_WAIT_S:.0f} seconds, got {s!r}")
        return x

    return parse


page_size = int_flag(1, 1000, "between 1 and 1000 (EODHD's largest page)")
positive_int = int_flag(1, math.inf, "at least 1")
non_negative_int = int_flag(0, math.inf, "0 or more")
positive_seconds = seconds_flag(allow_zero=False)
non_negative_seconds = seconds_flag(allow_zero=True)


def iso_date(s: str) -> str:
    with contextlib.suppress(ValueError):
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s) and dt.date.fromisoformat(s):
            return s
    raise argparse.ArgumentTypeError(f"must be a date as YYYY-MM-DD, got {s!r}")


def folder(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return s


HELP = {  # every flag's help, each stating its default
    "source": "market: offline reports from bundled historical series; eodhd: news from the EODHD "
    "API (default: %(default)s)",
    "out_dir": "where finance_corpus.txt (and for eodhd news.jsonl, progress and the S&P 500 "
    "list cache) are written (default: %(default)s)",
    "tickers": "comma-separated tickers with exchange, e.g. AAPL.US,MSFT.US; no suffix means .US "
    "(default: none)",
    "tickers_file": "file with tickers, one or more per line, '#' starts a comment (default: none)",
    "sp500": f"add the S&P 500 constituents: downloaded from --sp500-url when online, cached as "
    f"<out-dir>/{SP500_CACHE} for offline runs; BRK.B becomes BRK-B.US (default: off)",
    "sp500_url": "CSV with a Symbol column listing the S&P 500 (default: %(default)s)",
    "date_from": "oldest article date, YYYY-MM-DD (default: none, the API's own range)",
    "date_to": "newest article date, YYYY-MM-DD (default: none)",
    "limit": "articles per request, 1-1000 (default: %(default)s)",
    "max_pages": "stop each ticker after this many requests this run; a rerun continues "
    "(default: no cap, page until an empty page)",
    "api_key": "EODHD API token; never printed or stored (default: $EODHD_API_KEY; 'demo' serves "
    "AAPL.US and TSLA.US)",
    "base_url": f"API root; requests go to <base-url>/news (default: $EODHD_BASE_URL or {BASE_URL})",
    "timeout": "seconds to wait for a connection or an answer, at most a day (default: %(default)s)",
    "max_retries": "retries of one request after 429, 5xx, timeouts or invalid JSON before the ticker "
    "is skipped (default: %(default)s)",
    "backoff_base": "first retry wait in seconds, doubled each retry, with jitter; a 429's Retry-After "
    "overrides it (default: %(default)s)",
    "backoff_max": "cap on one wait before a retry in seconds, a 429's Retry-After included: a server "
    "asking for longer is retried after this long (default: %(default)s)",
    "restart": "ignore recorded progress and page every ticker from offset 0; stored articles are "
    "still not duplicated (default: off, resume)",
}
EPILOG = (
    "exit codes: 0 done (skipped tickers are listed in the summary); 2 bad input, an output that "
    "cannot be written, or a rejected API key; "
    "3 EODHD daily quota spent (everything fetched is kept; rerun the same command to resume); "
    "130 interrupted with Ctrl-C (the same: kept, rerun to resume). "
    "--source eodhd writes news.jsonl, news_progress.json and finance_corpus.txt into --out-dir."
)


def build_parser() -> argparse.ArgumentParser:
    about = __doc__.split("\n\n")[0].strip() + " See the module docstring for details."
    p = market_corpus.ArgumentParser(description=about, epilog=EPILOG)  # bad flags: one line, exit 2
    p.add_argument("--source", choices=["market", "eodhd"], default=SOURCE, help=HELP["source"])
    p.add_argument("--out-dir", type=folder, default=OUT_DIR, help=HELP["out_dir"])
    g = p.add_argument_group("eodhd source")
    g.add_argument("--tickers", help=HELP["tickers"])
    g.add_argument("--tickers-file", help=HELP["tickers_file"])
    g.add_argument("--sp500", action="store_true", help=HELP["sp500"])
    g.add_argument("--sp500-url", default=SP500_URL, help=HELP["sp500_url"])
    g.add_argument("--from", dest="date_from", type=iso_date, metavar="YYYY-MM-DD", help=HELP["date_from"])
    g.add_argument("--to", dest="date_to", type=iso_date, metavar="YYYY-MM-DD", help=HELP["date_to"])
    g.add_argument("--limit", type=page_size, default=LIMIT, help=HELP["limit"])
    g.add_argument("--max-pages", type=positive_int, help=HELP["max_pages"])
    g.add_argument("--api-key", help=HELP["api_key"])
    g.add_argument("--base-url", default=os.environ.get("EODHD_BASE_URL", BASE_URL), help=HELP["base_url"])
    g.add_argument("--timeout", type=positive_seconds, default=TIMEOUT_S, help=HELP["timeout"])
    g.add_argument("--max-retries", type=non_negative_int, default=MAX_RETRIES, help=HELP["max_retries"])
    g.add_argument(
        "--backoff-base", type=non_negative_seconds, default=BACKOFF_BASE_S, help=HELP["backoff_base"]
    )
    g.add_argument(
        "--backoff-max", type=non_negative_seconds, default=BACKOFF_MAX_S, help=HELP["backoff_max"]
    )
    g.add_argument("--restart", action="store_true", help=HELP["restart"])
    return p


EODHD_ONLY = ("tickers", "tickers_file", "sp500", "date_from", "date_to", "max_pages", "api_key", "restart")


def stop_line(e: BaseException, args, redact: Redactor) -> str:
    """The one stderr line of a run stopped by a user mistake, a failed write or Ctrl-C."""
    if isinstance(e, UserError):
        return f"error: {redact(e)}"
    market = args.source == "market"
    corpus = os.path.join(args.out_dir, CORPUS_NAME)
    # the market corpus is written whole through a temp file: all of it or none of it
    kept = f"nothing written, {corpus} left as it was" if market else eodhd_kept(args.out_dir)
    if isinstance(e, KeyboardInterrupt):
        again = "build it" if market else "resume"
        return redact(f"interrupted: {kept}; {RERUN} to {again}")
    # a failed write() does not say which file: the market source writes only one
    where = e.filename or (corpus if market else f"to {args.out_dir}")
    return redact(f"error: cannot write {where} ({e.strerror or e}); {kept}; fix that and {RERUN}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    redact = Redactor(api_key_of(args))
    created = first_missing(args.out_dir)  # folders this run makes; a run that fails removes them again
    try:
        if args.source == "eodhd":
            return run_eodhd(args)
        used = [n for n in EODHD_ONLY if getattr(args, n) not in (None, False)]
        if used:
            flag = "--" + used[0].replace("_", "-").replace("date-", "")  # date_from is --from
            raise UserError(f"{flag} only applies to --source eodhd")
        run_market(args.out_dir)
        return 0
    except FolderBusy as e:  # another run's folder: nothing in it is ours to remove
        print(f"error: {redact(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # user mistakes; disk full or permissions changed mid-run (the machine's problem, not a bug); Ctrl-C
    except (UserError, OSError, KeyboardInterrupt) as e:
        remove_created(created, args.out_dir)
        print(stop_line(e, args, redact), file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else EXIT_BAD_INPUT
    except Exception:  # a bug: show the traceback, but never the key
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


if __name__ == "__main__":
    sys.exit(main())
