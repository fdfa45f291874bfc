"""
Build the finance text corpus that every model in this project trains on.

Two sources, one output format (UTF-8, documents separated by exactly one blank line):

  python fetch_news.py --source market            # offline default -> data/finance_corpus.txt
  python fetch_news.py --source eodhd --api-key demo --tickers AAPL.US,TSLA.US

--source market writes the offline corpus of market_corpus.py: news-style stories from several desks
(equities, oil, volatility, rates and credit, macro releases, factor returns, weekly to annual wraps)
written from real historical series shipped inside installed packages (arch.data, statsmodels). Every
figure is computed from the data and the wording is seeded by desk and date, so the file is
byte-identical on every run and machine.

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
import os
import random
import re
import sys
import tempfile
import time
import traceback
import urllib.parse

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

EXIT_BAD_INPUT = 2  # bad flags, files or API key: one line on stderr
EXIT_QUOTA = 3  # daily quota spent: everything fetched is kept, rerun resumes


class UserError(Exception):
    """A mistake the user can fix: reported as one line on stderr, exit code 2."""


class FolderBusy(UserError):
    """Another run holds --out-dir: its files are not ours to tidy up."""


# -----------------------------------------------------------------------------
# shared file helpers


def fsync_dir(path: str) -> None:
    # os.replace is atomic, but the rename itself only survives a power cut once the
    # directory entry is on disk too
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    fsync_dir(d)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def check_writable_dir(path: str, flag: str) -> None:
    """Refuse an output folder that cannot be written, before any work is done: it is a file, it
    lies under a file, or its nearest existing folder does not let us create files. Probing with a
    temp file answers for read-only mounts, modes and ACLs alike, and creates no folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path} lies under a file ({probe})")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable ({e.strerror})")


def check_output_files(out_dir: str, names) -> None:
    """A folder where an output file should be would only fail at os.replace, after the work."""
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder, not a file; move it away or use another --out-dir")


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


def write_corpus(path: str, docs: list[str]) -> bytes:
    """The project-wide corpus format: documents joined by one blank line, trailing newline."""
    docs = [d.strip() for d in docs]
    assert all(docs) and not any("\n\n" in d for d in docs), "documents must be non-empty, no blank lines"
    data = ("\n\n".join(docs) + "\n").encode("utf-8")
    atomic_write_bytes(path, data)
    return data


def run_market(out_dir: str) -> None:
    path = os.path.join(out_dir, CORPUS_NAME)
    check_writable_dir(out_dir, "--out-dir")
    check_output_files(out_dir, [CORPUS_NAME])
    print(f"building the market corpus for {path} ...", file=sys.stderr, flush=True)
    docs = market_corpus.build_market_docs()
    data = write_corpus(path, docs)
    print(f"wrote {path}: {len(docs):,} documents, {len(data):,} bytes, {len(data.decode('utf-8')):,} characters")


# -----------------------------------------------------------------------------
# eodhd: the API key never leaves the process (requests puts it in URLs, and URLs end up
# in exception messages, so every message we print goes through redact())


class Redactor:
    def __init__(self, secret: str):
        self.secrets = [s for s in {secret, urllib.parse.quote(secret, safe=""),
                                    urllib.parse.quote_plus(secret)} if s]

    def __call__(self, text) -> str:
        text = str(text)
        for s in self.secrets:
            text = text.replace(s, "***")
        return re.sub(r"(api_token=)[^&\s'\"]+", r"\1***", text)


class AuthError(UserError):
    pass


class QuotaExhausted(Exception):
    pass


class TickerNotFound(Exception):
    pass


class TickerFailed(Exception):
    pass


class NewsClient:
    """GET {base_url}/news with retries. Returns one page (a list of article dicts) or raises:
    AuthError (401/403), QuotaExhausted (402), TickerNotFound (404), TickerFailed (gave up)."""

    def __init__(self, base_url, api_key, timeout, max_retries, backoff_base, backoff_max, log):
        self.url = base_url.rstrip("/") + "/news"
        self.api_key, self.timeout, self.log = api_key, timeout, log
        self.max_retries, self.backoff_base, self.backoff_max = max_retries, backoff_base, backoff_max
        self.redact = Redactor(api_key)
        self.session = requests.Session()  # one connection pool: keep-alive across pages and tickers
        self.session.headers["User-Agent"] = "fetch_news.py (finance corpus builder)"
        self.requests_ok = 0  # requests answered 200: each costs CALLS_PER_NEWS_REQUEST API calls
        self.jitter = random.Random()  # jitter de-synchronises clients; it does not need to be reproducible

    def backoff(self, attempt: int) -> float:
        # exponential backoff with jitter: base * 2^attempt, scaled by a random factor in [0.5, 1]
        return min(self.backoff_max, self.backoff_base * (2 ** attempt)) * (0.5 + 0.5 * self.jitter.random())

    @staticmethod
    def retry_after(resp):
        value = resp.headers.get("Retry-After", "").strip()
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:  # the HTTP-date form
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            return None

    def rate_limited(self, resp, attempt: int) -> tuple:
        """(reason, wait) for a 429. Retry-After is honoured up to --backoff-max: a server asking for
        a day's pause must not stall the fetch for a day."""
        ra = self.retry_after(resp)
        if ra is None:
            return "rate limited (HTTP 429)", self.backoff(attempt)
        if ra <= self.backoff_max:
            return "rate limited (HTTP 429)", ra
        return (f"rate limited (HTTP 429): server asked Retry-After {ra:.0f} s; "
                f"waiting {self.backoff_max:g} s (--backoff-max)", self.backoff_max)

    def page(self, ticker: str, offset: int, limit: int, date_from, date_to) -> list:
        params = {"s": ticker, "offset": offset, "limit": limit, "api_token": self.api_key, "fmt": "json"}
        if date_from:
            params["from"] = date_from
        if date_to:
            params["to"] = date_to
        where = f"{ticker} offset {offset}"
        for attempt in range(self.max_retries + 1):
            try:
                resp = self.session.get(self.url, params=params, timeout=self.timeout)
            except requests.RequestException as e:  # timeouts, refused and reset connections
                reason, wait = f"{type(e).__name__}: {self.redact(e)}", self.backoff(attempt)
            else:
                code = resp.status_code
                if code == 200:
                    self.requests_ok += 1
                    try:
                        items = json.loads(resp.text)
                    except ValueError:
                        items = None
                    if isinstance(items, list):
                        return items
                    reason = "answer is not a JSON list of articles"
                    wait = self.backoff(attempt)
                elif code in (401, 403):
                    body = " ".join(resp.text.split())[:80] or resp.reason
                    raise AuthError(f"EODHD rejected the API key (HTTP {code}: {self.redact(body)}); "
                                    f"pass a valid --api-key or set EODHD_API_KEY")
                elif code == 402:
                    raise QuotaExhausted()
                elif code == 404:
                    raise TickerNotFound()
                elif code == 429:
                    reason, wait = self.rate_limited(resp, attempt)
                elif code >= 500:
                    reason, wait = f"server error (HTTP {code})", self.backoff(attempt)
                else:  # other 4xx: retrying the same request cannot help
                    body = " ".join(resp.text.split())[:120]
                    raise TickerFailed(f"HTTP {code}: {self.redact(body)}")
            if attempt == self.max_retries:
                raise TickerFailed(f"{reason}; gave up after {attempt + 1} attempts")
            self.log(f"{where}: {reason}; retry {attempt + 1}/{self.max_retries} in {wait:.2f}s")
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
            if line.endswith(b"\n"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    pass
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
            raise FolderBusy(f"another fetch_news.py run is writing to {out_dir}; "
                             f"wait for it or use another --out-dir")
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
            self.log(f"{self.path}: dropped {bad} incomplete line(s) left by an interrupted run; "
                     f"their articles are fetched again")
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
        new, merges = [], {}
        for a in items:
            if not isinstance(a, dict):
                continue
            k = article_key(a)
            if k in self.tickers:
                if ticker not in self.tickers[k]:
                    self.tickers[k].add(ticker)
                    m = merges.setdefault(k, {"link": k, "tickers": set(), "symbols": set()})
                    m["tickers"].add(ticker)
                    m["symbols"].update(str_list(a.get("symbols")))
                continue
            rec = dict(a)
            rec["link"] = k
            rec["tickers"] = [ticker]
            self.tickers[k] = {ticker}
            new.append(rec)
        if new:
            append_fsync(self.path, jsonl_bytes(new))
        if merges:
            append_fsync(self.merges_path, jsonl_bytes(
                {"link": m["link"], "tickers": sorted(m["tickers"]), "symbols": sorted(m["symbols"])}
                for m in merges.values()))
        return len(new)

    def save_progress(self, ticker: str, state: dict) -> None:
        self.progress[ticker] = state
        atomic_write_bytes(self.progress_path, json.dumps(self.progress, indent=1, sort_keys=True).encode())


# -----------------------------------------------------------------------------
# eodhd: tickers


TICKER_RE = re.compile(r"^[A-Z0-9^][A-Z0-9.\-_=]*$")


def normalise_ticker(t: str) -> str:
    t = t.strip().upper()
    if not TICKER_RE.match(t):
        raise UserError(f"not a ticker: {t!r} (expected e.g. AAPL.US)")
    return t if "." in t else t + ".US"  # EODHD needs the exchange; US is the common case


def sp500_symbol_to_eodhd(sym: str) -> str:
    # class shares: the constituents list writes BRK.B, EODHD wants BRK-B.US
    return sym.strip().upper().replace(".", "-") + ".US"


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
        atomic_write_bytes(cache, r.text.encode("utf-8"))
    except (requests.RequestException, ValueError) as e:
        why = type(e).__name__ if isinstance(e, requests.RequestException) else str(e)
        if not os.path.exists(cache):
            raise UserError(f"cannot get the S&P 500 list from {url} ({why}) and there is no cached copy at {cache}")
        log(f"S&P 500 list not downloaded ({why}); using the cached {cache}")
        with open(cache, encoding="utf-8") as f:
            syms = sp500_symbols(f.read())
        if not syms:
            raise UserError(f"{cache} has no Symbol column; delete it and run again online")
    return [sp500_symbol_to_eodhd(s) for s in syms]


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
    re.IGNORECASE)


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


class _NothingToWrite(Exception):
    pass


def write_news_corpus(out_dir: str) -> tuple:
    """news.jsonl -> finance_corpus.txt, sorted by (date, link); empty and repeated bodies dropped
    (the earliest copy is kept). Holds only (date, link, offset) per article and a hash per body
    in memory; the articles themselves are read back one at a time."""
    src_path, path = os.path.join(out_dir, "news.jsonl"), os.path.join(out_dir, CORPUS_NAME)
    order = sorted((date_key(obj.get("date", "")), article_key(obj), off)
                   for off, obj in scan_jsonl(src_path) if obj is not None)
    n_docs, n_bytes, seen_bodies = 0, 0, set()
    if not order:
        return path, 0, 0
    try:
        with atomic_open(path) as out, open(src_path, "rb") as src:
            for _, _, off in order:
                src.seek(off)
                title, body = news_doc(json.loads(src.readline()))
                h = hashlib.sha256(body.encode("utf-8")).digest()
                if not body or h in seen_bodies:
                    continue
                seen_bodies.add(h)
                doc = (f"{title}\n{body}" if title else body).encode("utf-8")
                out.write((b"\n\n" if n_docs else b"") + doc)
                n_docs += 1
                n_bytes += len(doc) + (2 if n_docs > 1 else 0)
            if n_docs == 0:
                raise _NothingToWrite
            out.write(b"\n")
    except _NothingToWrite:  # leave an existing corpus (e.g. the market one) as it was
        return path, 0, 0
    return path, n_docs, n_bytes + 1


# -----------------------------------------------------------------------------
# eodhd: the fetch loop

EODHD_OUTPUTS = ("news.jsonl", "news_merges.jsonl", "news_progress.json", "news.lock", CORPUS_NAME,
                 SP500_CACHE)


def eodhd_kept(out_dir: str) -> str:
    """What a stopped run leaves behind, for its last line; read from disk, whatever stopped the run."""
    path = os.path.join(out_dir, "news.jsonl")
    try:
        n = len({article_key(obj) for _, obj in scan_jsonl(path) if obj is not None})
    except OSError:
        return f"the articles stored so far are kept in {path}"
    return f"{n} articles kept in {path}" if n else "no articles stored yet"


def run_eodhd(args) -> int:
    log = lambda msg: tqdm.write(msg, file=sys.stderr)  # noqa: E731  (keeps the bar intact)
    api_key = args.api_key if args.api_key is not None else os.environ.get("EODHD_API_KEY", "")
    if not api_key.strip():
        raise UserError("no API key: pass --api-key or set EODHD_API_KEY (--api-key demo serves AAPL.US and TSLA.US)")
    redact = Redactor(api_key)
    if args.date_from and args.date_to and args.date_from > args.date_to:
        raise UserError(f"--from {args.date_from} is after --to {args.date_to}")
    if not re.match(r"^https?://", args.base_url):
        raise UserError(f"--base-url must start with http:// or https://, got {redact(args.base_url)!r}")
    # every output is checked before the first request (the S&P 500 list cache included)
    check_writable_dir(args.out_dir, "--out-dir")
    check_output_files(args.out_dir, EODHD_OUTPUTS)

    tickers = collect_tickers(args, log)
    store = NewsStore(args.out_dir, log)
    client = NewsClient(args.base_url, api_key, args.timeout, args.max_retries, args.backoff_base,
                        args.backoff_max, log)
    query = {"from": args.date_from, "to": args.date_to}
    done, already, unfinished, skipped, new_total = 0, 0, [], {}, 0
    stop, bar = None, None
    try:
        for ticker in tickers:
            st = store.progress.get(ticker)
            st = st if isinstance(st, dict) else {}
            same_query = not args.restart and st.get("from") == query["from"] and st.get("to") == query["to"]
            if same_query and st.get("done"):
                already += 1
                continue
            offset = st.get("offset", 0) if same_query else 0
            offset = offset if isinstance(offset, int) and offset >= 0 else 0
            pages = 0
            while True:
                if args.max_pages is not None and pages >= args.max_pages:
                    unfinished.append(ticker)
                    break
                try:
                    items = client.page(ticker, offset, args.limit, args.date_from, args.date_to)
                except TickerNotFound:
                    items, skipped[ticker] = None, "unknown ticker (HTTP 404)"
                    log(f"{ticker}: unknown ticker (HTTP 404), skipped")
                except TickerFailed as e:
                    items, skipped[ticker] = None, str(e)
                    log(f"{ticker}: skipped: {e}")
                if bar is None:  # shown only once the API took the key: a rejected key prints one line
                    bar = tqdm(total=len(tickers), initial=already, desc="news", unit="ticker",
                               file=sys.stderr, dynamic_ncols=True)
                if items is None:
                    break
                pages += 1
                bar.set_postfix(new=new_total, calls=client.requests_ok * CALLS_PER_NEWS_REQUEST)
                if not items:  # only an empty page ends a ticker: short pages happen mid-stream
                    store.save_progress(ticker, dict(query, offset=offset, done=True))
                    done += 1
                    break
                new_total += store.add_page(ticker, items)
                offset += len(items)  # advance by what came back, not by --limit
                store.save_progress(ticker, dict(query, offset=offset, done=False))
            if bar is not None:
                bar.update(1)
    except QuotaExhausted:
        stop = "quota"
    except AuthError:
        store.compact()
        raise
    except KeyboardInterrupt:
        stop = "interrupt"
    finally:
        if bar is not None:
            bar.close()

    total = store.compact()
    path, n_docs, n_bytes = write_news_corpus(args.out_dir)
    calls = client.requests_ok * CALLS_PER_NEWS_REQUEST
    print(f"tickers: {done} done, {already} already complete, {len(skipped)} skipped, "
          f"{len(unfinished)} unfinished (--max-pages), {len(tickers)} requested")
    for t, why in skipped.items():
        print(f"  skipped {t}: {why}")
    print(f"articles: {new_total} new, {total} total in {store.path}")
    print(f"API calls spent: {calls} ({client.requests_ok} news requests x {CALLS_PER_NEWS_REQUEST})")
    if n_docs:
        print(f"corpus: {path}, {n_docs} documents, {n_bytes:,} bytes")
    else:
        print(f"corpus: no usable articles yet; {path} left as it was")
    if stop == "quota":
        print("stopped: the EODHD daily API quota is spent (HTTP 402). Everything fetched is saved; run the "
              "same command again after the quota resets to resume where it stopped.", file=sys.stderr)
        return EXIT_QUOTA
    if stop == "interrupt":
        print(f"interrupted: {eodhd_kept(args.out_dir)}; run the same command again to resume",
              file=sys.stderr)
        return 130
    if unfinished:
        print(f"{len(unfinished)} tickers stopped at --max-pages; run the same command again to continue them.")
    return 0


# -----------------------------------------------------------------------------
# command line


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage block; one line says it better
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see --help)\n")


# typed flag values: a bad one is refused by the parser, before anything runs

MAX_WAIT_S = 86400.0  # a day; far larger values overflow sleep() and socket timeouts


def whole_number(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {s!r}")


def page_size(s: str) -> int:
    n = whole_number(s)
    if not 1 <= n <= 1000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000 (EODHD's largest page), got {n}")
    return n


def positive_int(s: str) -> int:
    n = whole_number(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def non_negative_int(s: str) -> int:
    n = whole_number(s)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def seconds(s: str, allow_zero: bool) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {s!r}")
    if not (0.0 <= x <= MAX_WAIT_S) or (x == 0.0 and not allow_zero):  # nan fails every comparison
        rule = "between 0 and" if allow_zero else "more than 0 and at most"
        raise argparse.ArgumentTypeError(f"must be {rule} {MAX_WAIT_S:.0f} seconds, got {s!r}")
    return x


def positive_seconds(s: str) -> float:
    return seconds(s, allow_zero=False)


def non_negative_seconds(s: str) -> float:
    return seconds(s, allow_zero=True)


def iso_date(s: str) -> str:
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
            raise ValueError
        dt.date.fromisoformat(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date as YYYY-MM-DD, got {s!r}")
    return s


def folder(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return s


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        description=__doc__.split("\n\n")[0].strip() + " See the module docstring for details.",
        epilog="exit codes: 0 done (skipped tickers are listed in the summary); 2 bad input, an output that "
               "cannot be written, or a rejected API key; "
               "3 EODHD daily quota spent (everything fetched is kept; rerun the same command to resume); "
               "130 interrupted with Ctrl-C (the same: kept, rerun to resume). "
               "--source eodhd writes news.jsonl, news_progress.json and finance_corpus.txt into --out-dir.")
    p.add_argument("--source", choices=["market", "eodhd"], default=SOURCE,
                   help="market: offline reports from bundled historical series; eodhd: news from the EODHD "
                        "API (default: %(default)s)")
    p.add_argument("--out-dir", type=folder, default=OUT_DIR,
                   help="where finance_corpus.txt (and for eodhd news.jsonl, progress and the S&P 500 "
                        "list cache) are written (default: %(default)s)")
    g = p.add_argument_group("eodhd source")
    g.add_argument("--tickers", default=None,
                   help="comma-separated tickers with exchange, e.g. AAPL.US,MSFT.US; no suffix means .US "
                        "(default: none)")
    g.add_argument("--tickers-file", default=None,
                   help="file with tickers, one or more per line, '#' starts a comment (default: none)")
    g.add_argument("--sp500", action="store_true",
                   help=f"add the S&P 500 constituents: downloaded from --sp500-url when online, cached as "
                        f"<out-dir>/{SP500_CACHE} for offline runs; BRK.B becomes BRK-B.US (default: off)")
    g.add_argument("--sp500-url", default=SP500_URL,
                   help="CSV with a Symbol column listing the S&P 500 (default: %(default)s)")
    g.add_argument("--from", dest="date_from", type=iso_date, default=None, metavar="YYYY-MM-DD",
                   help="oldest article date, YYYY-MM-DD (default: none, the API's own range)")
    g.add_argument("--to", dest="date_to", type=iso_date, default=None, metavar="YYYY-MM-DD",
                   help="newest article date, YYYY-MM-DD (default: none)")
    g.add_argument("--limit", type=page_size, default=LIMIT,
                   help="articles per request, 1-1000 (default: %(default)s)")
    g.add_argument("--max-pages", type=positive_int, default=None,
                   help="stop each ticker after this many requests this run; a rerun continues "
                        "(default: no cap, page until an empty page)")
    g.add_argument("--api-key", default=None,
                   help="EODHD API token; never printed or stored (default: $EODHD_API_KEY; 'demo' serves "
                        "AAPL.US and TSLA.US)")
    g.add_argument("--base-url", default=os.environ.get("EODHD_BASE_URL", BASE_URL),
                   help=f"API root; requests go to <base-url>/news (default: $EODHD_BASE_URL or {BASE_URL})")
    g.add_argument("--timeout", type=positive_seconds, default=TIMEOUT_S,
                   help="seconds to wait for a connection or an answer, at most a day (default: %(default)s)")
    g.add_argument("--max-retries", type=non_negative_int, default=MAX_RETRIES,
                   help="retries of one request after 429, 5xx, timeouts or invalid JSON before the ticker "
                        "is skipped (default: %(default)s)")
    g.add_argument("--backoff-base", type=non_negative_seconds, default=BACKOFF_BASE_S,
                   help="first retry wait in seconds, doubled each retry, with jitter; a 429's Retry-After "
                        "overrides it (default: %(default)s)")
    g.add_argument("--backoff-max", type=non_negative_seconds, default=BACKOFF_MAX_S,
                   help="cap on one wait before a retry in seconds, a 429's Retry-After included: a server "
                        "asking for longer is retried after this long (default: %(default)s)")
    g.add_argument("--restart", action="store_true",
                   help="ignore recorded progress and page every ticker from offset 0; stored articles are "
                        "still not duplicated (default: off, resume)")
    return p


EODHD_ONLY = ("tickers", "tickers_file", "sp500", "date_from", "date_to", "max_pages", "api_key", "restart")


def kept_note(args) -> str:
    if args.source == "market":  # written whole through a temp file: all of it or none of it
        return f"nothing written, {os.path.join(args.out_dir, CORPUS_NAME)} left as it was"
    return eodhd_kept(args.out_dir)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    key = args.api_key if args.api_key is not None else os.environ.get("EODHD_API_KEY", "")
    redact = Redactor(key)
    created = first_missing(args.out_dir)  # folders this run makes; a run that fails removes them again
    try:
        if args.source == "market":
            used = [n for n in EODHD_ONLY if getattr(args, n) not in (None, False)]
            if used:
                raise UserError(f"--{used[0].replace('_', '-').replace('date-', '')} only applies to --source eodhd")
            run_market(args.out_dir)
            return 0
        return run_eodhd(args)
    except FolderBusy as e:
        print(f"error: {redact(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except UserError as e:
        remove_created(created, args.out_dir)
        print(f"error: {redact(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # disk full, permissions changed mid-run: the machine's problem, not a bug
        remove_created(created, args.out_dir)
        if e.filename:
            where = e.filename
        else:  # a failed write() does not say which file: the market source writes only one
            where = os.path.join(args.out_dir, CORPUS_NAME) if args.source == "market" else f"to {args.out_dir}"
        print(redact(f"error: cannot write {where} ({e.strerror or e}); {kept_note(args)}; "
                     f"fix that and run the same command again"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        remove_created(created, args.out_dir)
        again = "build it" if args.source == "market" else "resume"
        print(redact(f"interrupted: {kept_note(args)}; run the same command again to {again}"),
              file=sys.stderr)
        return 130
    except Exception:  # a bug: show the traceback, but never the key
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


if __name__ == "__main__":
    sys.exit(main())
