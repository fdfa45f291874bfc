"""
The offline finance corpus: news-style market stories written from real historical series.

  python market_corpus.py --out-dir data     # data/finance_corpus.txt, as fetch_news.py --source market
  python market_corpus.py --stats data/finance_corpus.txt [--json]   # how varied a corpus's language is

The series ship inside installed packages (arch.data: S&P 500 and Nasdaq daily OHLCV 1999-2018, VIX
2014-2018, WTI spot 1986-2019, Brent/WTI monthly, Moody's Aaa/Baa yields 1919-2018, core CPI, Fama-French
factors; statsmodels: US quarterly macro 1959-2009). Several desks write about them, each with its own
vocabulary: equities (every session), commodities (oil on eventful days and every month), volatility
(VIX on eventful days), rates and credit, macro releases (core CPI, GDP), factor returns, plus weekly,
monthly, quarterly and annual wraps. Every number is computed from the data with plain Python floats
(math.fsum); the words are picked by a random.Random seeded with the story's desk and date, so the file
is byte-identical on every run and machine. Nothing is invented: no quotes, names or figures that the
data do not give.

The corpus file's writer lives here too (documents joined by one blank line, written atomically through a
temp file): fetch_news.py writes its EODHD corpus with it.
"""

import argparse
import bisect
import contextlib
import csv
import datetime as dt
import gzip
import importlib.resources
import io
import json
import math
import os
import random
import re
import signal
import string
import sys
import tempfile

# -----------------------------------------------------------------------------
# data: load the bundled series (csv + gzip only, no pandas, so parsing and
# arithmetic cannot drift with library versions)

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
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
    cols = {k: [float(r[j]) for r in rows] for k, j in (("open", 1), ("high", 2), ("low", 3), ("close", 4))}
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
        macro[(y, q)] = dict(
            gdp=float(r[2]),
            cons=float(r[3]),
            inv=float(r[4]),
            govt=float(r[5]),
            dpi=float(r[6]),
            cpi=float(r[7]),
            m1=float(r[8]),
            tbill=float(r[9]),
            unemp=float(r[10]),
            pop=float(r[11]),
            infl=float(r[12]),
            realint=float(r[13]),
        )
    return dict(sp=sp, nq=nq, wti=wti, vix=vix, crude=crude, credit=credit, cpi=cpi, ff=ff, macro=macro)


# -----------------------------------------------------------------------------
# arithmetic. math.fsum is exactly rounded and sqrt is correctly rounded under
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


# -----------------------------------------------------------------------------
# formatting


def f2(x: float) -> str:
    s = f"{x:,.2f}"
    return "0.00" if s == "-0.00" else s


def fp(x: float) -> str:  # unsigned percentage
    return f"{f2(abs(x))}%"


def fsp(x: float) -> str:  # signed percentage
    s = f2(x)
    return f"{s}%" if s.startswith("-") or s == "0.00" else f"+{s}%"


def prints_as_zero(x: float) -> bool:  # "0.00" at two decimals: no direction worth a word
    return f2(x) == "0.00"


def fpct(x: float) -> str:  # percentage, a sign only when negative (a rate that can fall below zero)
    return f"{f2(x)}%"


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
    words = {
        2: "second",
        3: "third",
        4: "fourth",
        5: "fifth",
        6: "sixth",
        7: "seventh",
        8: "eighth",
        9: "ninth",
        10: "tenth",
        11: "eleventh",
        12: "twelfth",
    }
    if k in words:
        return words[k]
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def up_down(x: float) -> str:
    return "up" if x >= 0 else "down"


def higher_lower(x: float) -> str:
    return "higher" if x >= 0 else "lower"


def grew(x: float) -> str:
    """'grew 1.23%', 'shrank 0.46%', or 'was unchanged' for a % change that rounds to nothing."""
    return "was unchanged" if prints_as_zero(x) else f"{'grew' if x > 0 else 'shrank'} {fp(x)}"


def up_down_by(x: float) -> str:
    """'up 1.23%', 'down 0.46%', or 'unchanged' for a % change that rounds to nothing."""
    return "unchanged" if prints_as_zero(x) else f"{up_down(x)} {fp(x)}"


def rose_fell(x: float) -> str:
    """'rose 1.23%', 'fell 0.46%', or 'held steady' (fits 'outlays' as well as 'spending') for a change
    that rounds to nothing."""
    return "held steady" if prints_as_zero(x) else f"{'rose' if x > 0 else 'fell'} {fp(x)}"


def gain_loss(x: float) -> str:
    return "gain" if x >= 0 else "loss"


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


class SeriesStats:
    """Per-observation indicators for one price series, computed once: returns, moving averages,
    52-week (252-observation) extremes, realized volatility, streaks and the running peak."""

    def __init__(self, c: list[float], volume: list[int] | None = None):
        n = len(c)
        self.c = c
        self.ret = [None] + [pct(c[i], c[i - 1]) for i in range(1, n)]
        self.ma = {
            w: [mean(c[i - w + 1 : i + 1]) if i >= w - 1 else None for i in range(n)] for w in (50, 200)
        }
        # the volume average excludes today, so "today versus normal" is not diluted by today
        self.avg_vol50 = [mean(volume[i - 50 : i]) if volume and i >= 50 else None for i in range(n)]
        self.vol20 = [ann_vol(self.ret[i - 19 : i + 1]) if i >= 20 else None for i in range(n)]
        self.hi252, self.lo252 = window_extreme(c, 252, +1), window_extreme(c, 252, -1)
        self.streak = [0] * n  # +k: k straight higher closes, -k: k straight lower closes
        for i in range(1, n):
            r, s = self.ret[i], self.streak[i - 1]
            self.streak[i] = (s + 1 if s > 0 else 1) if r > 0 else (s - 1 if s < 0 else -1) if r < 0 else 0
        self.peak = [0] * n  # running all-sample high (index)
        for i in range(1, n):
            self.peak[i] = i if c[i] >= c[self.peak[i - 1]] else self.peak[i - 1]


def window_extreme(c: list[float], w: int, sign: int) -> list:
    """Index of the highest (sign +1) or lowest (-1) value in each trailing window of w, the latest
    winning ties; None until the window is full. A monotonic deque: O(n) instead of O(n * w)."""
    out, q = [None] * len(c), []
    head = 0
    for i, x in enumerate(c):
        while len(q) > head and sign * c[q[-1]] <= sign * x:
            q.pop()
        q.append(i)
        if q[head] <= i - w:
            head += 1
        if i >= w - 1:
            out[i] = q[head]
    return out


def last_beyond(vals: list, i: int, above: bool, lo: int = 0):
    """The latest j < i (j >= lo) whose value is at least (above) / at most vals[i], or None: the
    'since' in 'the highest since March 2009'."""
    v = vals[i]
    for j in range(i - 1, lo - 1, -1):
        x = vals[j]
        if x is not None and (x >= v if above else x <= v):
            return j
    return None


def last_bigger_move(ret: list, i: int):
    """The latest earlier session with a move at least as big in the same direction, or None."""
    r = ret[i]
    for j in range(i - 1, 0, -1):
        if (ret[j] >= r) if r > 0 else (ret[j] <= r):
            return j
    return None


# -----------------------------------------------------------------------------
# phrasing: a seeded pen, a lexicon of interchangeable words, verbs scaled to the size of a move

LEX = {
    "stocks": [
        "stocks",
        "U.S. stocks",
        "equities",
        "U.S. equities",
        "Wall Street",
        "American shares",
        "U.S. shares",
        "the U.S. stock market",
        "American equities",
        "the equity market",
        "share prices",
        "U.S. equity markets",
    ],
    "spx": [
        "the S&P 500",
        "the S&P 500 index",
        "the benchmark S&P 500",
        "the broad S&P 500",
        "the Standard & Poor's 500 index",
        "the large-cap S&P 500",
        "the S&P 500 benchmark",
        "the widely followed S&P 500",
        "the blue-chip S&P 500",
        "Standard & Poor's 500-stock index",
    ],
    "ndx": [
        "the Nasdaq Composite",
        "the Nasdaq",
        "the tech-heavy Nasdaq Composite",
        "the technology-laden Nasdaq",
        "the Nasdaq Composite index",
        "the tech-focused Nasdaq",
        "the tech-dominated Nasdaq Composite",
        "the Nasdaq, home to many technology companies,",
    ],
    "index": ["the index", "the benchmark", "the gauge", "the broad index", "the barometer", "the measure"],
    "ended": ["ended", "closed", "finished", "wound up", "settled"],
    "session": ["session", "trading session", "day", "trading day"],
    "meanwhile": [
        "Meanwhile,",
        "Elsewhere,",
        "In other markets,",
        "Separately,",
        "Across asset classes,",
        "Beyond equities,",
        "Away from stocks,",
        "Outside the stock market,",
        "On the commodities front,",
    ],
    "turnover": ["volume", "trading volume", "turnover", "activity", "trading activity"],
    "ma50": ["50-day moving average", "50-day average", "50-session moving average"],
    "ma200": [
        "200-day moving average",
        "200-day average",
        "200-session moving average",
        "long-term 200-day average",
    ],
    "highword": ["high", "peak", "top", "summit", "zenith", "high-water mark"],
    "lowword": ["low", "trough", "bottom", "nadir", "low point"],
    "oil": [
        "oil",
        "crude",
        "crude oil",
        "U.S. crude",
        "WTI crude",
        "West Texas Intermediate crude",
        "benchmark U.S. crude",
        "U.S. benchmark crude",
        "West Texas Intermediate",
        "U.S. light sweet crude",
        "the U.S. oil benchmark",
    ],
    "barrel": ["a barrel", "per barrel"],
    "oilmarket": [
        "the oil market",
        "the energy complex",
        "energy markets",
        "the crude market",
        "the petroleum market",
        "oil trading",
    ],
    "vix": [
        "the VIX",
        "the CBOE Volatility Index",
        "the VIX index",
        "Wall Street's so-called fear gauge",
        "the market's fear gauge",
        "the CBOE's volatility gauge",
        "the Chicago Board Options Exchange's volatility index",
        "the options-based VIX",
    ],
    "implied": [
        "implied volatility",
        "options-implied volatility",
        "expected volatility",
        "the market's expectation of volatility",  # singular, as "{implied} is" needs
    ],
    "aaa": [
        "Aaa-rated corporate bonds",
        "top-rated corporate debt",
        "Moody's Aaa corporate bonds",
        "the highest-rated corporate bonds",
        "triple-A corporate bonds",
        "gilt-edged corporate issues",
        "blue-chip corporate bonds",
    ],
    "baa": [
        "Baa-rated bonds",
        "Moody's Baa corporate bonds",
        "bonds on the lowest investment-grade rung",
        "Baa corporate debt",
        "medium-grade corporate bonds",
        "lower-rated investment-grade paper",
    ],
    "spread": [
        "the Baa-Aaa spread",
        "the gap between Baa and Aaa yields",
        "the credit spread",
        "the default spread",
        "the quality spread",
        "the extra yield on Baa debt over Aaa",
        "the risk premium on Baa bonds",
    ],
    "borrowing": [
        "corporate borrowing costs",
        "companies' borrowing costs",
        "the cost of corporate credit",
        "long-term corporate financing costs",
    ],
    "core": [
        "core consumer prices",
        "the core consumer price index",
        "core CPI",
        "consumer prices excluding food and energy",
        "underlying consumer prices",
        "core inflation",
        "the core cost of living",
    ],
    "economy": [
        "the U.S. economy",
        "the economy",
        "U.S. output",
        "American economic output",
        "the nation's economy",
        "the world's largest economy",
    ],
    "gdp": ["real GDP", "real gross domestic product", "inflation-adjusted output", "real economic output"],
    "jobless": ["the unemployment rate", "the jobless rate", "the share of the labor force out of work"],
    "consumers": [
        "consumer spending",
        "household consumption",
        "personal consumption",
        "spending by consumers",
        "household outlays",
        "shoppers' spending",
    ],
    "invest": [
        "real private investment",
        "gross private domestic investment",
        "private investment spending",
        "capital spending by businesses and households",
    ],
    "govt": [
        "federal government spending",
        "federal outlays on consumption and investment",
        "Washington's own spending",
    ],
    "m1": [
        "the M1 money supply",
        "the M1 money stock",
        "narrow money, M1,",
        "M1, currency plus checking deposits,",
    ],
    "tbill": [
        "the three-month Treasury bill rate",
        "the three-month T-bill yield",
        "the 3-month bill rate",
        "the yield on three-month Treasury bills",
    ],
    "smallcaps": [
        "small-cap stocks",
        "smaller companies",
        "small caps",
        "shares of smaller companies",
        "small-company stocks",
        "smaller listed firms",
    ],
    "largecaps": [
        "large caps",
        "large-cap stocks",
        "bigger companies",
        "large companies",
        "megacaps and other large firms",
        "large-company shares",
    ],
    "value": [
        "value stocks",
        "value shares",
        "stocks with high book-to-market ratios",
        "cheaper value names",
        "bargain-priced value stocks",
    ],
    "growth": [
        "growth stocks",
        "growth shares",
        "stocks with low book-to-market ratios",
        "pricier growth names",
        "richly valued growth stocks",
    ],
    "market": [
        "the broad U.S. stock market",
        "the total U.S. market",
        "the overall market",
        "the U.S. stock market as a whole",
        "the value-weighted market portfolio",
    ],
    "bills": [
        "one-month Treasury bills",
        "one-month T-bills",
        "cash in one-month bills",
        "short-dated Treasury bills",
    ],
    "data": ["figures", "data", "numbers", "statistics"],
    "showed": ["showed", "indicated", "revealed"],
    "compared": ["compared with", "versus", "against"],
    "however": ["However,", "Still,", "Even so,", "That said,", "Yet", "Nonetheless,", "Nevertheless,"],
    "sofar": ["so far", "to date", "thus far"],
    "notably": ["Notably,", "Of note,", "Worth noting,", "For the record,"],
    "trend": ["trend", "trajectory", "direction", "momentum"],
    "investors": ["investors", "market participants", "portfolio managers", "traders"],
    "watched": ["watched", "closely followed", "widely tracked", "scrutinized"],
}

FMT = string.Formatter()


class Pen:
    """A writer with its own random.Random, seeded by a string key (desk and date): the same key
    always gives the same words, on every machine and Python version."""

    def __init__(self, key: str):
        self.rng = random.Random(key)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def choice(self, xs):
        return self.rng.choice(xs)

    def say(self, templates, **kw) -> str:
        """Fill one of the templates: {name} from kw, else a word from LEX ({Name} capitalized)."""
        t = templates if isinstance(templates, str) else self.rng.choice(templates)
        out = []
        for lit, field, spec, _ in FMT.parse(t):
            out.append(lit)
            if field is None:
                continue
            if field in kw or field.lower() in kw:
                val = kw.get(field, kw.get(field.lower()))
                val = format(val, spec) if spec else str(val)
                out.append(val if field in kw else val[0].upper() + val[1:])
                continue
            val = self.say(LEX[field.lower()], **kw)
            out.append(val[0].upper() + val[1:] if field[0].isupper() else val)
        return "".join(out)


def article(
    pen: Pen, headline: str, dateline: str, lede: str, items: list, keep: float = 0.85, most: int = 12
) -> str:
    """Headline line, dateline + lede line, then the body items (a random subset, roughly in their
    order of importance, neighbours sometimes swapped) packed into paragraphs of one to three
    sentences, one paragraph per line: a document holds no blank line."""
    items = [x for x in items if x]
    kept = ([x for x in items if pen.chance(keep)] or items[:1])[:most]
    for k in range(len(kept) - 1):
        if pen.chance(0.3):
            kept[k], kept[k + 1] = kept[k + 1], kept[k]
    paras = []
    while kept:
        n = pen.rng.randint(1, 3)
        paras.append(" ".join(kept[:n]))
        kept = kept[n:]
    head = title_case(headline) if pen.chance(0.4) else headline[0].upper() + headline[1:]
    return "\n".join([head, f"{dateline} -- {lede[0].upper()}{lede[1:]}"] + paras)


SMALL_WORDS = {"a", "an", "the", "and", "or", "of", "to", "in", "on", "at", "for", "as", "by", "vs", "from"}


def title_case(headline: str) -> str:
    """The other house style for headlines: 'Stocks Slide as Nasdaq Sheds 2.1%'."""
    words = headline.split(" ")
    out = []
    for k, w in enumerate(words):
        if (k == 0 or words[k - 1].endswith(":") or w not in SMALL_WORDS) and w[:1].islower():
            w = "-".join(p[:1].upper() + p[1:] for p in w.split("-"))
        elif "-" in w and w[:1].isdigit():  # 52-week -> 52-Week
            w = "-".join(p if p[:1].isdigit() else p[:1].upper() + p[1:] for p in w.split("-"))
        out.append(w)
    return " ".join(out)


def dateline(city: str, d: dt.date | None = None, month: tuple | None = None) -> str:
    if d is not None:
        return f"{city}, {short_date(d)}"
    if month is not None:
        return f"{city}, {month_name(*month)}"
    return city


class Tiers:
    """Where a move stops being 'edged' and becomes 'rose', 'jumped', 'soared' (in %)."""

    def __init__(self, flat: float, small: float, mid: float, big: float):
        self.flat, self.small, self.mid, self.big = flat, small, mid, big


EQUITY, OIL, VIXT, MONTH = (
    Tiers(0.05, 0.5, 1.5, 3.0),
    Tiers(0.1, 1.0, 2.5, 5.0),
    Tiers(0.5, 3.0, 8.0, 15.0),
    Tiers(0.1, 1.0, 4.0, 8.0),
)

UP = [
    [
        ("edge up", "edged up"),
        ("inch higher", "inched higher"),
        ("tick up", "ticked up"),
        ("creep higher", "crept higher"),
        ("edge higher", "edged higher"),
        ("nudge higher", "nudged higher"),
        ("drift higher", "drifted higher"),
        ("tick higher", "ticked higher"),
    ],
    [
        ("rise", "rose"),
        ("gain", "gained"),
        ("advance", "advanced"),
        ("climb", "climbed"),
        ("firm", "firmed"),
        ("push higher", "pushed higher"),
        ("move up", "moved up"),
        ("strengthen", "strengthened"),
        ("appreciate", "appreciated"),
        ("grind higher", "ground higher"),
    ],
    [
        ("jump", "jumped"),
        ("rally", "rallied"),
        ("surge", "surged"),
        ("climb sharply", "climbed sharply"),
        ("rise sharply", "rose sharply"),
        ("race higher", "raced higher"),
        ("spring higher", "sprang higher"),
        ("bound higher", "bounded higher"),
        ("shoot up", "shot up"),
    ],
    [
        ("soar", "soared"),
        ("rocket", "rocketed"),
        ("leap", "leapt"),
        ("rally sharply", "rallied sharply"),
        ("spike higher", "spiked higher"),
        ("skyrocket", "skyrocketed"),
        ("vault higher", "vaulted higher"),
        ("zoom higher", "zoomed higher"),
    ],
]
DOWN = [
    [
        ("edge down", "edged down"),
        ("slip", "slipped"),
        ("dip", "dipped"),
        ("ease", "eased"),
        ("edge lower", "edged lower"),
        ("drift lower", "drifted lower"),
        ("tick down", "ticked down"),
        ("inch lower", "inched lower"),
        ("sag slightly", "sagged slightly"),
    ],
    [
        ("fall", "fell"),
        ("decline", "declined"),
        ("retreat", "retreated"),
        ("weaken", "weakened"),
        ("drop", "dropped"),
        ("move down", "moved down"),
        ("soften", "softened"),
        ("sag", "sagged"),
        ("back off", "backed off"),
        ("pull back", "pulled back"),
    ],
    [
        ("slide", "slid"),
        ("sink", "sank"),
        ("fall sharply", "fell sharply"),
        ("skid", "skidded"),
        ("slump", "slumped"),
        ("drop sharply", "dropped sharply"),
        ("buckle", "buckled"),
        ("stumble", "stumbled"),
        ("swoon", "swooned"),
    ],
    [
        ("tumble", "tumbled"),
        ("plunge", "plunged"),
        ("plummet", "plummeted"),
        ("dive", "dived"),
        ("crater", "cratered"),
        ("sink sharply", "sank sharply"),
        ("collapse", "collapsed"),
        ("nosedive", "nosedived"),
        ("crash", "crashed"),
    ],
]
FLAT = [
    ("hold steady", "held steady"),
    ("end little changed", "ended little changed"),
    ("barely budge", "barely budged"),
    ("end flat", "ended flat"),
    ("hover near unchanged", "hovered near unchanged"),
]


def verb(pen: Pen, x: float, t: Tiers) -> tuple[str, str]:
    """(base, past) of a verb whose strength follows the size of the % move x."""
    a = abs(x)
    if a < t.flat:
        return pen.choice(FLAT)
    k = 0 if a < t.small else 1 if a < t.mid else 2 if a < t.big else 3
    return pen.choice((UP if x > 0 else DOWN)[k])


def third(base: str) -> str:
    """'edge up' -> 'edges up', 'rally' -> 'rallies', 'barely budge' -> 'barely budges',
    'rally sharply' -> 'rallies sharply' (an adverb leads only when the next word is no adverb)."""
    words = base.split(" ")
    k = 1 if len(words) > 1 and words[0].endswith("ly") and not words[1].endswith("ly") else 0
    w = words[k]
    if w.endswith(("ch", "sh", "s", "x", "z")):
        w += "es"
    elif w.endswith("y") and w[-2] not in "aeiou":
        w = w[:-1] + "ies"
    else:
        w += "s"
    words[k] = w
    return " ".join(words)


def moved(pen: Pen, x: float, t: Tiers, amount: str, level: str | None = None) -> str:
    """'rose 12.34 points, or 1.23%, to 1,234.56', or for a move that rounds to nothing
    'was little changed at 1,234.56 (+0.01%)'."""
    if abs(x) < t.flat:
        s = pen.choice(
            ["was little changed", "ended nearly flat", "barely moved", "was essentially unchanged"]
        )
        return f"{s} at {level} ({fsp(x)})" if level else f"{s} ({fsp(x)})"
    v = verb(pen, x, t)[1]
    if level is None:
        return f"{v} {amount}"
    return f"{v} {amount}, to {level}" if "," in amount else f"{v} {amount} to {level}"


ADVERBS = [
    ["slightly ", "marginally ", "fractionally ", "a touch ", "modestly ", "narrowly "],
    ["", "solidly ", "firmly ", "noticeably ", "comfortably ", "moderately "],
    ["sharply ", "steeply ", "markedly ", "substantially ", "significantly ", "decisively "],
    ["dramatically ", "massively ", "violently ", "drastically ", "hugely ", "spectacularly "],
]


def adverb(pen: Pen, x: float, t: Tiers) -> str:
    """'slightly ' / 'sharply ' / '' for 'ended {adverb}higher', scaled like verb()."""
    a = abs(x)
    if a < t.flat:
        return pen.choice(["", "fractionally ", "barely "])
    return pen.choice(ADVERBS[0 if a < t.small else 1 if a < t.mid else 2 if a < t.big else 3])


def head_verb(pen: Pen, x: float, t: Tiers, plural: bool) -> str:
    base = verb(pen, x, t)[0]
    return base if plural else third(base)


NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def spelled(n: int) -> str:
    """A count that opens a sentence is written out, as news style asks: 'Thirty-seven of the 64 ...'."""
    if n < 20:
        w = NUMBER_WORDS[n]
    elif n < 100:
        w = TENS[n // 10 - 2] + ("-" + NUMBER_WORDS[n % 10] if n % 10 else "")
    else:
        return str(n)
    return w[0].upper() + w[1:]


def hpct(x: float) -> str:  # headline percentages: one decimal
    return f"{abs(x):.1f}%"


def hp(x: float, t: Tiers) -> str:
    """' 1.2%' after a headline verb ('{v}{p}'), nothing after a flat one: not 'holds steady 0.1%'."""
    return "" if abs(x) < t.flat else " " + hpct(x)


def since_phrase(dates: list, j, first_label: str) -> str:
    return f"since {short_date(dates[j])}" if j is not None else f"since at least {first_label}"


def a_an(word: str) -> str:
    """The article a word or figure takes: 'an elevated', and 'an 8.37%', 'an $8.07' (eight), 'an 11.20%'
    (eleven), 'an 18.00%' (eighteen), as figures are read aloud."""
    lead = word.lstrip("$").split(".")[0].replace(",", "")
    if lead[:1].isdigit():
        return "an" if lead[0] == "8" or lead in ("11", "18") else "a"
    return "an" if word[0] in "aeiou" else "a"


# -----------------------------------------------------------------------------
# context: every series and its indicators, computed once for all stories


class Ctx:
    def __init__(self, data: dict):
        self.data = data
        self.sp, self.nq = data["sp"], data["nq"]
        self.dates = self.sp.dates
        self.sps = SeriesStats(self.sp.cols["close"], self.sp.cols["volume"])
        self.nqs = SeriesStats(self.nq.cols["close"])
        self.wti, self.vix = Lookup(data["wti"]), Lookup(data["vix"])
        self.oils, self.vixs = SeriesStats(self.wti.vals), SeriesStats(self.vix.vals)
        self.session = {d: i for i, d in enumerate(self.dates)}
        wti_month = {}
        for d, v in data["wti"]:
            wti_month.setdefault((d.year, d.month), []).append(v)
        self.wti_month = {k: (mean(v), len(v)) for k, v in wti_month.items()}

    def period_start(self, i: int, same) -> int | None:
        """Index of the last close before the period (month, year) that session i belongs to."""
        j = i
        while j > 0 and same(self.dates[j - 1], self.dates[i]):
            j -= 1
        return j - 1 if j > 0 else None

    def wti_gap(self, k: int) -> dt.date | None:
        """The date of WTI's previous price when it is older than the last stock session before WTI's
        day k (the oil series misses a day there), so that a change is not told as one day's; else None."""
        d, pd = self.wti.dates[k], self.wti.dates[k - 1]
        i = self.session.get(d)
        return pd if i and self.dates[i - 1] > pd else None


# -----------------------------------------------------------------------------
# equities desk: one story per session


def equity_facts(cx: Ctx, i: int) -> dict:
    sp, nq, s = cx.sp, cx.nq, cx.sps
    d, pd = cx.dates[i], cx.dates[i - 1]
    c, pc = sp.cols["close"][i], sp.cols["close"][i - 1]
    f = dict(
        i=i,
        d=d,
        pd=pd,
        wd=WEEKDAYS[d.weekday()],
        c=c,
        pc=pc,
        r=s.ret[i],
        pts=c - pc,
        o=sp.cols["open"][i],
        h=sp.cols["high"][i],
        l=sp.cols["low"][i],
        v=sp.cols["volume"][i],
        nc=nq.cols["close"][i],
        nr=cx.nqs.ret[i],
        npts=nq.cols["close"][i] - nq.cols["close"][i - 1],
        streak=s.streak[i],
        new_high=s.hi252[i] == i,
        new_low=s.lo252[i] == i,
    )
    f["range"] = (f["h"] - f["l"]) / pc * 100.0
    f["cross200"] = 0
    if s.ma[200][i - 1] is not None:
        before, after = pc - s.ma[200][i - 1], c - s.ma[200][i]
        f["cross200"] = (1 if after > 0 else -1) if before * after < 0 else 0
    f["big_since"] = last_bigger_move(s.ret, i) if abs(f["r"]) >= 1.5 else "skip"
    f["high_since"] = last_beyond(s.c, i, True) if f["new_high"] else None
    m, y = (
        cx.period_start(i, lambda a, b: (a.year, a.month) == (b.year, b.month)),
        cx.period_start(i, lambda a, b: a.year == b.year),
    )
    f["mtd"] = pct(c, s.c[m]) if m is not None else None
    f["ytd"] = pct(c, s.c[y]) if y is not None else None
    return f


def moves_pts(pen: Pen, x: float, pts: float, level: float) -> str:
    amount = pen.choice(["{p} points, or {r}", "{r}, or {p} points", "{r}"]).format(p=f2(abs(pts)), r=fp(x))
    return moved(pen, x, EQUITY, amount, f2(level))


def equity_headline(pen: Pen, f: dict) -> str:
    r, nr = f["r"], f["nr"]
    subj, plural = pen.choice(
        [
            ("Stocks", True),
            ("U.S. stocks", True),
            ("Wall Street", False),
            ("S&P 500", False),
            ("Equities", True),
            ("Shares", True),
            ("U.S. equities", True),
        ]
    )
    v = head_verb(pen, r, EQUITY, plural)
    event = equity_event_headline(pen, f, subj, v, plural)
    if event is not None:
        return event
    nv = head_verb(pen, nr, EQUITY, False)
    if abs(r) < EQUITY.flat:
        return pen.say(
            ["{s} {v} on {wd}", "{s} {v} as Nasdaq {nv}{np}", "S&P 500 {sv} at {c}"],
            s=subj,
            v=v,
            wd=f["wd"],
            nv=nv,
            np=hp(nr, EQUITY),
            sv=head_verb(pen, r, EQUITY, False),
            c=f2(f["c"]),
        )
    return pen.say(
        [
            "{s} {v} on {wd}",
            "{s} {v} as Nasdaq {nv}{np}",
            "S&P 500 {sv}{p} to {c}",
            "{s} {v}; Nasdaq {nv}",
            "{s} {v} in {adj} trade",
            "Nasdaq {nv}{np}, S&P 500 {sv}{p}",
            "{s} {v}, S&P 500 ends at {c}",
        ],
        s=subj,
        v=v,
        wd=f["wd"],
        nv=nv,
        np=hp(nr, EQUITY),
        sv=head_verb(pen, r, EQUITY, False),
        p=hp(r, EQUITY),
        c=f2(f["c"]),
        adj=day_adjective(f),
    )


def equity_event_headline(pen: Pen, f: dict, subj: str, v: str, plural: bool) -> str | None:
    """A headline about a new high or low, a streak, a crossing of the 200-day average or the biggest
    move in a while; None on a day without one (or when the pen passes it over)."""
    r = f["r"]
    if f["new_high"] and f["high_since"] is None:
        return pen.say(
            [
                "S&P 500 closes at highest level since at least 1999",
                "{s} {v} as S&P 500 sets a closing high",
                "S&P 500 tops its previous peak, ends at {c}",
            ],
            s=subj,
            v=v,
            c=f2(f["c"]),
        )
    if f["new_high"] and pen.chance(0.7):
        return pen.say(
            [
                "S&P 500 ends at 52-week high",
                "{s} {v}, lifting S&P 500 to highest close since {hd}",
                "S&P 500 climbs to best finish since {hd}",
            ],
            s=subj,
            v=v,
            hd=short_date(f["dates"][f["high_since"]]),
        )
    if f["new_low"] and pen.chance(0.7):
        return pen.say(
            [
                "S&P 500 sinks to 52-week low",
                "{s} {v}; S&P 500 ends at lowest in a year",
                "S&P 500 closes at 52-week low of {c}",
            ],
            s=subj,
            v=v,
            c=f2(f["c"]),
        )
    if abs(f["streak"]) >= 4 and abs(f["r"]) >= EQUITY.flat and pen.chance(0.6):  # no "hold steady" streaks
        w = "winning" if f["streak"] > 0 else "losing"
        return pen.say(
            [
                "S&P 500 extends {w} streak to {n} sessions",
                "{s} {v} for {o} straight session",
                "{s} stretch {w} run to {n} days",
            ]
            if plural
            else ["S&P 500 extends {w} streak to {n} sessions", "{s} {v} for {o} straight session"],
            w=w,
            n=abs(f["streak"]),
            o=ordinal(abs(f["streak"])),
            s=subj,
            v=v,
        )
    if f["cross200"] and pen.chance(0.7):
        return pen.choice(
            ["S&P 500 climbs back above its 200-day average", "S&P 500 reclaims 200-day moving average"]
            if f["cross200"] > 0
            else ["S&P 500 breaks below its 200-day average", "S&P 500 slips under 200-day moving average"]
        )
    if f["big_since"] != "skip" and f["big_since"] is not None and f["i"] - f["big_since"] >= 20:
        return pen.say(
            "{s} {v} {p}, biggest {gl} since {bd}",
            s=subj,
            v=v,
            p=hpct(r),
            gl="gain" if r > 0 else "drop",
            bd=short_date(f["dates"][f["big_since"]]),
        )
    return None


def day_adjective(f: dict) -> str:
    """How the session felt, judged only from its own numbers: words about prices alone, since 'heavy
    trade' says volume was high and a 'broad' rally says most stocks rose, which one index cannot tell."""
    if f["range"] >= 2.5:
        return "volatile" if abs(f["r"]) < 1.5 else "rough" if f["r"] < 0 else "buoyant"
    if f["range"] < 0.8:
        return "quiet"
    return "choppy" if abs(f["r"]) < 0.3 else "steady"


def equity_lede(pen: Pen, f: dict) -> str:
    zero = prints_as_zero(f["r"])  # a close that matched the last one: neither higher nor lower
    kw = dict(
        wd=f["wd"],
        mv=moves_pts(pen, f["r"], f["pts"], f["c"]),
        c=f2(f["c"]),
        pc=f2(f["pc"]),
        hl="unchanged" if zero else higher_lower(f["r"]),
        pr=fp(f["r"]),
        prior=prior_close(f["d"], f["pd"]),
        nmv=moved(pen, f["nr"], EQUITY, fp(f["nr"]), f2(f["nc"])),
        adj=day_adjective(f),
        ud=up_down(f["r"]),
        pts=f2(abs(f["pts"])),
        adv="" if zero else adverb(pen, f["r"], EQUITY),
    )
    templates = [
        "{Stocks} {ended} {adv}{hl} on {wd}, as {spx} {mv}.",
        "{Spx} {mv} on {wd}, while {ndx} {nmv}.",
        "{Stocks} {ended} {adv}{hl} in a {adj} {wd} {session}. {Spx} {mv}, and {ndx} {nmv}.",
        "{Spx} {ended} at {c} on {wd}, {ud} {pts} points, or {pr}, from {prior} of {pc}.",
        "A {adj} {session} on {wd} left {spx} at {c}: {index} {mv}.",
        "{Stocks} {ended} {adv}{hl} on {wd}. {Spx} {mv} and {ndx} {nmv}.",
        "It was a {adj} {session} for {stocks} on {wd}: {spx} {mv}, and {ndx} {nmv}.",
        "{Spx} {mv} on {wd} as {stocks} {ended} {adv}{hl}.",
        "U.S. stock indexes {ended} {adv}{hl} on {wd}, with {spx} finishing at {c}, {ud} {pr} from {prior}.",
    ]
    return pen.say([t for t in templates if not (zero and "{ud}" in t)], **kw)


def equity_range_items(pen: Pen, f: dict) -> list[str]:
    out = [
        pen.say(
            [
                "{Index} traded between {l} and {h}, an intraday range of {rp} of the previous close.",
                "{Spx} opened at {o}, touched a {highword} of {h} and a {lowword} of {l}.",
                "The day's range ran from {l} to {h}, or {rp} of the prior close, after an open of {o}.",
                "Intraday, {index} swung {rp} between a {lowword} of {l} and a {highword} of {h}.",
                "From an open of {o}, {index} moved as high as {h} and as low as {l} before the close.",
            ],
            o=f2(f["o"]),
            h=f2(f["h"]),
            l=f2(f["l"]),
            rp=fp(f["range"]),
        )
    ]
    gap = pct(f["o"], f["pc"])
    if abs(gap) >= 0.5:
        out.append(
            pen.say(
                [
                    "{Index} gapped {ud} at the open, starting {g} away from {prior}.",
                    "The open at {o} was {g} {hl} than {prior}.",
                    "{Stocks} opened {hl}, with {spx} starting the {session} at {o}, {g} from {prior}.",
                ],
                ud=up_down(gap),
                g=fp(gap),
                o=f2(f["o"]),
                hl=higher_lower(gap),
                prior=prior_close(f["d"], f["pd"]),
            )
        )
    return out


def nasdaq_day_sentence(pen: Pen, f: dict, in_lede: bool) -> str:
    """The Nasdaq's day beside the S&P 500's: its lead or lag, or its move."""
    diff = f["nr"] - f["r"]
    rel = (
        pen.choice(["outperforming", "beating", "outpacing"])
        if diff > 0
        else pen.choice(["underperforming", "lagging", "trailing"])
    )
    even = prints_as_zero(diff)  # no lead to speak of at two decimals
    both = min(abs(f["r"]), abs(f["nr"])) >= EQUITY.flat and (f["r"] > 0) == (f["nr"] > 0)
    if in_lede:
        return pen.say(
            ["The Nasdaq moved in step with {spx}.", "{Ndx} matched the move of {spx} on the day."]
            if even
            else [
                "The Nasdaq's move left it {rel} {spx} by {dpp}.",
                "{Ndx} ended {dpp} {ab} {spx} on the day.",
            ],
            rel=rel,
            dpp=fpp(diff),
            ab="ahead of" if diff > 0 else "behind",
        )
    return pen.say(
        [
            "{Ndx} {nmv}, in step with {spx}." if even else "{Ndx} {nmv}, {rel} {spx} by {dpp}.",
            "On the Nasdaq, the composite {ended} at {nc}, {nud}, "
            + ("in step with the broader market." if even else "{rel} the broader market by {dpp}."),
            "{Ndx} {ended} at {nc}, {ud} {npts} points, or {npr}.",
            "Technology-heavy shares {hl2}: {ndx} {nmv}.",
        ],
        nmv=moved(pen, f["nr"], EQUITY, fp(f["nr"]), f2(f["nc"])),
        rel=rel,
        dpp=fpp(diff),
        nc=f2(f["nc"]),
        ud=up_down(f["nr"]),
        nud=up_down_by(f["nr"]),
        npr=fp(f["nr"]),
        npts=f2(abs(f["npts"])),
        # "too" only when both indexes moved, the same way
        hl2=("moved higher too" if f["nr"] > 0 else "moved lower too") if both else "went their own way",
    )


def equity_nasdaq_items(pen: Pen, cx: Ctx, f: dict, in_lede: bool) -> list[str]:
    out = [nasdaq_day_sentence(pen, f, in_lede)]
    i = f["i"]
    if i > 21:
        rel20 = pct(cx.nqs.c[i], cx.nqs.c[i - 21]) - pct(cx.sps.c[i], cx.sps.c[i - 21])
        if abs(rel20) >= 2 and pen.chance(0.5):
            out.append(
                pen.say(
                    [
                        "Over the past 21 sessions {ndx} has {w} {spx} by {pp}.",
                        "The Nasdaq's {lead} over the S&P 500 across the last 21 sessions stands at {pp}.",
                    ],
                    w="outperformed" if rel20 > 0 else "underperformed",
                    pp=fpp(rel20),
                    lead="lead" if rel20 > 0 else "shortfall",
                )
            )
    if cx.nqs.hi252[i] == i:
        out.append(
            pen.choice(
                [
                    "The Nasdaq Composite closed at a 52-week high.",
                    "The Nasdaq finished at its highest level in 52 weeks.",
                ]
            )
        )
    elif cx.nqs.lo252[i] == i:
        out.append(
            pen.choice(
                [
                    "The Nasdaq Composite closed at a 52-week low.",
                    "The Nasdaq ended at its lowest in 52 weeks.",
                ]
            )
        )
    return out


def equity_shape_items(pen: Pen, cx: Ctx, f: dict) -> list[str]:
    """Where in its range the index closed, the open-to-close move, and how rare a move of this size is."""
    out = []
    if f["h"] > f["l"]:
        loc = (f["c"] - f["l"]) / (f["h"] - f["l"])
        where = (
            "at the very top of"
            if loc >= 0.95
            else "near the top of"
            if loc >= 0.75
            else "at the very bottom of"
            if loc <= 0.05
            else "near the bottom of"
            if loc <= 0.25
            else "in the middle of"
        )
        out.append(
            pen.say(
                [
                    "{Index} closed {w} its intraday range.",
                    "The close came {w} the day's range, between {l} and {h}.",
                    "By the final bell {index} sat {w} its {session} range.",
                ],
                w=where,
                l=f2(f["l"]),
                h=f2(f["h"]),
            )
        )
    oc = pct(f["c"], f["o"])
    if abs(oc) >= 0.3 and pen.chance(0.5):
        out.append(
            pen.say(
                [
                    "From the opening bell to the close, {index} {mv}.",
                    "Measured from the open at {o}, the day's {gw} was {a}.",
                ],
                mv=moved(pen, oc, EQUITY, fp(oc)),
                o=f2(f["o"]),
                gw="gain" if oc > 0 else "decline",
                a=fp(oc),
            )
        )
    i, ret = f["i"], cx.sps.ret
    if abs(f["r"]) >= 1.0:
        j = i - 1
        while j > 0 and abs(ret[j]) < 1.0:
            j -= 1
        if j > 0 and i - j >= 10:
            out.append(
                pen.say(
                    [
                        "It was the first move of 1% or more in either direction in {n} sessions.",
                        "{Index} had not moved 1% or more in a {session} for {n} sessions.",
                    ],
                    n=i - j - 1,
                )
            )
        y0 = cx.period_start(i, lambda a, b: a.year == b.year)
        if abs(f["r"]) >= 2.0 and y0 is not None:
            n = sum(1 for k in range(y0 + 1, i + 1) if (ret[k] >= 2.0 if f["r"] > 0 else ret[k] <= -2.0))
            out.append(
                pen.say(
                    "It was the {o} {w} of 2% or more this year.",
                    o=ordinal(n) if n > 1 else "first",
                    w="gain" if f["r"] > 0 else "decline",
                )
            )
    return out


def equity_volume_items(pen: Pen, cx: Ctx, f: dict) -> list[str]:
    av = cx.sps.avg_vol50[f["i"]]
    if not av:
        return []
    vr = pct(f["v"], av)
    cmp_ = "in line with" if abs(vr) < 5 else f"{fp(vr)} {'above' if vr > 0 else 'below'}"
    return [
        pen.say(
            [
                "{Turnover} reached {v}, {cmp} the 50-session average of {av}.",
                "Some {v} changed hands, {cmp} the recent 50-day norm of {av}.",
                "{Turnover} came to {v}, {cmp} its 50-day average of {av}.",
                "{Turnover} was {light}: {v}, {cmp} the average of {av} over the previous 50 sessions.",
            ],
            v=fvol(f["v"]),
            av=fvol(av),
            cmp=cmp_,
            light="heavy" if vr >= 20 else "light" if vr <= -20 else "about normal",
        )
    ]


def equity_trend_items(pen: Pen, cx: Ctx, f: dict) -> list[str]:
    s, i, c = cx.sps, f["i"], f["c"]
    m50, m200 = s.ma[50][i], s.ma[200][i]
    if m200 is None:
        return []
    out = []
    if f["cross200"]:
        out.append(
            pen.say(
                [
                    "The close took {index} {ab} its {ma200} of {m}, a level many trend followers watch.",
                    "With the move {spx} crossed {ab} its {ma200}, now at {m}.",
                ],
                ab="above" if c > m200 else "below",
                m=f2(m200),
            )
        )
    else:
        d50, d200 = pct(c, m50), pct(c, m200)
        out.append(
            pen.say(
                [
                    "{Index} sits {a50} {ab50} its 50-day moving average of {m50} and {a200} {ab200} its "
                    "{ma200} of {m200}.",
                    "Against its trend lines, {spx} is {a200} {ab200} the 200-day moving average of {m200} "
                    "and {a50} {ab50} the 50-day of {m50}.",
                    "The 50-day moving average stands at {m50} and the 200-day at {m200}; the close is "
                    "{a200} {ab200} "
                    "the longer one.",
                ],
                a50=fp(d50),
                ab50="above" if d50 >= 0 else "below",
                m50=f2(m50),
                a200=fp(d200),
                ab200="above" if d200 >= 0 else "below",
                m200=f2(m200),
            )
        )
    pm50, pm200 = s.ma[50][i - 1], s.ma[200][i - 1]
    if pm200 is not None and (pm50 - pm200) * (m50 - m200) < 0:
        up = m50 > m200
        out.append(
            f"The 50-day average, at {f2(m50)}, crossed {'above' if up else 'below'} the 200-day "
            f"average of {f2(m200)}, a pattern chartists call a {'golden' if up else 'death'} cross."
        )
    return out


def equity_peak_items(pen: Pen, cx: Ctx, f: dict) -> list[str]:
    s, i, c, dates = cx.sps, f["i"], f["c"], cx.dates
    hi = s.hi252[i]
    if hi is None:
        return []
    if f["new_high"]:
        j = f["high_since"]
        return [
            pen.say(
                [
                    "The close is a new 52-week high for {index}, and its highest {since}.",
                    "That is the highest close in 52 weeks, and the best finish {since}.",
                ],
                since=since_phrase(dates, j, "January 1999"),
            )
        ]
    dd = pct(c, s.c[hi])
    if f["new_low"]:
        return [
            pen.say(
                [
                    "The close is the lowest in 52 weeks, {dd} below the 52-week high of {hv} set on {hd}.",
                    "{Index} finished at a 52-week low, {dd} under its {highword} of {hv} from {hd}.",
                ],
                dd=fp(dd),
                hv=f2(s.c[hi]),
                hd=short_date(dates[hi]),
            )
        ]
    zone = (
        ", deep in bear-market territory" if dd <= -20 else ", in correction territory" if dd <= -10 else ""
    )
    out = [
        pen.say(
            [
                "{Spx} stands {dd} below its 52-week closing high of {hv}, set on {hd}{z}.",
                "{Index} is {dd} off the 52-week {highword} of {hv} reached on {hd}{z}.",
                "From the 52-week {highword} of {hv} on {hd}, the drawdown is {dd}{z}.",
            ],
            dd=fp(dd),
            hv=f2(s.c[hi]),
            hd=short_date(dates[hi]),
            z=zone,
        )
    ]
    pk = s.peak[i]
    if pk != hi and pct(c, s.c[pk]) <= -15 and pen.chance(0.5):
        out.append(
            f"Measured from the highest close since January 1999, {f2(s.c[pk])} on "
            f"{short_date(dates[pk])}, {pen.say('{spx}')} is down {fp(pct(c, s.c[pk]))}."
        )
    return out


def equity_momentum_items(pen: Pen, cx: Ctx, f: dict) -> list[str]:
    out, k = [], f["streak"]
    if abs(k) >= 3:
        out.append(
            pen.say(
                [
                    "It was the {o} straight {w} for {spx}.",
                    "{Spx} has now closed {hl} for {n} sessions in a row.",
                    "That makes {n} consecutive {ws} for {index}.",
                ],
                o=ordinal(abs(k)),
                w="gain" if k > 0 else "decline",
                ws="gains" if k > 0 else "declines",
                hl=higher_lower(k),
                n=abs(k),
            )
        )
    j = f["big_since"]
    if j not in ("skip", None) and f["i"] - j >= 5:
        out.append(
            pen.say(
                [
                    "It was the biggest one-day percentage {gl} for {spx} since {bd}.",
                    "Not since {bd} had {index} {mv} by as much in a single {session}.",
                ],
                gl="gain" if f["r"] > 0 else "drop",
                bd=short_date(cx.dates[j]),
                mv="risen" if f["r"] > 0 else "fallen",
            )
        )
    rv = cx.sps.vol20[f["i"]]
    if rv is not None:
        out.append(
            pen.say(
                [
                    "Twenty-day realized volatility is {rv} annualized, {a} {reg} reading.",
                    "Realized volatility over the past 20 sessions runs at {rv} on an annualized basis, "
                    "which counts as {reg}.",
                    "Measured over 20 sessions, the index's realized volatility is {rv} a year: {reg}.",
                ],
                rv=fp(rv),
                reg=vol_regime(rv),
                a=a_an(vol_regime(rv)),
            )
        )
    if f["mtd"] is not None and f["ytd"] is not None:
        out.append(
            pen.say(
                [
                    "Month to date {index} is {m}; year to date it is {y}.",
                    "For {mon}, {spx} is {m} {sofar}, and {y} since the start of {yr}.",
                    "That leaves {index} {yp} for the year and {mp} for the month.",
                ],
                m=fsp(f["mtd"]),
                y=fsp(f["ytd"]),
                yp=up_down_by(f["ytd"]),
                mp=up_down_by(f["mtd"]),
                mon=MONTHS[f["d"].month - 1],
                yr=f["d"].year,
            )
        )
    return out


def equity_cross_asset_items(pen: Pen, cx: Ctx, f: dict) -> list[str]:
    out, d, r = [], f["d"], f["r"]
    oc = cx.wti.change(d)
    if oc:
        price, orr, _ = oc
        gap = cx.wti_gap(cx.wti.index[d])
        since = f" since {short_date(gap)}" if gap else ""  # the oil series misses the day before
        s = pen.say(
            [
                "{Meanwhile} {oil} {mv} {barrel}.",
                "In commodities, WTI crude {mv}.",
                "{Meanwhile} WTI crude {mv} {barrel}.",
            ],
            mv=moved(pen, orr, OIL, fp(orr) + since, f"${f2(price)}"),
        )
        if abs(orr) >= 1.0 and abs(r) >= 0.5 and not gap and pen.chance(0.7):
            s += " " + (
                "Oil and stocks moved together on the day."
                if (orr > 0) == (r > 0)
                else "Oil and stocks moved in opposite directions on the day."
            )
        out.append(s)
    vc = cx.vix.change(d)
    if vc:
        lv, _, ch = vc
        out.append(
            pen.say(
                [
                    "The CBOE Volatility Index (VIX) closed at {lv}, {ud} {ch} points, a level that reads as "
                    "{reg}.",
                    "The VIX, Wall Street's fear gauge, {ud2} {ch} points to {lv}, which is {reg}.",
                    "Implied volatility, measured by the VIX, finished at {lv}, {ud} {ch} points: {reg}.",
                ],
                lv=f2(lv),
                ud=up_down(ch),
                ud2="rose" if ch >= 0 else "fell",
                ch=f2(abs(ch)),
                reg=vix_regime(lv),
            )
        )
    return out


def equities_story(cx: Ctx, i: int) -> str:
    f = equity_facts(cx, i)
    f["dates"] = cx.dates
    pen = Pen(f"equities:{f['d'].isoformat()}")
    head, lede = equity_headline(pen, f), equity_lede(pen, f)
    items = (
        equity_nasdaq_items(pen, cx, f, f2(f["nc"]) in lede)
        + equity_range_items(pen, f)
        + equity_peak_items(pen, cx, f)
        + equity_momentum_items(pen, cx, f)
        + equity_shape_items(pen, cx, f)
        + equity_volume_items(pen, cx, f)
        + equity_trend_items(pen, cx, f)
        + equity_cross_asset_items(pen, cx, f)
    )
    if pen.chance(0.12):
        items.append(pen.choice(EVERGREEN["equities"]))
    return article(pen, head, dateline("NEW YORK", f["d"]), lede, items, keep=0.55, most=7)


# -----------------------------------------------------------------------------
# commodities desk: oil on eventful days (big moves, 52-week extremes, streaks, round numbers)


def oil_eventful(cx: Ctx, k: int) -> bool:
    s = cx.oils
    return k > 0 and (
        abs(s.ret[k]) >= 4.0
        or s.hi252[k] == k
        or s.lo252[k] == k
        or abs(s.streak[k]) >= 6
        or int(s.c[k] // 10) != int(s.c[k - 1] // 10)
        and abs(s.ret[k]) >= 1.0
    )


def oil_items(pen: Pen, cx: Ctx, k: int) -> list[str]:
    s, d, p = cx.oils, cx.wti.dates[k], cx.oils.c[k]
    out = []
    if s.hi252[k] is not None:
        hi, lo = s.hi252[k], s.lo252[k]
        out.append(
            pen.say(
                [
                    "Over the past 52 weeks WTI has ranged from ${lo} on {lod} to ${hi} on {hid}.",
                    oil_range_template(k, hi, lo),
                ],
                lo=f2(s.c[lo]),
                hi=f2(s.c[hi]),
                lod=short_date(cx.wti.dates[lo]),
                hid=short_date(cx.wti.dates[hi]),
                dh=fp(pct(p, s.c[hi])),
                dl=fp(pct(p, s.c[lo])),
            )
        )
    if s.ma[200][k] is not None:
        out.append(
            pen.say(
                [
                    "{Oil} now trades {a} {ab} its 200-day moving average of ${m}.",
                    "The 200-day average for WTI stands at ${m}; the spot price is {a} {ab} it.",
                ],
                a=fp(pct(p, s.ma[200][k])),
                ab="above" if p >= s.ma[200][k] else "below",
                m=f2(s.ma[200][k]),
            )
        )
    if abs(s.streak[k]) >= 3:
        out.append(
            pen.say(
                "It was the {o} straight {w} for {oil}.",
                o=ordinal(abs(s.streak[k])),
                w="gain" if s.streak[k] > 0 else "decline",
            )
        )
    y0 = bisect.bisect_left(cx.wti.dates, dt.date(d.year, 1, 1)) - 1
    if y0 >= 0:
        ytd = pct(p, s.c[y0])
        out.append(
            pen.say(
                ["Year to date, {oil} is {up} {a}.", "{Oil} has {gl} {a} since the end of {py}."],
                up=up_down(ytd),
                a=fp(ytd),
                gl="gained" if ytd >= 0 else "lost",
                py=d.year - 1,
            )
        )
    if s.vol20[k] is not None:
        out.append(pen.say("Twenty-day realized volatility in {oil} is {v} annualized.", v=fp(s.vol20[k])))
    i = cx.session.get(d)
    if i is not None and i > 0:
        out.append(
            pen.say(
                [
                    "In equities, {spx} {mv}.",
                    "{Stocks} {ended} {hl}: {spx} {mv}.",
                ],
                mv=moved(pen, cx.sps.ret[i], EQUITY, fp(cx.sps.ret[i]), f2(cx.sps.c[i])),
                hl=higher_lower(cx.sps.ret[i]),
            )
        )
    pm = (d.year - 1, 12) if d.month == 1 else (d.year, d.month - 1)
    if pm in cx.data["crude"] and pen.chance(0.5):
        b, w = cx.data["crude"][pm]
        out.append(
            pen.say(
                "In {mon}, Brent averaged ${b} a barrel against ${w} for WTI.",
                mon=month_name(*pm),
                b=f2(b),
                w=f2(w),
            )
        )
    return out


def oil_range_template(k: int, hi: int, lo: int) -> str:
    """Where the price sits in its 52-week range: at an extreme it is there, not '0.00% below' it."""
    if hi == k:
        return "The price is at its 52-week {highword}, {dl} above the {lowword} of ${lo}."
    if lo == k:
        return "At {dh} below its 52-week {highword} of ${hi}, the price is at the 52-week {lowword}."
    return "The price sits {dh} below its 52-week {highword} of ${hi} and {dl} above the {lowword} of ${lo}."


def last_bigger_abs(ret: list, k: int):
    a = abs(ret[k])
    for j in range(k - 1, 0, -1):
        if abs(ret[j]) >= a:
            return j
    return None


def last_past(vals: list, k: int, level: float, above: bool):
    """The latest j < k with vals[j] at or beyond level, or None."""
    for j in range(k - 1, -1, -1):
        if (vals[j] >= level) if above else (vals[j] <= level):
            return j
    return None


def oil_headline(pen: Pen, cx: Ctx, k: int) -> str:
    s, p, r = cx.oils, cx.oils.c[k], cx.oils.ret[k]
    subj, plural = pen.choice(
        [
            ("Oil", False),
            ("Crude", False),
            ("U.S. crude", False),
            ("WTI crude", False),
            ("Oil prices", True),
            ("Crude prices", True),
        ]
    )
    v = head_verb(pen, r, OIL, plural)
    if int(p // 10) != int(s.c[k - 1] // 10):
        lvl = int(p // 10) * 10 if r > 0 else int(s.c[k - 1] // 10) * 10
        j = last_past(s.c, k - 1, lvl, r > 0)
        up = "reach" if p == lvl else "top"  # exactly $30.00 reaches $30, it does not top it
        move = (up if r > 0 else "fall below") if plural else third(up if r > 0 else "fall below")
        if j is not None and k - j > 20:
            return f"{subj} {move} ${lvl} for first time since {short_date(cx.wti.dates[j])}"
        return f"{subj} {move} ${lvl}"
    if (s.hi252[k] == k or s.lo252[k] == k) and abs(r) < OIL.flat:  # it stayed there: no "hits", no "sinks"
        hold = "hold" if plural else "holds"
        return f"{subj} {hold} at 52-week {'high' if s.hi252[k] == k else 'low'} of ${f2(p)}"
    if s.hi252[k] == k:
        return pen.say(
            ["{s} {v} to 52-week high", "Oil hits highest in a year at ${p}"], s=subj, v=v, p=f2(p)
        )
    if s.lo252[k] == k:
        return pen.say(
            ["{s} {v} to 52-week low", "Oil sinks to lowest in a year at ${p}"], s=subj, v=v, p=f2(p)
        )
    if abs(s.streak[k]) >= 5:
        return pen.say(
            "Oil {w} streak reaches {n} sessions", w="winning" if r > 0 else "losing", n=abs(s.streak[k])
        )
    return pen.say(
        ["{s} {v}{p}", "{s} {v} to ${lvl}", "{s} {v}{p} in {adj} session"],
        s=subj,
        v=v,
        p=hp(r, OIL),
        lvl=f2(p),
        adj="volatile" if abs(r) >= 5 else "active",
    )


def oil_lede(pen: Pen, cx: Ctx, k: int) -> str:
    s, d = cx.oils, cx.wti.dates[k]
    r, p, chg = s.ret[k], s.c[k], s.c[k] - s.c[k - 1]
    gap = cx.wti_gap(k)
    since = f" since {short_date(gap)}" if gap else ""  # the oil series misses the day before
    cents = f"{abs(chg) * 100:.0f} cents" if abs(chg) < 0.995 else None
    amount = (
        pen.choice(["${c}, or {r}", "{r}"] + ([cents + ", or {r}"] if cents else [])).format(
            c=f2(abs(chg)), r=fp(r)
        )
        + since
    )
    j = last_bigger_abs(s.ret, k)
    clause = (
        f"its biggest move in either direction since {short_date(cx.wti.dates[j])}"
        if j is not None and k - j > 20
        else None
    )
    kw = dict(
        mv=moved(pen, r, OIL, amount, f"${f2(p)}"),
        wd=WEEKDAYS[d.weekday()],
        hl="rose" if r > 0 else "fell",
        p=f2(p),
        ud=up_down(r),
        a=fp(r),
        pp=f2(s.c[k - 1]) + (f" on {short_date(gap)}" if gap else ""),
        clause=clause,
    )
    if clause:
        return pen.say(
            [
                "{Oil} {mv} {barrel} on {wd}, {clause}.",
                "{Oil} {mv} {barrel} on {wd} in {oilmarket}, {clause}.",
            ],
            **kw,
        )
    return pen.say(
        [
            "{Oil} {mv} {barrel} on {wd}.",
            "Oil prices held on {wd}, with West Texas Intermediate unchanged at ${p} {barrel}."
            if prints_as_zero(r)
            else "Oil prices {hl} on {wd}, with West Texas Intermediate at ${p} {barrel}, {ud} {a} from the "
            "previous price of ${pp}.",
            "In {oilmarket}, {oil} {mv} {barrel} on {wd}.",
        ],
        **kw,
    )


def oil_story(cx: Ctx, k: int) -> str:
    d = cx.wti.dates[k]
    pen = Pen(f"oil:{d.isoformat()}")
    head, lede = oil_headline(pen, cx, k), oil_lede(pen, cx, k)
    items = oil_items(pen, cx, k)
    if pen.chance(0.15):
        items.append(pen.choice(EVERGREEN["oil"]))
    return article(pen, head, dateline("NEW YORK", d), lede, items)


# -----------------------------------------------------------------------------
# volatility desk: the VIX on eventful days


def vix_eventful(cx: Ctx, k: int) -> bool:
    v = cx.vixs
    if k == 0:
        return False
    crossed = any((v.c[k - 1] - t) * (v.c[k] - t) < 0 for t in (15, 20, 30))
    return abs(v.ret[k]) >= 10 or crossed or v.hi252[k] == k or v.lo252[k] == k


def vix_items(pen: Pen, cx: Ctx, k: int, i) -> list[str]:
    v, lv = cx.vixs, cx.vixs.c[k]
    out = [
        pen.say(
            ["A reading of {lv} counts as {reg}.", "At {lv}, the index signals {anx} levels of anxiety."],
            lv=f2(lv),
            reg=vix_regime(lv),
            anx=vix_regime(lv).split(",")[0],  # "high", not "high, signalling stress levels of anxiety"
        )
    ]
    for t in (15, 20, 30):
        if (v.c[k - 1] - t) * (lv - t) < 0:
            out.append(f"The index crossed {'above' if lv > t else 'below'} {t}, a level many traders watch.")
    if i is not None and i > 0:
        r = cx.sps.ret[i]
        out.append(
            pen.say(
                ["{Spx} {mv} on the day.", "In the cash market, {spx} {mv}."],
                mv=moved(pen, r, EQUITY, fp(r), f2(cx.sps.c[i])),
            )
        )
        rv = cx.sps.vol20[i]
        if rv is not None:
            gap = lv - rv
            out.append(
                pen.say(
                    [
                        "The VIX sits {pp} {ab} the S&P 500's 20-day realized volatility of {rv}.",
                        "Compared with the {rv} that the S&P 500 has actually moved over 20 sessions, "
                        "annualized, {implied} "
                        "is {pp} {hl}.",
                    ],
                    pp=fpp(gap),
                    ab="above" if gap >= 0 else "below",
                    rv=fp(rv),
                    hl="higher" if gap >= 0 else "lower",
                )
            )
    if v.hi252[k] == k:
        out.append("It was the highest close for the VIX in 52 weeks.")
    elif v.lo252[k] == k:
        out.append("It was the lowest close for the VIX in 52 weeks.")
    elif v.hi252[k] is not None:
        out.append(
            pen.say(
                "Over 52 weeks the VIX has ranged from {lo} to {hi}.",
                lo=f2(v.c[v.lo252[k]]),
                hi=f2(v.c[v.hi252[k]]),
            )
        )
    if pen.chance(0.2):
        out.append(pen.choice(EVERGREEN["vix"]))
    return out


def vix_story(cx: Ctx, k: int) -> str:
    v, d = cx.vixs, cx.vix.dates[k]
    pen = Pen(f"volatility:{d.isoformat()}")
    lv, ch, r = v.c[k], v.c[k] - v.c[k - 1], v.ret[k]
    i = cx.session.get(d)
    hv = head_verb(pen, r, VIXT, False)
    heads = [
        "Volatility gauge {hv} to {lv}",
        "VIX {hv} to {lv}",
        "Fear gauge {hv}{p}",
        "Wall Street's fear gauge {hv}{p}",
    ]
    if i is not None and i > 0:
        heads.append("VIX {hv}{p} as stocks " + ("rise" if cx.sps.ret[i] > 0 else "fall"))
    head = pen.say(heads, hv=hv, p=hp(r, VIXT), lv=f2(lv))
    lede = pen.say(
        [
            "{Vix} {mv} on {wd}, {ud} {pts} points.",
            "{Implied} on U.S. stocks {hl} on {wd}, with {vix} ending at {lv}, {ud} {pts} points from the "
            "previous session.",
        ],
        mv=moved(pen, r, VIXT, fp(r), f2(lv)),
        wd=WEEKDAYS[d.weekday()],
        ud=up_down(ch),
        pts=f2(abs(ch)),
        hl="rose" if ch > 0 else "fell",
        lv=f2(lv),
    )
    return article(pen, head, dateline("CHICAGO", d), lede, vix_items(pen, cx, k, i))


# -----------------------------------------------------------------------------
# rates and credit desk: Moody's Aaa / Baa yields every month since 1919


def prev_month(y: int, m: int, back: int = 1) -> tuple[int, int]:
    k = y * 12 + (m - 1) - back
    return k // 12, k % 12 + 1


def month_end(y: int, m: int) -> dt.date:
    y2, m2 = prev_month(y, m, -1)
    return dt.date(y2, m2, 1) - dt.timedelta(days=1)


def monthly_since(series: dict, keys: list, k: int, value, above: bool) -> str | None:
    """'since March 2009' for a monthly value that is the highest (above) / lowest for at least a
    year, else None. keys are the series' months in order, k the position of this month."""
    v = value(series[keys[k]])
    for j in range(k - 1, -1, -1):
        x = value(series[keys[j]])
        if (x >= v) if above else (x <= v):
            return f"since {month_name(*keys[j])}" if k - j >= 12 else None
    return f"since at least {month_name(*keys[0])}" if k >= 12 else None


def credit_story(cx: Ctx, keys: list, k: int) -> str:
    credit, (y, m) = cx.data["credit"], keys[k]
    pen = Pen(f"credit:{y:04d}-{m:02d}")
    aaa, baa = credit[(y, m)]
    spread = baa - aaa
    kw = dict(ya=fp(aaa), yb=fp(baa), sp=fbp(spread), mon=MONTHS[m - 1], y=y)
    items = []
    if k > 0:
        paaa, pbaa = credit[keys[k - 1]]
        da, ds = aaa - paaa, spread - (pbaa - paaa)
        kw.update(
            w="widened" if ds > 0 else "narrowed",
            dbp=fbp(ds),
            ad="rose" if da > 0 else "fell",
            dabp=fbp(da),
            ud=up_down(da),
        )
        heads = ["Credit spreads {w} in {mon} {y}", "Baa-Aaa spread {w} to {sp}"] if abs(ds) >= 0.005 else []
        if abs(da) >= 0.005:  # a direction only for what moved
            heads += [
                "Corporate bond yields {ad} in {mon}; spread at {sp}",
                "{Mon} {y}: top-rated corporate yields {ad} {dabp}",
            ]
        head = pen.say(heads or "Corporate bond yields steady in {mon} {y}", **kw)
        items.append(
            pen.say(
                [
                    "{Aaa} yielded {ya} on average, {ud} {dabp} from the month before.",
                    "The average Aaa yield {ad} {dabp} to {ya}.",
                ],
                **kw,
            )
            if abs(da) >= 0.005
            else "Aaa yields were unchanged from the month before."
        )
        items.append(
            pen.say(
                [
                    "{Spread} {w} by {dbp} from the previous month.",
                    "Compared with a month earlier, {spread} {w} {dbp}.",
                ],
                **kw,
            )
            if abs(ds) >= 0.005
            else "The spread was unchanged from the previous month."
        )
    else:
        head = pen.say("Corporate bond yields in {mon} {y}: Aaa {ya}, Baa {yb}", **kw)
    lede = pen.say(
        [
            "{Baa} yielded {yb} on average in {mon} {y}, and {aaa} {ya}, leaving {spread} at {sp}.",
            "{Borrowing} in {mon} {y}: Aaa yields averaged {ya} and Baa yields {yb}, a spread of {sp}.",
            "{Spread} stood at {sp} in {mon} {y}, with Aaa bonds at {ya} and Baa bonds at {yb}.",
            "Moody's seasoned Aaa corporate bonds yielded {ya} on average in {mon} {y} and Baa bonds {yb}, a "
            "default spread of {sp}.",
        ],
        **kw,
    )
    items += credit_context(pen, cx, keys, k)
    if pen.chance(0.2):
        items.append(pen.choice(EVERGREEN["credit"]))
    return article(pen, head, dateline("NEW YORK", month=(y, m)), lede, items)


def credit_context(pen: Pen, cx: Ctx, keys: list, k: int) -> list[str]:
    credit, (y, m) = cx.data["credit"], keys[k]
    out = []
    wide = monthly_since(credit, keys, k, lambda t: t[1] - t[0], True)
    narrow = monthly_since(credit, keys, k, lambda t: t[1] - t[0], False)
    if wide or narrow:
        out.append(
            pen.say(
                ["That is the {w} spread {s}.", "{Spread} is the {w} {s}."],
                w="widest" if wide else "narrowest",
                s=wide or narrow,
            )
        )
    hi = monthly_since(credit, keys, k, lambda t: t[1], True)
    lo = monthly_since(credit, keys, k, lambda t: t[1], False)
    if hi or lo:
        out.append(
            pen.say("Baa yields are at their {w} level {s}.", w="highest" if hi else "lowest", s=hi or lo)
        )
    if k >= 12 and pen.chance(0.7):
        a0, b0 = credit[keys[k - 12]]
        ys = (credit[(y, m)][1] - credit[(y, m)][0]) - (b0 - a0)
        out.append(
            f"Over twelve months the spread has {'widened' if ys > 0 else 'narrowed'} by {fbp(ys)}."
            if abs(ys) >= 0.005
            else "The spread is unchanged from a year ago."
        )
    if (y, m) in cx.data["ff"]:
        rf = cx.data["ff"][(y, m)][3]
        out.append(pen.say("{Bills} returned {rf} over the month.", rf=fpct(rf)))
    return out


# -----------------------------------------------------------------------------
# macro desk: core CPI each month, GDP and its parts each quarter


def cpi_story(cx: Ctx, keys: list, k: int):
    cpi, (y, m) = cx.data["cpi"], keys[k]
    if k < 12:
        return None
    pen = Pen(f"cpi:{y:04d}-{m:02d}")
    mom, yoy = pct(cpi[keys[k]], cpi[keys[k - 1]]), pct(cpi[keys[k]], cpi[keys[k - 12]])
    pyoy = pct(cpi[keys[k - 1]], cpi[keys[k - 13]]) if k >= 13 else yoy
    kw = dict(
        mon=MONTHS[m - 1],
        y=y,
        mom=fp(mom),
        smom=fsp(mom),
        yoy=fp(yoy),
        syoy=fsp(yoy),
        pyoy=fp(pyoy),
        rf="rose" if mom > 0 else "fell",
        lvl=f"{cpi[keys[k]]:.3f}",
        ac="accelerated" if yoy > pyoy else "slowed",
    )
    held = f2(yoy) == f2(pyoy)  # the annual rate as printed did not move
    flat = prints_as_zero(mom)
    head = (
        pen.say(
            [
                "Core inflation holds at {yoy} in {mon}" if held else "Core inflation {ac} to {yoy} in {mon}",
                "Core CPI {rf} {mom} in {mon} {y}",
                "U.S. core prices {rf} {mom}; annual rate {yoy}",
                "Underlying inflation at {yoy} in {mon}",
            ],
            **kw,
        )
        if not flat
        else pen.say("Core consumer prices unchanged in {mon} {y}", **kw)
    )
    lede = pen.say(
        [
            "{Core} {rf} {mom} in {mon} {y}, for a year-over-year rate of {syoy}.",
            "{Core} moved {smom} in {mon} {y} from the month before, leaving twelve-month core inflation at "
            "{yoy}.",
            "Core inflation printed {smom} for {mon} {y}; the annual rate is {syoy}.",
        ]
        if not flat
        else ["{Core} showed no change in {mon} {y}; the annual rate is {syoy}."],
        **kw,
    )
    items = [
        pen.say(
            [
                "The annual rate was also {pyoy} the month before."
                if held
                else "The annual rate {ac} from {pyoy} the month before.",
                "That compares with a twelve-month rate of {pyoy} in the previous month.",
            ],
            **kw,
        ),
        pen.say("The core index stood at {lvl}.", **kw),
    ]
    g = cpi[keys[k]] / cpi[keys[k - 3]]
    items.append(
        pen.say(
            "Over three months core prices are running at a {a} annualized pace.",
            a=fsp((g * g * g * g - 1.0) * 100.0),
        )
    )
    yoys = {keys[j]: pct(cpi[keys[j]], cpi[keys[j - 12]]) for j in range(12, k + 1)}
    ks = keys[12 : k + 1]
    for above, word in ((True, "fastest"), (False, "slowest")):
        s = monthly_since(yoys, ks, len(ks) - 1, lambda t: t, above)
        if s:
            items.append(f"It is the {word} annual rate of core inflation {s}.")
    if pen.chance(0.2):
        items.append(pen.choice(EVERGREEN["cpi"]))
    return article(pen, head, dateline("WASHINGTON", month=(y, m)), lede, items)


def gdp_story(cx: Ctx, keys: list, k: int):
    macro, (y, q) = cx.data["macro"], keys[k]
    if k == 0:
        return None
    pen = Pen(f"gdp:{y}Q{q}")
    cur = macro[(y, q)]
    saar = {}
    for j in range(1, k + 1):
        g = macro[keys[j]]["gdp"] / macro[keys[j - 1]]["gdp"]
        saar[keys[j]] = (g * g * g * g - 1.0) * 100.0  # quarter-on-quarter growth at an annual rate
    s = saar[(y, q)]
    kw = dict(
        q=q,
        y=y,
        o=["first", "second", "third", "fourth"][q - 1],
        s=fp(s),
        an=a_an(fp(s)),
        lvl=f"{cur['gdp']:,.1f}",
        gw="grew" if s >= 0 else "shrank",
        ex="expanded" if s >= 0 else "contracted",
    )
    head = pen.say(
        [
            "U.S. economy {gw} at {s} pace in Q{q} {y}",
            "GDP {gw} {s} in {o} quarter of {y}",
            "Economy {ex} at {s} annual rate in Q{q}",
        ],
        **kw,
    )
    lede = pen.say(
        [
            "{Gdp} {gw} at {an} {s} annualized rate in the {o} quarter of {y}, to ${lvl} billion in chained "
            "2005 dollars.",
            "{Economy} {ex} at an annual rate of {s} in the {o} quarter of {y}, with real output at ${lvl} "
            "billion.",
        ],
        **kw,
    )
    items = gdp_items(pen, cx, keys, k, saar)
    if pen.chance(0.25):
        items.append(pen.choice(EVERGREEN["gdp"]))
    return article(pen, head, dateline("WASHINGTON"), lede, items)


def gdp_items(pen: Pen, cx: Ctx, keys: list, k: int, saar: dict) -> list[str]:
    macro = cx.data["macro"]
    cur, prev = macro[keys[k]], macro[keys[k - 1]]
    ks = keys[1 : k + 1]
    out = []
    for above, word in ((True, "fastest"), (False, "weakest")):
        s = monthly_since_q(saar, ks, above)
        if s:
            out.append(f"It was the {word} growth rate {s}.")
    neg = 0
    for key in reversed(ks):
        if saar[key] >= 0:
            break
        neg += 1
    if neg >= 2:
        out.append(f"Output has now contracted for {neg} quarters in a row.")
    if k >= 4:
        ya = macro[keys[k - 4]]
        out.append(
            pen.say(
                ["From a year earlier, {gdp} is {a}.", "Compared with a year ago, output is {a}."],
                a=fsp(pct(cur["gdp"], ya["gdp"])),
            )
        )
        out.append(
            pen.say(
                "{M1} {g} over four quarters, to ${v} billion.",
                g=grew(pct(cur["m1"], ya["m1"])),
                v=f2(cur["m1"]),
            )
        )
    out.append(
        pen.say(
            [
                "{Consumers} {c} on the quarter and {invest} {i}.",
                "{Consumers} {c} while {invest} {i} from the previous quarter.",
            ],
            c=rose_fell(pct(cur["cons"], prev["cons"])),
            i=rose_fell(pct(cur["inv"], prev["inv"])),
        )
    )
    out.append(
        pen.say(
            "{Govt} {a} and real disposable income {d}.",
            a=rose_fell(pct(cur["govt"], prev["govt"])),
            d=rose_fell(pct(cur["dpi"], prev["dpi"])),
        )
    )
    du = cur["unemp"] - prev["unemp"]
    out.append(
        pen.say(
            ["{Jobless} averaged {u}, {ch}.", "Unemployment ran at {u} ({ch})."],
            u=fp(cur["unemp"]),
            ch="unchanged from the prior quarter"
            if abs(du) < 0.05
            else f"{'up' if du > 0 else 'down'} {fpp(du)} on the quarter",
        )
    )
    dtb = cur["tbill"] - prev["tbill"]
    out.append(
        pen.say(
            [
                "{Tbill} was {t}, {ch}; the ex-post real rate was {r}.",
                "Short rates: the 3-month T-bill stood at {t} ({ch}) and the real rate at {r}.",
            ],
            t=fp(cur["tbill"]),
            r=fsp(cur["realint"]),
            ch="unchanged" if abs(dtb) < 0.005 else f"{'up' if dtb > 0 else 'down'} {fbp(dtb)}",
        )
    )
    out.append(f"Annualized quarterly inflation measured {fsp(cur['infl'])}.")
    return out


def monthly_since_q(series: dict, keys: list, above: bool) -> str | None:
    """The quarterly twin of monthly_since, for the last key: 'since the third quarter of 2001'."""
    k, v = len(keys) - 1, series[keys[-1]]
    for j in range(k - 1, -1, -1):
        x = series[keys[j]]
        if (x >= v) if above else (x <= v):
            return f"since the {QUARTERS[keys[j][1] - 1]} quarter of {keys[j][0]}" if k - j >= 8 else None
    return f"since at least {keys[0][0]}" if k >= 8 else None


QUARTERS = ["first", "second", "third", "fourth"]


# -----------------------------------------------------------------------------
# factor desk: Fama-French market, size and value returns each month since 1926


def factor_story(cx: Ctx, keys: list, k: int) -> str:
    ff, (y, m) = cx.data["ff"], keys[k]
    pen = Pen(f"factors:{y:04d}-{m:02d}")
    mkt, smb, hml, rf = ff[(y, m)]
    tot = mkt + rf
    kw = dict(
        mon=MONTHS[m - 1],
        y=y,
        tot=fp(tot),
        stot=fsp(tot),
        mkt=fsp(mkt),
        rf=fpct(rf),  # bills returned less than nothing in some 1930s months
        smb=f" by {fpp(smb)}" if smb else "",  # the factors are given to two decimals: 0 is a tie
        hml=f" by {fpp(hml)}" if hml else "",
        ssmb=fsp(smb),
        shml=fsp(hml),
        sv="beat" if smb > 0 else "lagged" if smb < 0 else "matched",
        vv="beat" if hml > 0 else "lagged" if hml < 0 else "matched",
        gl="returned" if prints_as_zero(tot) else "gained" if tot > 0 else "lost",  # no "gained 0.00%"
    )
    head = pen.say(
        [
            "{Smallcaps} {sv} {largecaps} in {mon} {y}",
            "Value {vv} growth in {mon}",
            "U.S. market {gl} {tot} in {mon} {y}",
            "Factor returns, {mon} {y}: market {stot}",
        ],
        **kw,
    )
    lede = pen.choice(
        [
            "{Market} {gl} {tot} in {mon} {y}, or {mkt} over {bills}, which paid {rf}.",
            "{Smallcaps} {sv} {largecaps}{smb} in {mon} {y}, while {value} {vv} {growth}{hml}.",
            "In the Fama-French factors for {mon} {y}, the market returned {mkt} over the risk-free rate of "
            "{rf}; size (SMB) was {ssmb} and value (HML) {shml}.",
        ]
    )
    items = [  # what the lede has not said already
        pen.say(t, **kw)
        for t, said in (
            ("{Smallcaps} {sv} {largecaps}{smb}.", "smb}" in lede),
            ("{Value} {vv} {growth}{hml}.", "hml}" in lede),
            ("Including the risk-free return, {market} {gl} {tot}.", "{tot}" in lede),
        )
        if not said
    ]
    lede = pen.say(lede, **kw)
    best = monthly_since(ff, keys, k, lambda t: t[0] + t[3], tot >= 0)
    if best:
        items.append(f"It was the {'best' if tot >= 0 else 'worst'} month for the market {best}.")
    if k >= 11:
        g = 1.0
        for j in range(k - 11, k + 1):
            g *= 1.0 + (ff[keys[j]][0] + ff[keys[j]][3]) / 100.0
        items.append(
            pen.say(
                "Over the past twelve months, compounded, {market} has returned {a}.",
                a=fsp((g - 1.0) * 100.0),
            )
        )
    if pen.chance(0.2):
        items.append(pen.choice(EVERGREEN["factors"]))
    return article(pen, head, dateline("CHICAGO", month=(y, m)), lede, items)


# -----------------------------------------------------------------------------
# commodities desk, monthly: WTI daily averages and the Brent-WTI spread


def oil_month_story(cx: Ctx, y: int, m: int):
    crude, wm = cx.data["crude"], cx.wti_month
    if (y, m) not in wm or wm[(y, m)][1] < 15:  # a month the daily series only starts or ends in
        return None
    pen = Pen(f"oil-month:{y:04d}-{m:02d}")
    avg, n = wm[(y, m)]
    pm = prev_month(y, m)
    kw = dict(mon=MONTHS[m - 1], y=y, avg=f2(avg), n=n)
    head = pen.say(
        [
            "Oil averaged ${avg} in {mon} {y}",
            "Crude prices in {mon}: ${avg} on average",
            "WTI monthly: ${avg} a barrel in {mon} {y}",
        ],
        **kw,
    )
    lede = pen.say(
        [
            "West Texas Intermediate crude averaged ${avg} {barrel} over {n} trading days in {mon} {y}.",
            "{Oil} averaged ${avg} {barrel} in {mon} {y}, across {n} trading days.",
        ],
        **kw,
    )
    items = []
    if pm in wm:
        pa = wm[pm][0]
        items.append(
            pen.say(
                "That is {a} {ab} the previous month's average of ${pa}.",
                a=fp(pct(avg, pa)),
                ab="above" if avg >= pa else "below",
                pa=f2(pa),
            )
        )
    vals = [v for d, v in cx.data["wti"] if (d.year, d.month) == (y, m)]
    items.append(pen.say("Daily prices ranged from ${lo} to ${hi}.", lo=f2(min(vals)), hi=f2(max(vals))))
    if (y, m) in crude:
        b, w = crude[(y, m)]
        items.append(
            pen.say(
                [
                    "Brent averaged ${b} a barrel and WTI ${w} in the monthly series, putting Brent at {an} "
                    "${d} {pd}.",
                    "The Brent-WTI spread averaged {sp} a barrel in {mon}, with Brent at ${b} and WTI at "
                    "${w}.",
                ],
                b=f2(b),
                w=f2(w),
                d=f2(abs(b - w)),
                an=a_an(f2(abs(b - w))),
                sp=f"{'-' if b < w else ''}${f2(abs(b - w))}",
                pd="premium" if b >= w else "discount",
                mon=MONTHS[m - 1],
            )
        )
    if pen.chance(0.2):
        items.append(pen.choice(EVERGREEN["oil"]))
    return article(pen, head, dateline("NEW YORK", month=(y, m)), lede, items)


# -----------------------------------------------------------------------------
# wraps: the week, the month, the quarter and the year on Wall Street


def period_facts(cx: Ctx, idx: list[int], prev_i: int) -> dict:
    """What every wrap reports about a run of sessions idx, measured from the close at prev_i."""
    sp, cl, ncl, s = cx.sp, cx.sps.c, cx.nqs.c, cx.sps
    last = idx[-1]
    return dict(
        first=idx[0],
        last=last,
        n=len(idx),
        c=cl[last],
        pc=cl[prev_i],
        r=pct(cl[last], cl[prev_i]),
        nc=ncl[last],
        nr=pct(ncl[last], ncl[prev_i]),
        ups=sum(1 for j in idx if s.ret[j] > 0),
        downs=sum(1 for j in idx if s.ret[j] < 0),  # not n - ups: a session can close unchanged
        best=max(idx, key=lambda j: s.ret[j]),
        worst=min(idx, key=lambda j: s.ret[j]),
        hi=max(idx, key=lambda j: cl[j]),
        lo=min(idx, key=lambda j: cl[j]),
        ihi=max(idx, key=lambda j: sp.cols["high"][j]),
        ilo=min(idx, key=lambda j: sp.cols["low"][j]),
        vol=ann_vol([s.ret[j] for j in idx]) if len(idx) >= 4 else None,
    )


def wrap_lede(pen: Pen, f: dict, span: str, span_adj: str) -> str:
    zero = prints_as_zero(f["r"])  # a period that ended where it began: no gain, loss, "up 0.00%"
    templates = [
        "{Spx} {mv} {span}, ending at {c}.",
        "{Stocks} posted a {adj}{gl} {span}: {spx} closed at {c}, {ud} {a} from {pc}.",
        "{Spx} {mv} {span} to finish at {c}, while {ndx} {nmv}.",
        "{Stocks} {ended} {hl} {span}, with {spx} {ud} {a} at {c} and {ndx} {ud2} {na}.",
        "{Stocks} {ended} {adv}{hl} {span}: {spx} {mv}, ending at {c}.",
    ]
    return pen.say(
        [t for t in templates if not (zero and "{ud}" in t)],
        mv=moved(pen, f["r"], MONTH, fp(f["r"])),
        span=span,
        adj="" if span_adj[:4] in span else span_adj + " ",  # not "a yearly gain for the year"
        adv="" if zero else adverb(pen, f["r"], MONTH),
        c=f2(f["c"]),
        pc=f2(f["pc"]),
        gl=gain_loss(f["r"]),
        ud=up_down(f["r"]),
        a=fp(f["r"]),
        hl="unchanged" if zero else higher_lower(f["r"]),
        nmv=moved(pen, f["nr"], MONTH, fp(f["nr"]), f2(f["nc"])),
        ud2=up_down(f["nr"]),
        na=fp(f["nr"]),
    )


def wrap_items(pen: Pen, cx: Ctx, f: dict, when) -> list[str]:
    out = [
        pen.say(
            [
                "{Ndx} {mv} over the period to {nc}, {rel} {spx}.",
                "{Ndx} ended at {nc}, {ud} {a}, {rel} the broader market.",
            ],
            mv=moved(pen, f["nr"], MONTH, fp(f["nr"])),
            nc=f2(f["nc"]),
            ud=up_down(f["nr"]),
            a=fp(f["nr"]),
            rel=pen.choice(["ahead of", "outpacing", "beating"])
            if f["nr"] > f["r"]
            else pen.choice(["behind", "trailing", "lagging"]),
        )
    ]
    out.append(
        pen.say(
            [
                "{Index} closed higher on {u} of {n} sessions.",
                "{U} of the {n} sessions ended in the green.",
                "Advancing sessions numbered {u} out of {n}.",
                "Up days outnumbered down days {u} to {dn}."
                if f["ups"] > f["downs"]
                else "Down days outnumbered up days {dn} to {u}."
                if f["ups"] < f["downs"]
                else "Up and down days split evenly, {u} each.",
                "Gains outnumbered losses on {u} of {n} days."
                if f["ups"] > f["downs"]
                else "Losses outnumbered gains on {dn} of {n} days."
                if f["ups"] < f["downs"]
                else "Gains and losses split evenly, {u} days each.",
            ],
            u=f["ups"],
            U=spelled(f["ups"]),
            n=f["n"],
            dn=f["downs"],
        )
        if f["ups"] not in (0,)
        else pen.say("{Index} did not post a single gain in {n} sessions.", n=f["n"])
    )
    return out + wrap_range_items(pen, cx, f, when)


def wrap_range_items(pen: Pen, cx: Ctx, f: dict, when) -> list[str]:
    s, cl, out = cx.sps, cx.sps.c, []
    if f["n"] > 1:
        out.append(
            pen.say(
                ["The best session was {bd}, {br}, and the worst {wd}, {wr}."]
                + (
                    ["{Bd} brought the biggest move up, {br}; {wd} the weakest, {wr}."]
                    if s.ret[f["best"]] > 0
                    else []
                ),
                bd=when(f["best"]),
                Bd=when(f["best"]),
                br=fsp(s.ret[f["best"]]),
                wd=when(f["worst"]),
                wr=fsp(s.ret[f["worst"]]),
            )
        )
        out.append(
            pen.say(
                [
                    "The highest close of the period was {hc} on {hd} and the lowest {lc} on {ld}.",
                    "Closes ranged from {lc} on {ld} to {hc} on {hd}.",
                ],
                hc=f2(cl[f["hi"]]),
                hd=when(f["hi"]),
                lc=f2(cl[f["lo"]]),
                ld=when(f["lo"]),
            )
        )
    if f["vol"] is not None:
        out.append(
            pen.say(
                [
                    "Annualized, the daily moves imply realized volatility of {v}, {reg} by "
                    "historical standards.",
                    "Realized volatility came to {v} annualized: {reg}.",
                ],
                v=fp(f["vol"]),
                reg=vol_regime(f["vol"]),
            )
        )
    hi = s.hi252[f["last"]]
    if hi == f["last"]:
        out.append("{} ends the period at a 52-week closing high.".format(pen.say("{Spx}")))
    elif hi is not None:
        out.append(
            pen.say(
                "{Spx} ends the period {dd} below its 52-week closing high of {hv}.",
                dd=fp(pct(f["c"], cl[hi])),
                hv=f2(cl[hi]),
            )
        )
    return out


def weekly_story(cx: Ctx, idx: list[int]) -> str:
    f, d = period_facts(cx, idx, idx[0] - 1), cx.dates[idx[-1]]
    pen = Pen(f"weekly:{d.isoformat()}")
    wd = lambda j: WEEKDAYS[cx.dates[j].weekday()]  # noqa: E731
    head = pen.say(
        [
            "Week ending {d}: S&P 500 {sign}",
            "Stocks post weekly {gl}",
            "S&P 500 {v}{p} for the week",
            "Weekly wrap: S&P 500 {sign}, Nasdaq {nsign}",
            "Week in review: stocks {hl}, Nasdaq {nsign}",
        ],
        d=short_date(d),
        sign=fsp(f["r"]),
        nsign=fsp(f["nr"]),
        gl=gain_loss(f["r"]),
        p=hp(f["r"], MONTH),
        v=head_verb(pen, f["r"], MONTH, False),
        hl=higher_lower(f["r"]),
    )
    items = wrap_items(pen, cx, f, wd)
    sp = cx.sp
    items.insert(
        2,
        pen.say(
            "Intraday, {index} touched {hi} at the {highword} on {hid} and {lo} at the {lowword} on {lod}.",
            hi=f2(sp.cols["high"][f["ihi"]]),
            lo=f2(sp.cols["low"][f["ilo"]]),
            hid=wd(f["ihi"]),
            lod=wd(f["ilo"]),
        ),
    )
    items += week_cross_asset(pen, cx, idx)
    lede = wrap_lede(
        pen,
        f,
        pen.choice(["over the week", "for the week", f"in the {f['n']}-session week"]),
        "weekly" if pen.chance(0.5) else pen.choice(["solid", "clear"]) if abs(f["r"]) >= 2 else "modest",
    )
    return article(pen, head, dateline("NEW YORK", d), lede, items, keep=0.75)


def week_cross_asset(pen: Pen, cx: Ctx, idx: list[int]) -> list[str]:
    d, pd = cx.dates[idx[-1]], cx.dates[idx[0] - 1]
    out = []
    a, b = cx.wti.last_on_or_before(d), cx.wti.last_on_or_before(pd)
    if a and b and a[0] > pd:
        orr = pct(a[1], b[1])
        out.append(
            pen.say(
                [
                    "{Oil} {mv} over the week.",
                    "{Oil} finished the week at ${p} {barrel}, a weekly {gl} of {a}.",
                ],
                mv=moved(pen, orr, OIL, fp(orr), f"${f2(a[1])}"),
                p=f2(a[1]),
                gl=gain_loss(orr),
                a=fp(orr),
            )
        )
    va, vb = cx.vix.last_on_or_before(d), cx.vix.last_on_or_before(pd)
    if va and vb and va[0] > pd and vb[0] >= d - dt.timedelta(days=14):
        out.append(
            pen.say(
                [
                    "{Vix} ended the week at {v}, {ud} from {pv}.",
                    "{Implied} moved from {pv} to {v} on the VIX, a level that reads as {reg}.",
                ],
                v=f2(va[1]),
                pv=f2(vb[1]),
                ud="up" if va[1] >= vb[1] else "down",
                reg=vix_regime(va[1]),
            )
        )
    return out


def monthly_story(cx: Ctx, y: int, m: int, idx: list[int]) -> str:
    f = period_facts(cx, idx, idx[0] - 1)
    pen = Pen(f"monthly:{y:04d}-{m:02d}")
    when = lambda j: short_date(cx.dates[j])  # noqa: E731
    head = pen.say(
        [
            "Stocks {hl} in {mon}; S&P 500 {sign} for the month",
            "{mon} {y} in markets: S&P 500 {sign}",
            "Month-end wrap: Nasdaq {np}, S&P 500 {p} in {mon} {y}",
            "S&P 500 {v} in {mon}",
        ],
        hl="gain" if f["r"] >= 0 else month_decline(f["r"]),
        mon=MONTHS[m - 1],
        y=y,
        sign=fsp(f["r"]),
        v=head_verb(pen, f["r"], MONTH, False),
        p=fsp(f["r"]),
        np=fsp(f["nr"]),
    )
    items = wrap_items(pen, cx, f, when)
    yi = cx.period_start(idx[-1], lambda a, b: a.year == b.year)
    if yi is not None and m != 1:
        items.append(
            pen.say(
                ["Year to date {index} is {a}.", "That brings the {y} performance to {a}."],
                a=fsp(pct(f["c"], cx.sps.c[yi])),
                y=y,
            )
        )
    vs = [v for d, v in zip(cx.vix.dates, cx.vix.vals) if (d.year, d.month) == (y, m)]
    if vs:
        items.append(
            f"The VIX averaged {f2(mean(vs))} during the month, ranging from {f2(min(vs))} to {f2(max(vs))}."
        )
    lede = wrap_lede(
        pen,
        f,
        pen.choice([f"in {MONTHS[m - 1]}", f"over {MONTHS[m - 1]}", "for the month"]),
        pen.choice(["monthly", "month-long"]),
    )
    return article(pen, head, dateline("NEW YORK", cx.dates[idx[-1]]), lede, items)


def month_decline(r: float) -> str:
    """The word for a monthly loss, scaled as verb() scales: October 2008's 16.94% was no 'slip'."""
    a = abs(r)
    return "slip" if a < MONTH.small else "fall" if a < MONTH.mid else "slide" if a < MONTH.big else "tumble"


def quarterly_story(cx: Ctx, y: int, q: int, idx: list[int]) -> str:
    f = period_facts(cx, idx, idx[0] - 1)
    pen = Pen(f"quarter:{y}Q{q}")
    when = lambda j: short_date(cx.dates[j])  # noqa: E731
    o = QUARTERS[q - 1]
    head = pen.say(
        [
            "S&P 500 {v}{p} in {o} quarter",
            "Quarterly wrap: stocks {hl} in Q{q} {y}",
            "Wall Street's {o} quarter: S&P 500 {sign}",
        ],
        v=head_verb(pen, f["r"], MONTH, False),
        p=hp(f["r"], MONTH),
        o=o,
        q=q,
        y=y,
        hl=higher_lower(f["r"]),
        sign=fsp(f["r"]),
    )
    items = wrap_items(pen, cx, f, when)
    months = []
    for mm in range(3 * q - 2, 3 * q + 1):
        mi = [j for j in idx if cx.dates[j].month == mm]
        if mi:
            months.append((mm, pct(cx.sps.c[mi[-1]], cx.sps.c[mi[0] - 1])))
    if len(months) == 3:
        bm = max(months, key=lambda t: t[1])
        wm = min(months, key=lambda t: t[1])
        items.append(
            pen.say(
                "By month, {b} was the strongest, {br}, and {w} the weakest, {wr}.",
                b=MONTHS[bm[0] - 1],
                br=fsp(bm[1]),
                w=MONTHS[wm[0] - 1],
                wr=fsp(wm[1]),
            )
        )
    lede = wrap_lede(
        pen,
        f,
        pen.choice([f"in the {o} quarter of {y}", f"over the {o} quarter", "for the quarter"]),
        "quarterly",
    )
    return article(pen, head, dateline("NEW YORK", cx.dates[idx[-1]]), lede, items)


def annual_story(cx: Ctx, y: int):
    ff, credit, cpi = cx.data["ff"], cx.data["credit"], cx.data["cpi"]
    pen = Pen(f"annual:{y}")
    idx = [i for i, d in enumerate(cx.dates) if d.year == y]
    items, lede, head = [], None, None
    if idx and idx[0] > 0:
        f = period_facts(cx, idx, idx[0] - 1)
        head = pen.say(
            ["{y} in review: S&P 500 {sign}", "S&P 500 {v}{p} in {y}", "The year in markets, {y}"],
            y=y,
            sign=fsp(f["r"]),
            v=head_verb(pen, f["r"], MONTH, False),
            p=hp(f["r"], MONTH),
        )
        lede = wrap_lede(pen, f, pen.choice([f"in {y}", f"over {y} as a whole", "for the year"]), "yearly")
        items = wrap_items(pen, cx, f, lambda j: short_date(cx.dates[j])) + annual_equity_items(pen, cx, idx)
    fam = annual_factor_sentence(pen, ff, y)
    if fam and lede is None:
        lede, head = fam, pen.say(["{y} in review: the U.S. stock market", "The year in markets, {y}"], y=y)
    elif fam:
        items.append(fam)
    if lede is None:
        return None
    if (y, 12) in credit and (y - 1, 12) in credit:
        a, b = credit[(y, 12)]
        pa, pb = credit[(y - 1, 12)]
        w = "widened" if (b - a) > (pb - pa) else "narrowed" if (b - a) < (pb - pa) else "held"
        items.append(
            f"By December, Aaa yields were {fp(a)} and Baa {fp(b)}, against {fp(pa)} and {fp(pb)} "
            f"a year before; the Baa-Aaa spread {w} to {fbp(b - a)}."
        )
    if (y, 12) in cpi and (y - 1, 12) in cpi:
        items.append(
            f"Core CPI rose {fp(pct(cpi[(y, 12)], cpi[(y - 1, 12)]))} from December to December."
            if cpi[(y, 12)] >= cpi[(y - 1, 12)]
            else f"Core CPI fell {fp(pct(cpi[(y, 12)], cpi[(y - 1, 12)]))} from December to December."
        )
    items += annual_oil_vix_items(cx, y)
    return article(pen, head, dateline("NEW YORK", month=None), lede, items, keep=0.9)


def annual_equity_items(pen: Pen, cx: Ctx, idx: list[int]) -> list[str]:
    cl, s = cx.sps.c, cx.sps
    p = idx[0] - 1
    peak, pk, mdd, at, at_pk = cl[p], p, 0.0, None, None  # the deepest drawdown within the year
    for k in idx:
        if cl[k] > peak:
            peak, pk = cl[k], k
        dd = pct(cl[k], peak)
        if dd < mdd:
            mdd, at, at_pk = dd, k, pk
    out = []
    if at is not None:
        out.append(
            pen.say(
                "The deepest peak-to-trough decline of the year was {dd}, from {a} to {b} on {d}.",
                dd=fp(mdd),
                a=f2(cl[at_pk]),
                b=f2(cl[at]),
                d=short_date(cx.dates[at]),
            )
        )
    big = sum(1 for k in idx if abs(s.ret[k]) >= 2.0)
    out.append(
        pen.say(
            [
                "{Index} moved 2% or more in a single session on {b} days.",
                "There were {b} sessions with a move of 2% or more.",
            ],
            b=big,
        )
    )
    return out


def annual_factor_sentence(pen: Pen, ff: dict, y: int) -> str | None:
    if not all((y, m) in ff for m in range(1, 13)):
        return None
    g_mkt, g_rf = 1.0, 1.0
    for m in range(1, 13):
        mkt, _, _, rf = ff[(y, m)]
        g_mkt *= 1.0 + (mkt + rf) / 100.0
        g_rf *= 1.0 + rf / 100.0
    smb = math.fsum(ff[(y, m)][1] for m in range(1, 13))
    hml = math.fsum(ff[(y, m)][2] for m in range(1, 13))
    return pen.say(
        "Compounding the monthly Fama-French data, {market} returned {m} in {y} against {b} on "
        "Treasury bills; the monthly size factor summed to {s} and the value factor to {h}.",
        m=fsp((g_mkt - 1) * 100),
        y=y,
        b=fpct((g_rf - 1) * 100),
        s=fsp(smb),
        h=fsp(hml),
    )


def annual_oil_vix_items(cx: Ctx, y: int) -> list[str]:
    out = []
    wd = [(d, v) for d, v in zip(cx.wti.dates, cx.wti.vals) if d.year == y]
    pw = cx.wti.last_on_or_before(dt.date(y - 1, 12, 31))
    if wd and pw and pw[0].year == y - 1:
        yr = pct(wd[-1][1], pw[1])
        out.append(
            f"WTI crude ended the year at ${f2(wd[-1][1])} a barrel, {up_down(yr)} {fp(yr)}, after "
            f"trading between ${f2(min(v for _, v in wd))} and ${f2(max(v for _, v in wd))}."
        )
    vs = [v for d, v in zip(cx.vix.dates, cx.vix.vals) if d.year == y]
    if len(vs) > 200:
        out.append(
            f"The VIX averaged {f2(mean(vs))} over the year, with a low of {f2(min(vs))} and a high "
            f"of {f2(max(vs))}."
        )
    return out


# -----------------------------------------------------------------------------
# background sentences: general facts about the instruments, true on any date, none of them numbers
# from the data (so a story may carry one without asserting anything about the day)

EVERGREEN = {
    "equities": [
        "The S&P 500 tracks 500 large U.S. companies and is weighted by market value.",
        "The Nasdaq Composite covers most stocks listed on the Nasdaq exchange and leans heavily toward "
        "technology companies.",
        "Many chart-watchers treat the 200-day moving average as the line between a longer-term uptrend and "
        "a downtrend.",
        "A decline of 10% from a recent peak is commonly called a correction, and one of 20% a bear market.",
        "Realized volatility measures how much the index has actually moved, as opposed to the volatility "
        "implied by option prices.",
        "Because the S&P 500 is weighted by market capitalization, its biggest constituents sway it the "
        "most.",
        "A golden cross, when the 50-day average climbs above the 200-day, is read by technicians as a "
        "bullish signal; the opposite crossover is dubbed a death cross.",
        "Price indexes such as the S&P 500 exclude dividends, so total returns to shareholders run somewhat "
        "higher.",
        "Technical analysts often describe a streak of consecutive gains or losses as a sign of momentum, "
        "though streaks say little about what comes next.",
        "Daily moves of 2% or more are uncommon in calm markets and tend to cluster in turbulent ones.",
    ],
    "oil": [
        "West Texas Intermediate is the main U.S. crude benchmark, priced for delivery at Cushing, Oklahoma.",
        "Brent, drawn from North Sea fields, serves as the benchmark for much of the world's oil.",
        "A barrel holds 42 U.S. gallons.",
        "Oil prices respond to producers' supply decisions, inventories and the outlook for global demand.",
        "WTI is a light, sweet grade, meaning it is low in density and sulfur, which makes it relatively "
        "easy to refine into gasoline and diesel.",
        "Energy costs feed through to transport, heating and petrochemicals, which is why economists follow "
        "crude closely.",
        "Spot prices quote oil for immediate delivery, while futures contracts fix a price for a later "
        "month.",
    ],
    "vix": [
        "The VIX is derived from the prices of S&P 500 index options and reflects the volatility the market "
        "expects over the next 30 days.",
        "The VIX usually moves in the opposite direction to stocks.",
        "Readings above 30 have tended to accompany periods of market stress, while readings below 15 "
        "usually come with calm markets.",
        "A VIX reading can be read roughly as the annualized percentage swing that option buyers are pricing "
        "in for the S&P 500.",
        "Implied volatility tends to exceed the volatility later realized, a gap that sellers of options "
        "collect as compensation for bearing risk.",
    ],
    "credit": [
        "Moody's Aaa and Baa series average the yields of seasoned corporate bonds with those ratings.",
        "Baa is the lowest rating tier that Moody's still counts as investment grade.",
        "A wider spread between Baa and Aaa yields means investors demand more compensation for credit risk.",
        "Credit spreads tend to widen when the economic outlook darkens and to tighten when confidence "
        "returns.",
        "Bond prices move inversely to yields, so rising yields mean losses for existing bondholders.",
        "Below Baa lies speculative grade, often called high yield or junk.",
    ],
    "cpi": [
        "The core index leaves out food and energy, whose prices swing more than most, to give a steadier "
        "read on underlying inflation.",
        "The Federal Reserve watches underlying inflation closely when it sets interest rates.",
        "The consumer price index is compiled by the Bureau of Labor Statistics from the prices of a broad "
        "basket of goods and services.",
        "Shelter costs make up a large share of the core basket, so rents weigh heavily on the measure.",
        "Persistent inflation erodes purchasing power and the real value of fixed payments such as bond "
        "coupons.",
    ],
    "gdp": [
        "Quarterly growth figures are expressed as seasonally adjusted annual rates, the convention for U.S. "
        "national accounts.",
        "Two straight quarters of contraction are a common rule of thumb for a recession, though U.S. "
        "recessions are officially dated by the National Bureau of Economic Research.",
        "Consumer spending accounts for the largest share of U.S. economic output.",
        "Investment is the most cyclical component of demand, swinging far more than consumption from "
        "quarter to quarter.",
        "The real interest rate here is the Treasury bill yield minus inflation, so it turns negative when "
        "prices rise faster than bills pay.",
    ],
    "factors": [
        "The Fama-French factors, compiled by Eugene Fama and Kenneth French, split U.S. stock returns into "
        "market, size and value components.",
        "SMB stands for small minus big, and HML for high minus low book-to-market.",
        "The market factor is the return on the value-weighted U.S. stock market in excess of the one-month "
        "Treasury bill rate.",
        "Academic research has documented that small and cheap stocks outperformed over long stretches, "
        "although both premiums have gone through lengthy droughts.",
        "Factor returns are long-short portfolios, so a positive reading for one side always means a "
        "shortfall for the other.",
    ],
}


# -----------------------------------------------------------------------------
# the corpus: every desk's stories, in date order


DESKS = [
    "equities",
    "commodities",
    "volatility",
    "weekly",
    "credit",
    "cpi",
    "factors",
    "oil-monthly",
    "monthly",
    "gdp",
    "quarterly",
    "annual",
]  # also the tie-break order of stories dated the same day


def sessions_by(cx: Ctx, key) -> list[list[int]]:
    groups = {}
    for i, d in enumerate(cx.dates):
        groups.setdefault(key(d), []).append(i)
    return [groups[k] for k in sorted(groups)]


def daily_stories(cx: Ctx) -> list[tuple]:
    out = [(cx.dates[i], "equities", equities_story(cx, i)) for i in range(1, len(cx.dates))]
    out += [
        (cx.wti.dates[k], "commodities", oil_story(cx, k))
        for k in range(1, len(cx.wti.dates))
        if oil_eventful(cx, k)
    ]
    out += [
        (cx.vix.dates[k], "volatility", vix_story(cx, k))
        for k in range(1, len(cx.vix.dates))
        if vix_eventful(cx, k)
    ]
    return out


def period_stories(cx: Ctx) -> list[tuple]:
    out = [
        (cx.dates[w[-1]], "weekly", weekly_story(cx, w))
        for w in sessions_by(cx, lambda d: d.isocalendar()[:2])
        if w[0] > 0
    ]
    for idx in sessions_by(cx, lambda d: (d.year, d.month)):
        if idx[0] > 0:
            y, m = cx.dates[idx[0]].year, cx.dates[idx[0]].month
            out.append((cx.dates[idx[-1]], "monthly", monthly_story(cx, y, m, idx)))
    for idx in sessions_by(cx, lambda d: (d.year, (d.month - 1) // 3)):
        if idx[0] > 0:
            d = cx.dates[idx[0]]
            out.append(
                (cx.dates[idx[-1]], "quarterly", quarterly_story(cx, d.year, (d.month - 1) // 3 + 1, idx))
            )
    years = sorted({y for y, _ in cx.data["ff"]} | {d.year for d in cx.dates})
    out += [(dt.date(y, 12, 31), "annual", t) for y in years if (t := annual_story(cx, y))]
    return out


def macro_stories(cx: Ctx) -> list[tuple]:
    out = []
    for desk, series, story in (
        ("credit", "credit", credit_story),
        ("cpi", "cpi", cpi_story),
        ("factors", "ff", factor_story),
    ):
        keys = sorted(cx.data[series])
        out += [(month_end(*keys[k]), desk, t) for k in range(len(keys)) if (t := story(cx, keys, k))]
    out += [
        (month_end(y, m), "oil-monthly", t)
        for (y, m) in sorted(cx.wti_month)
        if (t := oil_month_story(cx, y, m))
    ]
    keys = sorted(cx.data["macro"])
    out += [(month_end(y, 3 * q), "gdp", t) for k, (y, q) in enumerate(keys) if (t := gdp_story(cx, keys, k))]
    return out


def market_stories(data: dict | None = None) -> list[tuple[dt.date, str, str]]:
    """(date, desk, text) for every story, in corpus order: by date, then by desk."""
    cx = Ctx(data if data is not None else load_market_data())
    stories = daily_stories(cx) + period_stories(cx) + macro_stories(cx)
    rank = {k: n for n, k in enumerate(DESKS)}
    stories.sort(key=lambda t: (t[0], rank[t[1]]))
    return stories


def build_market_docs(data: dict | None = None) -> list[str]:
    return [t for _, _, t in market_stories(data)]


# -----------------------------------------------------------------------------
# variety metrics: how much language a corpus holds


BPE_VOCAB = 8192


def bpe_vocab_reached(docs: list[str], vocab_size: int) -> int:
    """The vocabulary a byte-level BPE trainer reaches when asked for vocab_size, trained exactly as
    gpt_scratch.Tokenizer.train does: it stops early once every word is one token, so a corpus with
    little language cannot fill a large vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(docs, trainer=trainer)
    return hf.get_vocab_size()


WINDOW_WORDS = 100_000
DIGIT = re.compile(r"\d")


def doc_words(doc: str, mask_numbers: bool) -> list[str]:
    w = doc.split()
    return ["<num>" if DIGIT.search(x) else x for x in w] if mask_numbers else w


def ngram_counts(docs: list[str], n: int, mask_numbers: bool = False) -> tuple[int, int]:
    """(distinct, total) word n-grams, words split on whitespace, n-grams never crossing documents."""
    seen, total = set(), 0
    for doc in docs:
        w = doc_words(doc, mask_numbers)
        grams = [tuple(w[k : k + n]) for k in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen), total


def windowed_ratio(docs: list[str], n: int, mask_numbers: bool, window: int = WINDOW_WORDS) -> float:
    """Mean distinct/total n-gram ratio over consecutive runs of whole documents holding at least
    `window` words (a shorter tail is dropped unless it is the only run). The plain ratio falls as a
    corpus grows; this one compares corpora of different sizes. Masking every word that holds a digit
    measures the language alone: otherwise nearly every distinct n-gram is a distinct number."""
    runs, run, words = [], [], 0
    for doc in docs:
        run.append(doc)
        words += len(doc.split())
        if words >= window:
            runs.append(run)
            run, words = [], 0
    if run and not runs:
        runs.append(run)
    vals = []
    for r in runs:
        distinct, total = ngram_counts(r, n, mask_numbers)
        vals.append(distinct / total if total else 0.0)
    return math.fsum(vals) / len(vals)


def corpus_stats(text: str, vocab_size: int = BPE_VOCAB) -> dict:
    docs = [d for d in text.strip("\n").split("\n\n") if d.strip()]
    grams = {}
    for n in (1, 2, 3, 4):
        distinct, total = ngram_counts(docs, n)
        grams[str(n)] = dict(
            distinct=distinct,
            total=total,
            ratio=round(distinct / total, 4) if total else 0.0,
            window_ratio=round(windowed_ratio(docs, n, False), 4),
            window_ratio_numbers_masked=round(windowed_ratio(docs, n, True), 4),
        )
    return dict(
        documents=len(docs),
        words=sum(len(d.split()) for d in docs),
        bytes=len(text.encode("utf-8")),
        bpe_vocab_asked=vocab_size,
        bpe_vocab=bpe_vocab_reached(docs, vocab_size),
        window_words=WINDOW_WORDS,
        ngrams=grams,
    )


def stats_lines(path: str, s: dict) -> list[str]:
    out = [
        path,
        f"  documents  {s['documents']:,}",
        f"  words      {s['words']:,}",
        f"  bytes      {s['bytes']:,}",
        f"  BPE vocab  {s['bpe_vocab']:,} reached of {s['bpe_vocab_asked']:,} asked",
        f"  distinct/total word n-grams: whole file; per {s['window_words']:,}-word window; "
        f"per window with numbers masked",
    ]
    for n, g in s["ngrams"].items():
        out.append(
            f"  {n}-grams  {g['ratio']:.4f} ({g['distinct']:,} of {g['total']:,})  "
            f"{g['window_ratio']:.4f}  "
            f"{g['window_ratio_numbers_masked']:.4f}"
        )
    return out


def read_corpus(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except IsADirectoryError:
        die(f"--stats {path} is a folder, not a corpus file")
    except FileNotFoundError:
        die(f"--stats {path} not found")
    except OSError as e:
        die(f"cannot read --stats {path} ({e.strerror})")
    except UnicodeDecodeError:
        die(f"--stats {path} is not UTF-8 text")
    if not text.strip():
        die(f"--stats {path} is empty")
    return text


def run_stats(paths: list[str], as_json: bool, vocab_size: int) -> int:
    texts = [(p, read_corpus(p)) for p in paths]  # every file is checked before the slow part
    results = []
    for p, text in texts:
        s = corpus_stats(text, vocab_size)
        results.append(dict(path=p, **s))
        if not as_json:
            print("\n".join(stats_lines(p, s)), flush=True)
    if as_json:
        print(json.dumps(dict(files=results), indent=1))
    return 0


# -----------------------------------------------------------------------------
# output: the corpus file, as both of fetch_news.py's sources write it (they import these helpers)

CORPUS_NAME = "finance_corpus.txt"
RERUN = "run the same command again"  # every stop keeps what was done: a rerun goes on from there


class UserError(Exception): ...  # a mistake the user can fix: one line on stderr, exit code 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, `timeout`, docker stop, a scheduler's time limit): Ctrl-C's path, but exit 143."""


def raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping already: a second one must not cut that short
    raise Terminated


def terminate_as_interrupt() -> None:
    """SIGTERM from here on: the same one line and cleanup as Ctrl-C (exit code: interrupted_exit_code)."""
    signal.signal(signal.SIGTERM, raise_terminated)


def interrupted_exit_code(e: KeyboardInterrupt) -> int:
    return 143 if isinstance(e, Terminated) else 130


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
    except OSError as e:  # a full disk: name the file being written (a failed write() names none), not tmp
        if e.filename in (None, tmp):
            e.filename = path
        raise
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


def append_whole(path: str, data: bytes) -> None:
    """Append data and sync it, or, when the write fails (a full disk), leave the file as it was: whatever
    part of data did land is cut off again (a file this call created is removed), so no torn line is left."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size) if size else os.remove(path)
        e.filename = path  # a failed write() names no file
        raise


def check_out_dir(path: str, names) -> None:
    """Refuse an --out-dir that cannot be written, before any work is done. Probing with a temp file covers
    read-only mounts, modes and ACLs alike; an output that is a folder would only fail at os.replace."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out-dir {path} is a file, not a folder")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        if os.path.islink(probe):  # a dangling link: making the folder fails only once the output is ready
            gone = os.readlink(probe)
            raise UserError(f"--out-dir {path}: {probe} is a link to {gone}, which does not exist")
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


def remove_created(top, out_dir: str, litter: str = "") -> None:
    """Undo the folders a failed run created while they hold nothing of value (a `litter` file at most)."""
    if top is None:
        return
    d = os.path.abspath(out_dir)
    with contextlib.suppress(OSError):
        if litter and os.listdir(d) == [litter]:
            os.remove(os.path.join(d, litter))
    with contextlib.suppress(OSError):  # rmdir fails on the first folder that is not empty: stop there
        while d == top or d.startswith(top + os.sep):
            os.rmdir(d)
            d = os.path.dirname(d)


def write_corpus(path: str, docs) -> tuple:
    """The project-wide corpus format: documents (bytes) joined by one blank line, a trailing newline,
    written atomically. Returns (#documents, #bytes); (0, 0) and nothing written when there are none."""
    first = next(docs, None)
    if first is None:
        return 0, 0
    with atomic_open(path) as out:
        out.write(first)
        n_docs = 1
        for n_docs, doc in enumerate(docs, start=2):
            out.write(b"\n\n" + doc)
        out.write(b"\n")
        return n_docs, out.tell()


def write_market_corpus(out_dir: str) -> None:
    path = os.path.join(out_dir, CORPUS_NAME)
    check_out_dir(out_dir, [CORPUS_NAME])
    print(f"building the market corpus for {path} ...", file=sys.stderr, flush=True)
    docs = [d.strip() for d in build_market_docs()]
    assert all(docs) and not any("\n\n" in d for d in docs), "documents must be non-empty, no blank lines"
    n_docs, n_bytes = write_corpus(path, (d.encode("utf-8") for d in docs))
    chars = sum(map(len, docs)) + 2 * (n_docs - 1) + 1  # the documents, blank lines and final newline
    print(f"wrote {path}: {n_docs:,} documents, {n_bytes:,} bytes, {chars:,} characters")


def build_corpus(out_dir: str) -> int:
    """Write the market corpus into out_dir; returns the exit code. A bad --out-dir, a failed write or
    Ctrl-C (or SIGTERM): one line, any old corpus left as it was, the folders this run made removed again."""
    created = first_missing(out_dir)
    try:
        write_market_corpus(out_dir)
        return 0
    except (UserError, OSError, KeyboardInterrupt) as e:
        remove_created(created, out_dir)
        print(build_stop_line(e, out_dir), file=sys.stderr)
        return interrupted_exit_code(e) if isinstance(e, KeyboardInterrupt) else 2


def build_stop_line(e: BaseException, out_dir: str) -> str:
    if isinstance(e, UserError):
        return f"error: {e}"
    corpus = os.path.join(out_dir, CORPUS_NAME)
    kept = f"nothing written, {corpus} left as it was"  # written whole through a temp file: all or none
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted: {kept}; {RERUN} to build it"
    # a failed write() does not say which file: this writes only one
    return f"error: cannot write {e.filename or corpus} ({e.strerror or e}); {kept}; fix that and {RERUN}"


# -----------------------------------------------------------------------------
# command line


def die(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage block; one line says it better
        self.exit(2, f"error: {message} (see --help)\n")


def positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {s!r}")
    if not 257 <= n <= 2**20:  # a larger request makes the tokenizer trainer abort the process
        raise argparse.ArgumentTypeError(
            f"must be between 257 (the 256 byte tokens and a merge) and 2**20, got {n}"
        )
    return n


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Build the news-style market corpus (data/finance_corpus.txt), or measure "
        "how varied corpora are with --stats.",
        epilog="exit codes: 0 done; 2 bad input or an output that cannot be written; "
        "130 interrupted with Ctrl-C, 143 with SIGTERM (nothing half-written is left).",
    )
    p.add_argument(
        "--out-dir",
        type=os.path.expanduser,  # "--out-dir=~/data" reaches here unexpanded
        default=None,
        help="where finance_corpus.txt is written, exactly as fetch_news.py --source market "
        "writes it (default: data)",
    )
    p.add_argument(
        "--stats",
        nargs="+",
        metavar="FILE",
        type=os.path.expanduser,
        default=None,
        help="instead of building, print per corpus file: documents, words, the BPE vocabulary "
        "reached when --vocab-size is asked, and distinct/total word 1- to 4-gram ratios "
        "(default: off)",
    )
    p.add_argument(
        "--json", action="store_true", help="with --stats: one JSON object on stdout (default: off)"
    )
    p.add_argument(
        "--vocab-size",
        type=positive_int,
        default=BPE_VOCAB,
        help="with --stats: the BPE vocabulary asked for (default: %(default)s)",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    terminate_as_interrupt()
    try:
        if args.stats is not None:
            if args.out_dir is not None:
                die("--out-dir does not apply with --stats (nothing is written)")
            return run_stats(args.stats, args.json, args.vocab_size)
        if args.json or args.vocab_size != BPE_VOCAB:
            die(f"--{'json' if args.json else 'vocab-size'} only applies with --stats")
        if args.out_dir is not None and not args.out_dir.strip():
            die("--out-dir must name a folder, got an empty string")
        return build_corpus(args.out_dir or "data")
    except KeyboardInterrupt as e:
        print("interrupted: nothing written; run the same command again", file=sys.stderr)
        return interrupted_exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
