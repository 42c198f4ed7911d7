"""The PromQL that docs/dashboard.json uses, evaluated over /metrics scrapes held in memory.

bench/dashboard_snapshot.py draws the dashboard's panels without Prometheus or
Grafana (neither is installable here): it scrapes a running processor's
``/metrics`` every second and evaluates each panel's expression with this module
at every scrape. The subset is what the dashboard's expressions use, nothing more:

- selectors ``name``, ``name{label="v", label!="v"}`` (also ``=~``/``!~``, anchored
  regular expressions as in Prometheus);
- ``rate(sel[w])`` and ``increase(sel[w])`` for counters, ``w`` a duration (``4s``,
  ``1m``) or ``$__rate_interval``;
- ``sum(expr)`` and ``sum by (labels) (expr)``;
- ``histogram_quantile(q, expr)`` over ``_bucket`` series with their ``le``.

Where it differs from Prometheus (said so in docs/operations.md): ``rate`` is the
increase between the first and the last sample inside the window (counter resets
counted) over the time between them, without Prometheus's extrapolation to the
window's edges; ``increase`` is that rate times the window. At one scrape a second
and a 4 s window, both differ from Prometheus's by well under a sample's worth.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

Labels = frozenset[tuple[str, str]]
# (sample name, labels) → value: one scrape's samples, as the exposition names them
# (``crmhooks_actions_total``, ``crmhooks_delivery_seconds_bucket``, ...).
Samples = Mapping[tuple[str, Labels], float]
# An instant vector: labels → value.
Vector = dict[Labels, float]

_TOKEN_RE: Final = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<duration>\d+(?:\.\d+)?(?:ms|s|m|h|d)\b)
      | (?P<number>\d+(?:\.\d+)?)
      | (?P<name>\$?[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<op>!=|=~|!~|[=(){}\[\],])
    )""",
    re.VERBOSE,
)
_UNITS_S: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
RATE_INTERVAL: Final = "$__rate_interval"


@dataclass(frozen=True, slots=True)
class Scrape:
    """One scrape: when (epoch s) and what it read."""

    t_s: float
    samples: Samples


class PromQLError(ValueError):
    """An expression outside the subset, or malformed."""


# --- parsing --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)
    range_s: float | None = None  # [w]; None: an instant selector

    def matches(self, labels: Labels) -> bool:
        found = dict(labels)
        for label, op, value in self.matchers:
            have = found.get(label, "")
            if op == "=" and have != value:
                return False
            if op == "!=" and have == value:
                return False
            if op == "=~" and re.fullmatch(value, have) is None:
                return False
            if op == "!~" and re.fullmatch(value, have) is not None:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Call:
    function: str  # rate | increase | histogram_quantile
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Sum:
    by: tuple[str, ...] | None  # None: sum everything into one series
    expr: Node


@dataclass(frozen=True, slots=True)
class Number:
    value: float


Node = Selector | Call | Sum | Number


def parse(expr: str, rate_interval_s: float) -> Node:
    """The expression's tree; PromQLError naming what is not understood."""
    tokens = _tokens(expr)
    parser = _Parser(tokens, rate_interval_s, expr)
    node = parser.expr()
    if parser.pos != len(tokens):
        raise PromQLError(f"{expr!r}: unexpected {tokens[parser.pos][1]!r}")
    return node


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr.rstrip()):
        match = _TOKEN_RE.match(expr, pos)
        if match is None or match.end() == pos:
            raise PromQLError(f"{expr!r}: cannot read {expr[pos : pos + 20]!r}")
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], rate_interval_s: float, text: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.rate_interval_s = rate_interval_s
        self.text = text

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token[0] == "end" or (value is not None and token[1] != value):
            raise PromQLError(f"{self.text!r}: expected {value or 'more'}, found {token[1]!r}")
        self.pos += 1
        return token

    def expr(self) -> Node:
        kind, value = self.peek()
        if kind == "number":
            self.take()
            return Number(float(value))
        if kind != "name":
            raise PromQLError(f"{self.text!r}: unexpected {value!r}")
        if value == "sum":
            return self.sum()
        if value in ("rate", "increase"):
            self.take()
            self.take("(")
            selector = self.selector(ranged=True)
            self.take(")")
            return Call(value, (selector,))
        if value == "histogram_quantile":
            self.take()
            self.take("(")
            q = self.expr()
            self.take(",")
            inner = self.expr()
            self.take(")")
            return Call(value, (q, inner))
        if self.pos + 1 < len(self.tokens) and self.tokens[self.pos + 1][1] == "(":
            raise PromQLError(f"{self.text!r}: function {value}() is not in the subset")
        return self.selector(ranged=False)

    def sum(self) -> Sum:
        self.take("sum")
        by: tuple[str, ...] | None = None
        if self.peek()[1] == "by":
            self.take()
            by = self.labels()
        self.take("(")
        inner = self.expr()
        self.take(")")
        if by is None and self.peek()[1] == "by":
            self.take()
            by = self.labels()
        return Sum(by, inner)

    def labels(self) -> tuple[str, ...]:
        self.take("(")
        names: list[str] = []
        while self.peek()[1] != ")":
            names.append(self.take()[1])
            if self.peek()[1] == ",":
                self.take()
        self.take(")")
        return tuple(names)

    def selector(self, *, ranged: bool) -> Selector:
        kind, name = self.take()
        if kind != "name":
            raise PromQLError(f"{self.text!r}: expected a metric name, found {name!r}")
        matchers: list[tuple[str, str, str]] = []
        if self.peek()[1] == "{":
            self.take()
            while self.peek()[1] != "}":
                label = self.take()[1]
                op = self.take()[1]
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"{self.text!r}: matcher {label}{op} is not understood")
                kind, text = self.take()
                if kind != "string":
                    raise PromQLError(f"{self.text!r}: expected a string after {label}{op}")
                matchers.append((label, op, _unquote(text)))
                if self.peek()[1] == ",":
                    self.take()
            self.take("}")
        range_s: float | None = None
        if ranged:
            self.take("[")
            kind, text = self.take()
            if text == RATE_INTERVAL:
                range_s = self.rate_interval_s
            elif kind == "duration":
                unit = re.search(r"[a-z]+$", text)
                assert unit is not None
                range_s = float(text[: unit.start()]) * _UNITS_S[unit.group()]
            else:
                raise PromQLError(f"{self.text!r}: range {text!r} is not understood")
            self.take("]")
        return Selector(name, tuple(matchers), range_s)


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])


# --- evaluating -----------------------------------------------------------------------


class Evaluator:
    """Evaluates expressions at the times of ``scrapes`` (sorted by time).

    ``target_labels`` are added to every sample, as Prometheus adds ``job`` and
    ``instance`` to what it scrapes (the dashboard selects ``job="crmhooks"``)."""

    def __init__(
        self,
        scrapes: Sequence[Scrape],
        *,
        rate_interval_s: float,
        target_labels: Mapping[str, str] | None = None,
    ) -> None:
        extra = tuple((target_labels or {}).items())
        self.scrapes = [
            Scrape(
                s.t_s, {(n, labels | frozenset(extra)): v for (n, labels), v in s.samples.items()}
            )
            for s in sorted(scrapes, key=lambda s: s.t_s)
        ]
        self.rate_interval_s = rate_interval_s

    def at(self, expr: str | Node, t_s: float) -> Vector:
        node = parse(expr, self.rate_interval_s) if isinstance(expr, str) else expr
        return self._eval(node, t_s)

    def series(self, expr: str) -> tuple[list[float], dict[Labels, list[float]]]:
        """(the scrape times, labels → value at each time; NaN where it has none)."""
        node = parse(expr, self.rate_interval_s)
        times = [s.t_s for s in self.scrapes]
        out: dict[Labels, list[float]] = {}
        for i, t in enumerate(times):
            for labels, value in self._eval(node, t).items():
                out.setdefault(labels, [math.nan] * len(times))[i] = value
        return times, out

    def _eval(self, node: Node, t_s: float) -> Vector:
        if isinstance(node, Number):
            return {frozenset(): node.value}
        if isinstance(node, Selector):
            if node.range_s is not None:
                raise PromQLError("a range selector outside rate() or increase()")
            return self._instant(node, t_s)
        if isinstance(node, Sum):
            return _sum(self._eval(node.expr, t_s), node.by)
        if node.function in ("rate", "increase"):
            (selector,) = node.args
            assert isinstance(selector, Selector)
            assert selector.range_s is not None
            rates = {
                labels: rate
                for labels, points in self._window(selector, t_s).items()
                if (rate := _rate(points)) is not None
            }
            if node.function == "increase":
                return {labels: r * selector.range_s for labels, r in rates.items()}
            return rates
        q_node, inner = node.args
        if not isinstance(q_node, Number):
            raise PromQLError("histogram_quantile's quantile must be a number")
        return _quantiles(q_node.value, self._eval(inner, t_s))

    def _latest(self, t_s: float) -> Scrape | None:
        found = None
        for scrape in self.scrapes:
            if scrape.t_s > t_s:
                break
            found = scrape
        return found

    def _instant(self, selector: Selector, t_s: float) -> Vector:
        scrape = self._latest(t_s)
        if scrape is None:
            return {}
        return {
            labels: v
            for (name, labels), v in scrape.samples.items()
            if name == selector.name and selector.matches(labels)
        }

    def _window(self, selector: Selector, t_s: float) -> dict[Labels, list[tuple[float, float]]]:
        assert selector.range_s is not None
        start = t_s - selector.range_s
        points: dict[Labels, list[tuple[float, float]]] = {}
        for scrape in self.scrapes:
            if scrape.t_s <= start:
                continue
            if scrape.t_s > t_s:
                break
            for (name, labels), v in scrape.samples.items():
                if name == selector.name and selector.matches(labels):
                    points.setdefault(labels, []).append((scrape.t_s, v))
        return points


def _rate(points: list[tuple[float, float]]) -> float | None:
    """Per-second increase between the first and last point; counter resets counted."""
    if len(points) < 2:
        return None
    increase = 0.0
    for (_, before), (_, after) in itertools.pairwise(points):
        increase += after - before if after >= before else after  # a reset: from 0
    elapsed = points[-1][0] - points[0][0]
    return increase / elapsed if elapsed > 0 else None


def _sum(vector: Vector, by: tuple[str, ...] | None) -> Vector:
    out: Vector = {}
    for labels, value in vector.items():
        key = frozenset() if by is None else frozenset((k, v) for k, v in labels if k in by)
        out[key] = out.get(key, 0.0) + value
    return out


def _quantiles(q: float, buckets: Vector) -> Vector:
    """Prometheus's histogram_quantile: per series without ``le``, linear within the
    bucket the rank falls in; the last finite bound when it falls in +Inf."""
    grouped: dict[Labels, list[tuple[float, float]]] = {}
    for labels, count in buckets.items():
        le = dict(labels).get("le")
        if le is None:
            continue
        rest = frozenset((k, v) for k, v in labels if k != "le")
        grouped.setdefault(rest, []).append((float(le), count))
    return {labels: quantile(q, sorted(pairs)) for labels, pairs in grouped.items()}


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """``q`` of cumulative ``(upper bound, count)`` buckets, +Inf last (Prometheus's
    ``bucketQuantile``); NaN without observations."""
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return math.nan
    observations = buckets[-1][1]
    if observations <= 0:
        return math.nan
    rank = q * observations
    b = next(i for i, (_, count) in enumerate(buckets) if count >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start = 0.0 if b == 0 else buckets[b - 1][0]
    end, count = buckets[b]
    if b > 0:
        count -= buckets[b - 1][1]
        rank -= buckets[b - 1][1]
    return start + (end - start) * (rank / count) if count > 0 else end


def legend(fmt: str | None, labels: Labels, default: Callable[[Labels], str]) -> str:
    """Grafana's legendFormat: ``{{label}}`` replaced by the series' value of it."""
    if not fmt:
        return default(labels)
    found = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: found.get(m.group(1), ""), fmt)


def samples_of(families: Iterable[object]) -> dict[tuple[str, Labels], float]:
    """``prometheus_client.parser`` families → Samples."""
    out: dict[tuple[str, Labels], float] = {}
    for family in families:
        for sample in getattr(family, "samples", ()):
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out
