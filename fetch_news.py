"""
Build the finance text corpus that every model in this project trains on.

Two sources, one output format (UTF-8, documents separated by exactly one blank line):

  python fetch_news.py --source market            # offline default -> data/finance_corpus.txt
  python fetch_news.py --source eodhd --api-key demo --tickers AAPL.US,TSLA.US

--source market turns real historical series shipped inside installed packages (arch.data:
S&P 500 and NASDAQ daily OHLCV 1999-2018, VIX, WTI spot, Brent/WTI monthly, Moody's Aaa/Baa
yields, core CPI, Fama-French factors; statsmodels: US quarterly macro 1959-2009) into daily,
weekly, monthly, quarterly and annual market reports. Every figure in the text is computed from
the data with plain Python floats (math.fsum), and the phrasing is picked by a random.Random seeded with the
document's kind and date, so the file is byte-identical on every run and machine.

--source eodhd pages through the EODHD financial-news API for a list of tickers into
news.jsonl (one article per line, de-duplicated by link, resumable after kill -9) and then
writes finance_corpus.txt beside it.
"""

import argparse
import bisect
import contextlib
import csv
import datetime as dt
import email.utils
import gzip
import hashlib
import html
import importlib.resources
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

import requests
from tqdm import tqdm

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


# -----------------------------------------------------------------------------
# market corpus: load the bundled series (csv + gzip only, no pandas, so parsing and
# arithmetic cannot drift with library versions)

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _read_rows(package: str, *parts: str) -> list[list[str]]:
    res = importlib.resources.files(package).joinpath(*parts)
    raw = res.read_bytes()
    if parts[-1].endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8-sig")  # crude.csv starts with a byte-order mark
    rows = list(csv.reader(io.StringIO(text)))
    return [r for r in rows[1:] if r]


def _parse_date(s: str) -> dt.date:
    s = s.strip()
    if "/" in s:  # FRED-style m/d/Y
        m, d, y = (int(x) for x in s.split("/"))
        return dt.date(y, m, d)
    return dt.date.fromisoformat(s)


def _num(s: str):
    s = s.strip()
    try:
        return float(s)
    except ValueError:  # FRED writes "." for holidays
        return None


class Daily:
    """One daily OHLCV series: a list of dates and a parallel list per column."""

    def __init__(self, dates, cols):
        self.dates, self.cols = dates, cols


def load_ohlcv(name: str) -> Daily:
    rows = _read_rows("arch.data", name, f"{name}.csv.gz")
    dates = [_parse_date(r[0]) for r in rows]
    cols = {k: [float(r[j]) for r in rows] for k, j in
            (("open", 1), ("high", 2), ("low", 3), ("close", 4))}
    cols["volume"] = [int(r[6]) for r in rows]
    return Daily(dates, cols)


def load_single(package: str, parts: tuple, col: int = 1) -> list[tuple[dt.date, float]]:
    out = []
    for r in _read_rows(package, *parts):
        v = _num(r[col])
        if v is not None:
            out.append((_parse_date(r[0]), v))
    return out


def load_market_data() -> dict:
    sp, nq = load_ohlcv("sp500"), load_ohlcv("nasdaq")
    assert sp.dates == nq.dates, "the two equity files share one trading calendar"
    wti = load_single("arch.data", ("wti", "wti.csv.gz"))
    vix = load_single("arch.data", ("vix", "vix.csv.gz"))
    crude = {}
    for r in _read_rows("arch.data", "crude", "crude.csv.gz"):
        d = _parse_date(r[0])
        crude[(d.year, d.month)] = (float(r[1]), float(r[2]))  # (Brent, WTI) monthly averages, dated the 15th
    credit = {}
    for r in _read_rows("arch.data", "default", "default.csv.gz"):
        d = _parse_date(r[0])
        credit[(d.year, d.month)] = (float(r[1]), float(r[2]))  # (Aaa, Baa) monthly averages
    cpi = {}
    for r in _read_rows("arch.data", "core_cpi", "core-cpi.csv.gz"):
        d = _parse_date(r[0])
        cpi[(d.year, d.month)] = float(r[1])
    ff = {}
    for r in _read_rows("arch.data", "frenchdata", "frenchdata.csv.gz"):
        ym = int(r[0])  # yyyymm (arch's own loader mangles this into nanoseconds)
        ff[(ym // 100, ym % 100)] = tuple(float(x) for x in r[1:5])  # Mkt-RF, SMB, HML, RF in %
    macro = {}
    rows = _read_rows("statsmodels.datasets.macrodata", "macrodata.csv")
    for r in rows:
        y, q = int(float(r[0])), int(float(r[1]))
        macro[(y, q)] = dict(gdp=float(r[2]), cons=float(r[3]), inv=float(r[4]), govt=float(r[5]),
                             dpi=float(r[6]), cpi=float(r[7]), m1=float(r[8]), tbill=float(r[9]),
                             unemp=float(r[10]), pop=float(r[11]), infl=float(r[12]), realint=float(r[13]))
    return dict(sp=sp, nq=nq, wti=wti, vix=vix, crude=crude, credit=credit, cpi=cpi, ff=ff, macro=macro)


# -----------------------------------------------------------------------------
# market corpus: arithmetic. math.fsum is exactly rounded and sqrt is correctly rounded under
# IEEE 754, so every figure is the same on every machine and Python version (the built-in sum()
# of floats changed its rounding in Python 3.12).


def pct(new: float, old: float) -> float:
    return (new / old - 1.0) * 100.0


def mean(xs) -> float:
    return math.fsum(xs) / len(xs)


def stdev(xs) -> float:
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) * (x - m) for x in xs) / (len(xs) - 1))


def corr(xs, ys) -> float:
    mx, my = mean(xs), mean(ys)
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = math.fsum((x - mx) * (x - mx) for x in xs)
    syy = math.fsum((y - my) * (y - my) for y in ys)
    return sxy / math.sqrt(sxx * syy)


def ann_vol(returns_pct) -> float:
    return stdev(returns_pct) * math.sqrt(252.0)  # daily % returns -> annualized %


class EquityStats:
    """Per-session indicators for one index, computed once: moving averages, 52-week extremes,
    realized volatility, streaks."""

    def __init__(self, s: Daily):
        c, v = s.cols["close"], s.cols["volume"]
        n = len(c)
        self.ret = [None] + [pct(c[i], c[i - 1]) for i in range(1, n)]
        self.ma = {w: [mean(c[i - w + 1:i + 1]) if i >= w - 1 else None for i in range(n)] for w in (50, 200)}
        # the volume average excludes today, so "today versus normal" is not diluted by today
        self.avg_vol50 = [mean(v[i - 50:i]) if i >= 50 else None for i in range(n)]
        self.vol20 = [ann_vol(self.ret[i - 19:i + 1]) if i >= 20 else None for i in range(n)]
        self.hi252, self.lo252 = [None] * n, [None] * n  # index of the highest / lowest close
        for i in range(251, n):
            w = range(i - 251, i + 1)
            self.hi252[i] = max(w, key=lambda j: (c[j], j))  # latest index wins ties
            self.lo252[i] = min(w, key=lambda j: (c[j], -j))
        self.streak = [0] * n  # +k: k straight higher closes, -k: k straight lower closes
        for i in range(1, n):
            r = self.ret[i]
            if r > 0:
                self.streak[i] = self.streak[i - 1] + 1 if self.streak[i - 1] > 0 else 1
            elif r < 0:
                self.streak[i] = self.streak[i - 1] - 1 if self.streak[i - 1] < 0 else -1
        self.peak = [0] * n  # running all-sample high (index), for drawdown since 1999
        for i in range(1, n):
            self.peak[i] = i if c[i] >= c[self.peak[i - 1]] else self.peak[i - 1]


# -----------------------------------------------------------------------------
# market corpus: formatting and phrasing


def f2(x: float) -> str:
    s = f"{x:,.2f}"
    return "0.00" if s == "-0.00" else s


def fp(x: float) -> str:  # unsigned percentage
    return f"{f2(abs(x))}%"


def fsp(x: float) -> str:  # signed percentage
    s = f2(x)
    return f"{s}%" if s.startswith("-") or s == "0.00" else f"+{s}%"


def fpp(x: float) -> str:  # percentage points, unsigned
    return f"{f2(abs(x))} percentage points"


def fbp(x: float) -> str:
    n = abs(round(x * 100.0))
    return "1 basis point" if n == 1 else f"{n:.0f} basis points"


def fvol(v: float) -> str:
    return f"{v / 1e9:.2f} billion shares" if v >= 1e9 else f"{v / 1e6:.0f} million shares"


def long_date(d: dt.date) -> str:
    return f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}"


def short_date(d: dt.date) -> str:
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def prior_close(d: dt.date, pd: dt.date) -> str:
    """The previous session's close, named from the trading calendar: after a weekend that is usually
    Friday's, but after Good Friday it is Thursday's, and after a closure of a week or more
    (September 2001) a weekday name alone would be ambiguous, so the date is given."""
    if (d - pd).days < 7:
        return f"{WEEKDAYS[pd.weekday()]}'s close"
    return f"the close of {long_date(pd)}"


def month_name(y: int, m: int) -> str:
    return f"{MONTHS[m - 1]} {y}"


def ordinal(k: int) -> str:
    words = {2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth", 7: "seventh", 8: "eighth",
             9: "ninth", 10: "tenth", 11: "eleventh", 12: "twelfth"}
    if k in words:
        return words[k]
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def up_down(x: float) -> str:
    return "up" if x >= 0 else "down"


def higher_lower(x: float) -> str:
    return "higher" if x >= 0 else "lower"


def gain_loss(x: float) -> str:
    return "gain" if x >= 0 else "loss"


def move_verb(x: float, rng: random.Random) -> str:
    """A verb whose strength follows the size of the % move."""
    a = abs(x)
    if a < 0.5:
        words = ["edged up", "inched higher", "ticked up", "crept higher"] if x >= 0 else \
            ["edged down", "slipped", "dipped", "eased"]
    elif a < 1.5:
        words = ["rose", "gained", "advanced", "climbed", "firmed"] if x >= 0 else \
            ["fell", "declined", "lost ground", "retreated", "weakened"]
    elif a < 3.0:
        words = ["jumped", "rallied", "surged", "climbed sharply"] if x >= 0 else \
            ["dropped", "slid", "sank", "fell sharply"]
    else:
        words = ["soared", "rocketed", "leapt"] if x >= 0 else ["tumbled", "plunged", "plummeted"]
    return rng.choice(words)


def move(x: float, rng: random.Random) -> str:
    """'rose 1.23%' or, for moves that round to nothing, 'was little changed (+0.03%)'."""
    if abs(x) < 0.05:
        return f"{rng.choice(['was little changed', 'ended nearly flat', 'barely moved'])} ({fsp(x)})"
    return f"{move_verb(x, rng)} {fp(x)}"


def vol_regime(v: float) -> str:
    if v < 10:
        return "very calm"
    if v < 15:
        return "calm"
    if v < 22:
        return "moderate"
    if v < 35:
        return "elevated"
    return "crisis-level"


def vix_regime(v: float) -> str:
    if v < 12:
        return "unusually low"
    if v < 20:
        return "subdued"
    if v < 30:
        return "elevated"
    return "high, signalling stress"


def pick(rng: random.Random, templates: list[str], **kw) -> str:
    return rng.choice(templates).format(**kw)


def assemble(rng: random.Random, title: str, lead: list[str], body: list[str], keep: float = 0.8) -> str:
    """Title line, then the lead sentences, then a random subset of the body in a shuffled
    order: the same facts come out in many different shapes across documents."""
    body = [b for b in body if b]
    kept = [b for b in body if rng.random() < keep] or body[:1]
    rng.shuffle(kept)
    return title + "\n" + " ".join([x for x in lead if x] + kept)


# -----------------------------------------------------------------------------
# market corpus: cross-asset lookups


class Lookup:
    """Daily (date, value) series with 'value on date' and 'previous value' lookups."""

    def __init__(self, pairs):
        self.dates = [d for d, _ in pairs]
        self.vals = [v for _, v in pairs]
        self.index = {d: i for i, d in enumerate(self.dates)}

    def change(self, d: dt.date):
        """(value, % change vs previous observation, abs change) on date d, or None."""
        i = self.index.get(d)
        if i is None or i == 0:
            return None
        return self.vals[i], pct(self.vals[i], self.vals[i - 1]), self.vals[i] - self.vals[i - 1]

    def last_on_or_before(self, d: dt.date):
        k = bisect.bisect_right(self.dates, d) - 1
        return (self.dates[k], self.vals[k]) if k >= 0 else None


# -----------------------------------------------------------------------------
# market corpus: daily report


def daily_doc(i: int, data: dict, sps: EquityStats, nqs: EquityStats, wti: Lookup, vix: Lookup,
              oil_ret: dict) -> str:
    sp, nq = data["sp"], data["nq"]
    d = sp.dates[i]
    rng = random.Random(f"daily:{d.isoformat()}")
    o, h, l, c, v = (sp.cols[k][i] for k in ("open", "high", "low", "close", "volume"))
    pd, pc = sp.dates[i - 1], sp.cols["close"][i - 1]
    r, pts = sps.ret[i], c - pc
    nc, nr = nq.cols["close"][i], nqs.ret[i]

    title = pick(rng, [
        "Daily market report: {date}",
        "Market close, {date}",
        "Stocks {hl} on {wd}, {sdate}: S&P 500 {spr}, Nasdaq {nqr}",
        "{sdate}: S&P 500 {spr} at {c}",
        "U.S. equities, {date}",
        "Closing bell, {sdate}",
    ], date=long_date(d), sdate=short_date(d), wd=WEEKDAYS[d.weekday()], hl=higher_lower(r),
        spr=fsp(r), nqr=fsp(nr), c=f2(c))

    lead = [pick(rng, [
        "The S&P 500 {mv} to close at {c} on {wd}, a move of {pts} points.",
        "On {wd} the S&P 500 {mv}, or {pts} points, to finish at {c}.",
        "The benchmark S&P 500 finished the session at {c}, {ud} {pts} points ({spr}) from the prior close of {pc}.",
        "U.S. stocks ended {hl} on {wd}, with the S&P 500 closing at {c} ({spr}).",
        "The S&P 500 {mv} on {wd}, settling at {c} against {pc} a session earlier.",
    ], mv=move(r, rng), c=f2(c), pc=f2(pc), wd=WEEKDAYS[d.weekday()], pts=f2(abs(pts)), ud=up_down(r),
        hl=higher_lower(r), spr=fsp(r))]

    body = []
    rng_pct = (h - l) / pc * 100.0
    body.append(pick(rng, [
        "The index traded between {l} and {h}, an intraday range of {rp} of the previous close.",
        "The S&P 500 opened at {o}, reached a high of {h} and a low of {l}.",
        "The day's range ran from {l} to {h} ({rp} of the prior close), after an open of {o}.",
        "Intraday, the index swung {rp} between a low of {l} and a high of {h}.",
    ], o=f2(o), h=f2(h), l=f2(l), rp=fp(rng_pct)))
    gap = pct(o, pc)
    if abs(gap) >= 0.5:
        body.append(pick(rng, [
            "The index gapped {ud} at the open, starting {g} away from the prior close.",
            "The open at {o} was {g} {hl} than {prev}." if (d - pd).days > 1 else
            "The open at {o} was {g} {hl} than the previous close.",
        ], ud=up_down(gap), g=fp(gap), o=f2(o), hl=higher_lower(gap), prev=prior_close(d, pd)))

    diff = nr - r
    rel = ("outperforming" if diff > 0 else "underperforming") + f" the S&P 500 by {fpp(diff)}"
    body.append(pick(rng, [
        "The Nasdaq Composite {mv} to {nc}, {rel}.",
        "Technology-heavy Nasdaq {mv}, closing at {nc}.",
        "On the Nasdaq, the composite index ended at {nc} ({nr}), {rel}.",
        "The Nasdaq Composite closed at {nc}, {ud} {nrabs} on the day.",
    ], mv=move(nr, rng), nc=f2(nc), rel=rel, nr=fsp(nr), ud=up_down(nr), nrabs=fp(nr)))

    av = sps.avg_vol50[i]
    if av:
        vr = pct(v, av)
        cmp_ = "in line with" if abs(vr) < 5 else f"{fp(vr)} {'above' if vr > 0 else 'below'}"
        body.append(pick(rng, [
            "Volume reached {v}, {cmp} the 50-session average of {av}.",
            "Trading activity came to {v}, {cmp} its 50-day average ({av}).",
            "Some {v} changed hands in S&P 500 trading, {cmp} the recent 50-day norm of {av}.",
        ], v=fvol(v), av=fvol(av), cmp=cmp_))

    m50, m200 = sps.ma[50][i], sps.ma[200][i]
    if m200:
        d50, d200 = pct(c, m50), pct(c, m200)
        pm200 = sps.ma[200][i - 1]
        crossed = pm200 is not None and (pc - pm200) * (c - m200) < 0
        if crossed:
            body.append(pick(rng, [
                "The close took the index {ab} its 200-day moving average of {m}, a level many trend followers watch.",
                "With this move the S&P 500 crossed {ab} its 200-day moving average, now at {m}.",
            ], ab="above" if c > m200 else "below", m=f2(m200)))
        else:
            body.append(pick(rng, [
                "The index sits {a50} {ab50} its 50-day moving average ({m50}) and {a200} {ab200} its 200-day average ({m200}).",
                "Against its trend lines, the S&P 500 is {a200} {ab200} the 200-day moving average of {m200} and {a50} {ab50} the 50-day of {m50}.",
                "The 50-day moving average stands at {m50} and the 200-day at {m200}; the close is {a200} {ab200} the longer one.",
            ], a50=fp(d50), ab50="above" if d50 >= 0 else "below", m50=f2(m50),
                a200=fp(d200), ab200="above" if d200 >= 0 else "below", m200=f2(m200)))
        if m50 and sps.ma[50][i - 1] is not None and pm200 is not None:
            pm50 = sps.ma[50][i - 1]
            if (pm50 - pm200) * (m50 - m200) < 0:
                body.append("The 50-day average crossed {} the 200-day average, a pattern chartists call a {}.".format(
                    "above" if m50 > m200 else "below", "golden cross" if m50 > m200 else "death cross"))

    hi = sps.hi252[i]
    if hi is not None:
        cl = sp.cols["close"]
        if hi == i:
            body.append(pick(rng, [
                "The close is a new 52-week high for the index.",
                "That is the highest close in 52 weeks.",
            ]))
        elif sps.lo252[i] == i:
            body.append(pick(rng, [
                "The close is the lowest in 52 weeks, {dd} below the 52-week high of {hv} set on {hd}.",
                "The index finished at a 52-week low, {dd} under its high of {hv} from {hd}.",
            ], dd=fp(pct(c, cl[hi])), hv=f2(cl[hi]), hd=short_date(sp.dates[hi])))
        else:
            dd = pct(c, cl[hi])
            zone = ""
            if dd <= -20:
                zone = ", deep in bear-market territory"
            elif dd <= -10:
                zone = ", in correction territory"
            body.append(pick(rng, [
                "The S&P 500 stands {dd} below its 52-week closing high of {hv}, set on {hd}{z}.",
                "The index is {dd} off the 52-week high of {hv} reached on {hd}{z}.",
                "From the 52-week peak of {hv} ({hd}), the drawdown is {dd}{z}.",
            ], dd=fp(dd), hv=f2(cl[hi]), hd=short_date(sp.dates[hi]), z=zone))
    pk = sps.peak[i]
    if pk != i and pk != hi and pct(c, sp.cols["close"][pk]) <= -15 and rng.random() < 0.5:
        body.append(f"Measured from the highest close since January 1999, {f2(sp.cols['close'][pk])} on "
                    f"{short_date(sp.dates[pk])}, the S&P 500 is down {fp(pct(c, sp.cols['close'][pk]))}.")

    rv = sps.vol20[i]
    if rv is not None:
        body.append(pick(rng, [
            "Twenty-day realized volatility is {rv} annualized, {a} {reg} reading.",
            "Realized volatility over the past 20 sessions runs at {rv} on an annualized basis, which counts as {reg}.",
            "The volatility regime is {reg}: the 20-day realized figure is {rv} annualized.",
        ], rv=fp(rv), reg=vol_regime(rv), a="an" if vol_regime(rv)[0] in "aeiou" else "a"))

    k = sps.streak[i]
    if abs(k) >= 3:
        body.append(pick(rng, [
            "It was the {o} straight {w} for the S&P 500.",
            "The S&P 500 has now closed {hl} for {n} sessions in a row.",
        ], o=ordinal(abs(k)), w="gain" if k > 0 else "decline", hl=higher_lower(k), n=abs(k)))

    # month-to-date and year-to-date, measured from the last close of the previous period
    cl = sp.cols["close"]
    j = i
    while j > 0 and sp.dates[j - 1].month == d.month:
        j -= 1
    mtd = pct(c, cl[j - 1]) if j > 0 else None
    j = i
    while j > 0 and sp.dates[j - 1].year == d.year:
        j -= 1
    ytd = pct(c, cl[j - 1]) if j > 0 else None
    if mtd is not None and ytd is not None:
        body.append(pick(rng, [
            "Month to date the index is {m}; year to date it is {y}.",
            "For {mon} the S&P 500 is {m} so far, and {y} since the start of {yr}.",
            "That leaves the index {yud} {ya} for the year and {mud} {ma} for the month.",
        ], m=fsp(mtd), y=fsp(ytd), yud=up_down(ytd), ya=fp(ytd), mud=up_down(mtd), ma=fp(mtd), mon=MONTHS[d.month - 1], yr=d.year))

    oc = wti.change(d)
    if oc:
        price, orr, _ = oc
        body.append(pick(rng, [
            "West Texas Intermediate crude {mv} to ${p} a barrel.",
            "In commodities, WTI crude oil {mv}, ending at ${p} per barrel.",
            "Oil {mv}, with WTI spot at ${p}.",
        ], mv=move(orr, rng), p=f2(price)))
        if abs(orr) >= 1.0 and abs(r) >= 0.5 and rng.random() < 0.7:
            same = (orr > 0) == (r > 0)
            body.append(pick(rng, [
                "Oil and stocks moved {w} on the day." ,
                "Crude and equities moved {w}: oil {o}, the S&P 500 {s}.",
            ], w="together" if same else "in opposite directions", o=fsp(orr), s=fsp(r)))
        if rng.random() < 0.25:
            xs, ys = [], []
            j = i
            while j > 0 and len(xs) < 60:
                if sp.dates[j] in oil_ret:
                    xs.append(sps.ret[j])
                    ys.append(oil_ret[sp.dates[j]])
                j -= 1
            if len(xs) == 60:
                rho = corr(xs, ys)
                body.append(f"Over the last 60 shared sessions the correlation between daily moves in oil and the "
                            f"S&P 500 is {f2(rho)}.")
    vc = vix.change(d)
    if vc:
        lv, _, ch = vc
        body.append(pick(rng, [
            "The CBOE Volatility Index (VIX) closed at {lv}, {ud} {ch} points, a level that reads as {reg}.",
            "The VIX, Wall Street's fear gauge, {ud2} {ch} points to {lv}, which is {reg}.",
            "Implied volatility, measured by the VIX, finished at {lv} ({ud} {ch} points): {reg}.",
        ], lv=f2(lv), ud=up_down(ch), ud2="rose" if ch >= 0 else "fell", ch=f2(abs(ch)), reg=vix_regime(lv)))
    return assemble(rng, title, lead, body, keep=0.75)


# -----------------------------------------------------------------------------
# market corpus: weekly wrap


def weekly_doc(idx: list[int], prev_close_i: int, data: dict, sps: EquityStats, wti: Lookup, vix: Lookup) -> str:
    sp, nq = data["sp"], data["nq"]
    cl, ncl = sp.cols["close"], nq.cols["close"]
    first, last = idx[0], idx[-1]
    d = sp.dates[last]
    rng = random.Random(f"weekly:{d.isoformat()}")
    wr = pct(cl[last], cl[prev_close_i])
    nwr = pct(ncl[last], ncl[prev_close_i])
    hi_i = max(idx, key=lambda j: sp.cols["high"][j])
    lo_i = min(idx, key=lambda j: sp.cols["low"][j])
    best = max(idx, key=lambda j: sps.ret[j])
    worst = min(idx, key=lambda j: sps.ret[j])
    ups = sum(1 for j in idx if sps.ret[j] > 0)

    title = pick(rng, [
        "Weekly market wrap: week ending {date}",
        "The week on Wall Street, {sd} to {ed}",
        "Week in review: S&P 500 {wr}, Nasdaq {nwr}",
        "Weekly report, {date}",
    ], date=long_date(d), sd=short_date(sp.dates[first]), ed=short_date(d), wr=fsp(wr), nwr=fsp(nwr))
    lead = [pick(rng, [
        "The S&P 500 {mv} over the {n}-session week to close at {c}.",
        "For the week the S&P 500 {mv}, finishing {wd} at {c} after ending the prior week at {pc}.",
        "Stocks posted a weekly {gl}: the S&P 500 ended at {c}, {ud} {a} from {pc}.",
    ], mv=move(wr, rng), n=len(idx), c=f2(cl[last]), pc=f2(cl[prev_close_i]), wd=WEEKDAYS[d.weekday()],
        gl=gain_loss(wr), ud=up_down(wr), a=fp(wr))]
    body = [
        pick(rng, [
            "The Nasdaq Composite {mv} on the week to {nc}.",
            "The Nasdaq ended the week at {nc}, {ud} {a}, {rel} the S&P 500.",
        ], mv=move(nwr, rng), nc=f2(ncl[last]), ud=up_down(nwr), a=fp(nwr),
            rel="ahead of" if nwr > wr else "behind"),
        pick(rng, [
            "The weekly range ran from an intraday low of {lo} on {lod} to a high of {hi} on {hid}.",
            "Intraday, the index touched {hi} at the high ({hid}) and {lo} at the low ({lod}).",
        ], lo=f2(sp.cols["low"][lo_i]), hi=f2(sp.cols["high"][hi_i]), lod=WEEKDAYS[sp.dates[lo_i].weekday()],
            hid=WEEKDAYS[sp.dates[hi_i].weekday()]),
        pick(rng, [
            "The index closed higher on {u} of {n} days.",
            "{u} of the week's {n} sessions ended in the green.",
        ], u=ups, n=len(idx)),
    ]
    if len(idx) > 1:
        body.append(pick(rng, [
            "The best session was {bd} ({br}) and the worst was {wd} ({wr}).",
            "{bd} brought the biggest move up ({br}); {wd} the weakest ({wr}).",
        ], bd=WEEKDAYS[sp.dates[best].weekday()], br=fsp(sps.ret[best]),
            wd=WEEKDAYS[sp.dates[worst].weekday()], wr=fsp(sps.ret[worst])))
    av = sps.avg_vol50[first]
    if av:
        wv = mean([sp.cols["volume"][j] for j in idx])
        body.append(pick(rng, [
            "Average daily volume was {wv}, {cmp} the 50-day norm going into the week.",
            "Turnover averaged {wv} a day against {av} over the prior 50 sessions.",
        ], wv=fvol(wv), av=fvol(av),
            cmp="in line with" if abs(pct(wv, av)) < 5 else f"{fp(pct(wv, av))} {'above' if wv > av else 'below'}"))
    if len(idx) >= 4:
        body.append(f"Annualized, the week's daily moves imply volatility of "
                    f"{fp(ann_vol([sps.ret[j] for j in idx]))}.")
    a = wti.last_on_or_before(d)
    b = wti.last_on_or_before(sp.dates[prev_close_i])
    if a and b and a[0] > sp.dates[prev_close_i]:
        orr = pct(a[1], b[1])
        body.append(pick(rng, [
            "WTI crude {mv} over the week to ${p} a barrel.",
            "Oil finished the week at ${p}, a weekly {gl} of {a}.",
        ], mv=move(orr, rng), p=f2(a[1]), gl=gain_loss(orr), a=fp(orr)))
        if abs(orr) >= 3 and abs(wr) >= 1:
            body.append("Oil and equities {} over the week.".format(
                "rose together" if orr > 0 and wr > 0 else "fell together" if orr < 0 and wr < 0 else "diverged"))
    va = vix.last_on_or_before(d)
    vb = vix.last_on_or_before(sp.dates[prev_close_i])
    if va and vb and va[0] > sp.dates[prev_close_i] and vb[0] >= d - dt.timedelta(days=14):
        body.append(pick(rng, [
            "The VIX ended the week at {v}, {ud} from {pv}.",
            "Implied volatility moved from {pv} to {v} on the VIX, a level that reads as {reg}.",
        ], v=f2(va[1]), pv=f2(vb[1]), ud="up" if va[1] >= vb[1] else "down", reg=vix_regime(va[1])))
    hi = sps.hi252[last]
    if hi is not None and hi != last:
        body.append(f"The S&P 500 ends the week {fp(pct(cl[last], cl[hi]))} below its 52-week closing high of "
                    f"{f2(cl[hi])}.")
    elif hi == last:
        body.append("The S&P 500 ends the week at a 52-week closing high.")
    return assemble(rng, title, lead, body, keep=0.8)


# -----------------------------------------------------------------------------
# market corpus: monthly review (1999-2018, with equities) and rates/credit notes (from 1919)


def macro_sentences(y: int, m: int, data: dict, rng: random.Random, wti_month: dict) -> list[str]:
    """Credit, inflation, factor and oil notes for one month, shared by both monthly kinds.
    Each item is a self-contained group of sentences, so shuffling items keeps the prose coherent."""
    out = []
    credit, cpi, ff, crude = data["credit"], data["cpi"], data["ff"], data["crude"]
    prev = (y - 1, 12) if m == 1 else (y, m - 1)
    prev3 = (y - 1, m + 9) if m <= 3 else (y, m - 3)
    yago = (y - 1, m)
    if (y, m) in credit:
        aaa, baa = credit[(y, m)]
        spread = baa - aaa
        g = [pick(rng, [
            "Moody's seasoned Aaa corporate bonds yielded {aaa} on average and Baa bonds {baa}, a default spread of {sp}.",
            "Corporate borrowing costs: Aaa yields averaged {aaa}, Baa {baa}; the gap between them was {sp}.",
            "The Baa-Aaa credit spread stood at {sp}, with Aaa at {aaa} and Baa at {baa}.",
        ], aaa=fp(aaa), baa=fp(baa), sp=fbp(spread))]
        if prev in credit:
            paaa, pbaa = credit[prev]
            da, ds = aaa - paaa, spread - (pbaa - paaa)
            if abs(da) >= 0.005 and rng.random() < 0.7:
                g.append(f"Aaa yields {'rose' if da > 0 else 'fell'} {fbp(da)} on the month.")
            if abs(ds) >= 0.005:
                g.append(pick(rng, [
                    "The spread {w} by {bp} from the previous month.",
                    "Compared with a month earlier, the spread {w} {bp}.",
                ], w="widened" if ds > 0 else "narrowed", bp=fbp(ds)))
            else:
                g.append("The spread was unchanged from the previous month.")
        if yago in credit and rng.random() < 0.6:
            ys = spread - (credit[yago][1] - credit[yago][0])
            g.append(f"Over twelve months it has {'widened' if ys > 0 else 'narrowed'} by {fbp(ys)}."
                     if abs(ys) >= 0.005 else "It is unchanged from a year ago.")
        out.append(" ".join(g))
    if (y, m) in cpi and prev in cpi:
        mom = pct(cpi[(y, m)], cpi[prev])
        if f2(mom) == "0.00":
            s = pick(rng, ["Core consumer prices (CPI excluding food and energy) were unchanged on the month",
                           "The core CPI index held at {lvl} for the month"], lvl=f"{cpi[(y, m)]:.3f}")
        else:
            s = pick(rng, [
                "Core consumer prices (CPI excluding food and energy) {rf} {mom} on the month",
                "The core CPI index moved {smom} month over month to {lvl}",
                "Core inflation printed {smom} for the month",
            ], rf="rose" if mom > 0 else "fell", mom=fp(mom), smom=fsp(mom), lvl=f"{cpi[(y, m)]:.3f}")
        if yago in cpi:
            yoy = pct(cpi[(y, m)], cpi[yago])
            s += pick(rng, [", for a year-over-year rate of {yoy}.", "; the annual rate is {yoy}.",
                            ", leaving twelve-month core inflation at {yoy}."], yoy=fsp(yoy))
            if prev3 in cpi and rng.random() < 0.5:
                g = cpi[(y, m)] / cpi[prev3]
                ann3 = (g * g * g * g - 1.0) * 100.0  # three-month change compounded to a year
                s += f" Over three months core prices are running at a {fsp(ann3)} annualized pace."
        else:
            s += "."
        out.append(s)
    if (y, m) in ff:
        mkt, smb, hml, rf = ff[(y, m)]
        out.append(pick(rng, [
            "In the Fama-French factors, the market returned {mkt} over the risk-free rate of {rf}; "
            "small caps {sv} large caps by {smb} and value {vv} growth by {hml}.",
            "Factor returns for the month: market excess {mkt}, size (SMB) {ssmb}, value (HML) {shml}, "
            "with one-month Treasury bills paying {rf}.",
            "The broad U.S. stock market returned {tot} including the {rf} risk-free return; the size factor "
            "was {ssmb} and the value factor {shml}.",
        ], mkt=fsp(mkt), rf=fp(rf), smb=fpp(smb), hml=fpp(hml), ssmb=fsp(smb), shml=fsp(hml),
            sv="beat" if smb > 0 else "lagged", vv="beat" if hml > 0 else "lagged", tot=fsp(mkt + rf)))
    if (y, m) in wti_month:
        avg, n = wti_month[(y, m)]
        s = f"WTI crude averaged ${f2(avg)} a barrel over {n} trading days"
        if prev in wti_month:
            s += f", {fp(pct(avg, wti_month[prev][0]))} {'above' if avg >= wti_month[prev][0] else 'below'} " \
                 f"the previous month's average"
        out.append(s + ".")
    if (y, m) in crude:
        brent, w = crude[(y, m)]
        out.append(pick(rng, [
            "For the month, Brent averaged ${b} a barrel and WTI ${w}, putting Brent at a ${asp} {pd}.",
            "The Brent-WTI spread averaged {sp} a barrel in {mon} (Brent ${b}, WTI ${w}).",
        ], b=f2(brent), w=f2(w), sp=f"{'-' if brent < w else ''}${f2(abs(brent - w))}", asp=f2(abs(brent - w)),
            pd="premium" if brent >= w else "discount", mon=MONTHS[m - 1]))
    return out


def monthly_doc(y: int, m: int, idx: list[int], prev_i: int, data: dict, sps: EquityStats, vix: Lookup,
                wti_month: dict) -> str:
    sp, nq = data["sp"], data["nq"]
    cl, ncl = sp.cols["close"], nq.cols["close"]
    last = idx[-1]
    rng = random.Random(f"monthly:{y:04d}-{m:02d}")
    mr, nmr = pct(cl[last], cl[prev_i]), pct(ncl[last], ncl[prev_i])
    j = last
    while j > 0 and sp.dates[j - 1].year == y:
        j -= 1
    ytd = pct(cl[last], cl[j - 1]) if j > 0 else None
    hi_i = max(idx, key=lambda k: cl[k])
    lo_i = min(idx, key=lambda k: cl[k])
    best = max(idx, key=lambda k: sps.ret[k])
    worst = min(idx, key=lambda k: sps.ret[k])
    ups = sum(1 for k in idx if sps.ret[k] > 0)
    title = pick(rng, [
        "Monthly market review: {mon}",
        "{mon} in markets: S&P 500 {mr}, Nasdaq {nmr}",
        "Month-end report, {mon}",
        "Markets in {mon}",
    ], mon=month_name(y, m), mr=fsp(mr), nmr=fsp(nmr))
    lead = [pick(rng, [
        "The S&P 500 {mv} in {mn} to end the month at {c}.",
        "Over {mn} the S&P 500 posted a {gl} of {a}, closing the month at {c}.",
        "U.S. stocks finished {mn} {hl}: the S&P 500 closed at {c}, {ud} {a} from the end of the previous month.",
    ], mv=move(mr, rng), mn=MONTHS[m - 1], c=f2(cl[last]), gl=gain_loss(mr), a=fp(mr), hl=higher_lower(mr),
        ud=up_down(mr))]
    body = [
        pick(rng, [
            "The Nasdaq Composite {mv} over the month to {nc}.",
            "The Nasdaq ended the month at {nc} ({nmr}), {rel} the S&P 500.",
        ], mv=move(nmr, rng), nc=f2(ncl[last]), nmr=fsp(nmr), rel="outperforming" if nmr > mr else "trailing"),
        pick(rng, [
            "The highest close of the month was {hc} on {hd} and the lowest {lc} on {ld}.",
            "Closes ranged from {lc} ({ld}) to {hc} ({hd}).",
        ], hc=f2(cl[hi_i]), hd=short_date(sp.dates[hi_i]), lc=f2(cl[lo_i]), ld=short_date(sp.dates[lo_i])),
        pick(rng, [
            "The index rose on {u} of {n} trading days; the best day was {bd} ({br}) and the worst {wd} ({wr}).",
            "Of {n} sessions, {u} closed higher. The largest daily gain came on {bd} ({br}), the largest drop on {wd} ({wr}).",
        ], u=ups, n=len(idx), bd=short_date(sp.dates[best]), br=fsp(sps.ret[best]),
            wd=short_date(sp.dates[worst]), wr=fsp(sps.ret[worst])),
        f"Realized volatility for the month was {fp(ann_vol([sps.ret[k] for k in idx]))} annualized, "
        f"{vol_regime(ann_vol([sps.ret[k] for k in idx]))} by historical standards.",
    ]
    if ytd is not None and m != 1:
        body.append(pick(rng, ["Year to date the index is {y}.", "That brings the {yr} performance to {y}."],
                         y=fsp(ytd), yr=y))
    vs = [vix.vals[k] for k, dd in enumerate(vix.dates) if dd.year == y and dd.month == m]
    if vs:
        body.append(f"The VIX averaged {f2(mean(vs))} during the month, ranging from {f2(min(vs))} to {f2(max(vs))}.")
    body += macro_sentences(y, m, data, rng, wti_month)
    return assemble(rng, title, lead, body, keep=0.85)


def credit_doc(y: int, m: int, data: dict, wti_month: dict):
    """Pre-1999 months: rates, credit, inflation, factor returns and oil where the data reach."""
    rng = random.Random(f"credit:{y:04d}-{m:02d}")
    sents = macro_sentences(y, m, data, rng, wti_month)
    if not sents:
        return None
    title = pick(rng, [
        "Rates and credit monthly: {mon}", "{mon}: bond yields, spreads and returns",
        "Monthly economic note, {mon}", "Capital markets in {mon}",
    ], mon=month_name(y, m))
    return assemble(rng, title, sents[:1], sents[1:], keep=0.9)


# -----------------------------------------------------------------------------
# market corpus: quarterly macro (statsmodels macrodata, 1959Q1-2009Q3) and annual review


def quarterly_doc(y: int, q: int, macro: dict):
    cur, prev = macro.get((y, q)), macro.get((y, q - 1) if q > 1 else (y - 1, 4))
    if cur is None or prev is None:
        return None
    rng = random.Random(f"quarterly:{y}Q{q}")
    g = cur["gdp"] / prev["gdp"]
    saar = (g * g * g * g - 1.0) * 100.0  # quarter-on-quarter growth at an annual rate
    yago = macro.get((y - 1, q))
    title = pick(rng, ["U.S. economy, Q{q} {y}", "Quarterly macro report: {y} Q{q}",
                       "The economy in the {o} quarter of {y}"],
                 q=q, y=y, o=["first", "second", "third", "fourth"][q - 1])
    lead = [pick(rng, [
        "Real GDP {ud} at a {s} annualized rate in the quarter, to ${lvl} billion in chained 2005 dollars.",
        "The U.S. economy {gw} at an annual rate of {s}, with real output at ${lvl} billion.",
    ], ud="grew" if saar >= 0 else "contracted", s=fp(saar), lvl=f"{cur['gdp']:,.1f}",
        gw="expanded" if saar >= 0 else "shrank")]
    body = []
    if yago:
        body.append(f"From a year earlier, real GDP is {fsp(pct(cur['gdp'], yago['gdp']))}.")
        body.append(pick(rng, [
            "Consumer prices are {i} higher than a year ago.",
            "Year-over-year CPI inflation is {i}.",
        ], i=fsp(pct(cur["cpi"], yago["cpi"]))))
        body.append(f"The M1 money stock grew {fsp(pct(cur['m1'], yago['m1']))} over four quarters, "
                    f"to ${f2(cur['m1'])} billion.")
    body.append(pick(rng, [
        "Real consumer spending {cv} {c} on the quarter and real private investment {iv} {i}.",
        "Consumption {cv} {c} while investment {iv} {i} from the previous quarter.",
    ], cv="rose" if cur["cons"] >= prev["cons"] else "fell", c=fp(pct(cur["cons"], prev["cons"])),
        iv="rose" if cur["inv"] >= prev["inv"] else "fell", i=fp(pct(cur["inv"], prev["inv"]))))
    du = cur["unemp"] - prev["unemp"]
    body.append(pick(rng, [
        "Unemployment averaged {u}, {ch}.",
        "The jobless rate was {u} ({ch}).",
    ], u=fp(cur["unemp"]),
        ch="unchanged from the prior quarter" if abs(du) < 0.05 else f"{'up' if du > 0 else 'down'} {fpp(du)} on the quarter"))
    dt_ = cur["tbill"] - prev["tbill"]
    body.append(pick(rng, [
        "The three-month Treasury bill yielded {t}, {ch}; the real rate was {r}.",
        "Short rates: the 3-month T-bill averaged {t} ({ch}) and the ex-post real rate {r}.",
    ], t=fp(cur["tbill"]), r=fsp(cur["realint"]),
        ch="unchanged" if abs(dt_) < 0.005 else f"{'up' if dt_ > 0 else 'down'} {fbp(dt_)}"))
    body.append(f"Annualized quarterly inflation measured {fsp(cur['infl'])}.")
    gap = cur["tbill"] - (pct(cur["cpi"], yago["cpi"]) if yago else cur["infl"])
    if rng.random() < 0.5:
        body.append(f"Bill yields sit {fpp(gap)} {'above' if gap >= 0 else 'below'} "
                    f"{'annual' if yago else 'quarterly'} inflation.")
    return assemble(rng, title, lead, body, keep=0.85)


def annual_doc(y: int, data: dict, sps: EquityStats, wti: Lookup, vix: Lookup):
    ff, credit, cpi = data["ff"], data["credit"], data["cpi"]
    rng = random.Random(f"annual:{y}")
    body, lead = [], []
    sp, nq = data["sp"], data["nq"]
    idx = [i for i, d in enumerate(sp.dates) if d.year == y]
    if idx and idx[0] > 0:
        cl, ncl = sp.cols["close"], nq.cols["close"]
        p, last = idx[0] - 1, idx[-1]
        ar, nar = pct(cl[last], cl[p]), pct(ncl[last], ncl[p])
        lead.append(pick(rng, [
            "The S&P 500 {mv} in {y}, ending the year at {c}.",
            "For {y} as a whole the S&P 500 returned {ar} in price terms, closing at {c}.",
        ], mv=move(ar, rng), y=y, c=f2(cl[last]), ar=fsp(ar)))
        body.append(f"The Nasdaq Composite finished {y} at {f2(ncl[last])}, {up_down(nar)} {fp(nar)}.")
        hi_i = max(idx, key=lambda k: cl[k])
        lo_i = min(idx, key=lambda k: cl[k])
        body.append(f"The year's highest close was {f2(cl[hi_i])} on {short_date(sp.dates[hi_i])}, the lowest "
                    f"{f2(cl[lo_i])} on {short_date(sp.dates[lo_i])}.")
        peak, mdd, mdd_at, mdd_pk = cl[p], 0.0, None, None  # max drawdown within the year
        pk_i = p
        for k in idx:
            if cl[k] > peak:
                peak, pk_i = cl[k], k
            dd = pct(cl[k], peak)
            if dd < mdd:
                mdd, mdd_at, mdd_pk = dd, k, pk_i
        if mdd_at is not None:
            body.append(f"The deepest peak-to-trough decline of the year was {fp(mdd)}, from {f2(cl[mdd_pk])} to "
                        f"{f2(cl[mdd_at])} on {short_date(sp.dates[mdd_at])}.")
        ups = sum(1 for k in idx if sps.ret[k] > 0)
        big = sum(1 for k in idx if abs(sps.ret[k]) >= 2.0)
        body.append(f"The index closed higher on {ups} of {len(idx)} sessions and moved 2% or more on {big} days.")
        best = max(idx, key=lambda k: sps.ret[k])
        worst = min(idx, key=lambda k: sps.ret[k])
        body.append(f"Its best day was {short_date(sp.dates[best])} ({fsp(sps.ret[best])}) and its worst "
                    f"{short_date(sp.dates[worst])} ({fsp(sps.ret[worst])}).")
        body.append(f"Realized volatility for the year was {fp(ann_vol([sps.ret[k] for k in idx]))}.")
    if all((y, m) in ff for m in range(1, 13)):
        g_mkt, g_rf = 1.0, 1.0
        for m in range(1, 13):
            mkt, _, _, rf = ff[(y, m)]
            g_mkt *= 1.0 + (mkt + rf) / 100.0
            g_rf *= 1.0 + rf / 100.0
        smb_sum = math.fsum(ff[(y, m)][1] for m in range(1, 13))
        hml_sum = math.fsum(ff[(y, m)][2] for m in range(1, 13))
        s = (f"Compounding the monthly Fama-French data, the total U.S. stock market returned "
             f"{fsp((g_mkt - 1) * 100)} in {y} against {fp((g_rf - 1) * 100)} on Treasury bills; "
             f"the monthly size factor summed to {fsp(smb_sum)} and the value factor to {fsp(hml_sum)}.")
        (body if lead else lead).append(s)
    if (y, 12) in credit and (y - 1, 12) in credit:
        a, b = credit[(y, 12)]
        pa, pb = credit[(y - 1, 12)]
        body.append(f"By December, Aaa yields were {fp(a)} and Baa {fp(b)}, against {fp(pa)} and {fp(pb)} a year "
                    f"before; the Baa-Aaa spread {'widened' if (b - a) > (pb - pa) else 'narrowed' if (b - a) < (pb - pa) else 'held'} "
                    f"to {fbp(b - a)}.")
    if (y, 12) in cpi and (y - 1, 12) in cpi:
        body.append(f"Core CPI rose {fp(pct(cpi[(y, 12)], cpi[(y - 1, 12)]))} from December to December.")
    wd = [(d, v) for d, v in zip(wti.dates, wti.vals) if d.year == y]
    pw = wti.last_on_or_before(dt.date(y - 1, 12, 31))
    if wd and pw and pw[0].year == y - 1:
        yr = pct(wd[-1][1], pw[1])
        body.append(f"WTI crude ended the year at ${f2(wd[-1][1])} a barrel, {up_down(yr)} {fp(yr)} for the year, "
                    f"after trading between ${f2(min(v for _, v in wd))} and ${f2(max(v for _, v in wd))}.")
    vs = [v for d, v in zip(vix.dates, vix.vals) if d.year == y]
    if len(vs) > 200:
        body.append(f"The VIX averaged {f2(mean(vs))} over the year, with a low of {f2(min(vs))} and a high of "
                    f"{f2(max(vs))}.")
    if not lead:
        return None
    title = pick(rng, ["Annual review: {y}", "{y} in review", "The year in markets, {y}"], y=y)
    return assemble(rng, title, lead, body, keep=0.9)


# -----------------------------------------------------------------------------
# market corpus: put it together


def build_market_docs(data: dict = None) -> list[str]:
    data = data if data is not None else load_market_data()
    sp, nq = data["sp"], data["nq"]
    sps, nqs = EquityStats(sp), EquityStats(nq)
    wti, vix = Lookup(data["wti"]), Lookup(data["vix"])
    oil_ret = {}
    for k in range(1, len(wti.dates)):
        oil_ret[wti.dates[k]] = pct(wti.vals[k], wti.vals[k - 1])
    wti_month = {}
    for d, v in data["wti"]:
        s, n = wti_month.get((d.year, d.month), (0.0, 0))
        wti_month[(d.year, d.month)] = (s + v, n + 1)
    wti_month = {k: (s / n, n) for k, (s, n) in wti_month.items()}

    docs = []  # (sort key date, kind rank, text): chronological, ties in a fixed kind order
    n = len(sp.dates)
    for i in range(1, n):
        docs.append((sp.dates[i], 0, daily_doc(i, data, sps, nqs, wti, vix, oil_ret)))
    weeks, cur = [], []
    for i in range(n):
        if cur and sp.dates[i].isocalendar()[:2] != sp.dates[cur[-1]].isocalendar()[:2]:
            weeks.append(cur)
            cur = []
        cur.append(i)
    weeks.append(cur)
    for w in weeks[1:]:
        docs.append((sp.dates[w[-1]], 1, weekly_doc(w, w[0] - 1, data, sps, wti, vix)))
    months = {}
    for i, d in enumerate(sp.dates):
        months.setdefault((d.year, d.month), []).append(i)
    first_equity_month = min(months)  # has no previous month-end close: it gets a rates note instead
    for (y, m), idx in sorted(months.items()):
        if idx[0] == 0:
            continue
        docs.append((sp.dates[idx[-1]], 2, monthly_doc(y, m, idx, idx[0] - 1, data, sps, vix, wti_month)))
    for (y, m) in sorted(set(data["credit"]) | set(data["ff"]) | set(data["cpi"])):
        if (y, m) > first_equity_month:
            continue
        t = credit_doc(y, m, data, wti_month)
        if t:
            docs.append((dt.date(y, m, 28), 2, t))
    for (y, q) in sorted(data["macro"]):
        t = quarterly_doc(y, q, data["macro"])
        if t:
            docs.append((dt.date(y, 3 * q, 28), 3, t))
    years = sorted({y for y, _ in data["ff"]} | {d.year for d in sp.dates})
    for y in years:
        t = annual_doc(y, data, sps, wti, vix)
        if t:
            docs.append((dt.date(y, 12, 31), 4, t))
    docs.sort(key=lambda t: (t[0], t[1]))
    return [t for _, _, t in docs]


def run_market(out_dir: str) -> None:
    path = os.path.join(out_dir, CORPUS_NAME)
    check_writable_dir(out_dir, "--out-dir")
    check_output_files(out_dir, [CORPUS_NAME])
    print(f"building the market corpus for {path} ...", file=sys.stderr, flush=True)
    docs = build_market_docs()
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
