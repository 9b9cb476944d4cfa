"""Market data for the execution task: order-book snapshots and trades, from files or simulated.

File layout (CSV or Parquet, one table each):
    books:  timestamp, bid_px_1, bid_sz_1, ..., bid_px_L, bid_sz_L, ask_px_1, ask_sz_1, ..., ask_sz_L
            (one row per snapshot, levels best first, timestamps increasing; a thin book leaves its
            deepest levels empty, or NaN)
    trades: timestamp, price, size, side        (side: the aggressor, "buy" or "sell")
A trade belongs to the interval (previous snapshot, its snapshot]. Episodes are cut from
consecutive snapshots: a window shown to the model, then the arrival book and the horizon the
simulator replays; train and validation episodes come from disjoint stretches of time.
"""
from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

from megatron_dapo.reward.trading.simulator import Book, Episode, Trade


@dataclass
class MarketData:
    timestamps: list[float]
    books: list[Book]
    trades: list[tuple[Trade, ...]]
    """trades[i]: the trades in (timestamps[i-1], timestamps[i]]; trades[0] is empty."""


class MarketDataError(ValueError):
    """A market data file that cannot be used; the message names the file, row and column."""


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    raise MarketDataError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .parquet")


def load_market(books_path: str | Path, trades_path: str | Path) -> MarketData:
    books_path, trades_path = Path(books_path), Path(trades_path)
    rows = _read_table(books_path)
    if not rows:
        raise MarketDataError(f"{books_path}: no rows")
    levels = sum(1 for key in rows[0] if key.startswith("bid_px_"))
    if levels < 1:
        raise MarketDataError(f"{books_path}: no bid_px_1 column (expected timestamp, bid_px_i, bid_sz_i, ask_px_i, "
                              "ask_sz_i)")
    timestamps, books = [], []
    for n, row in enumerate(rows, start=2 if books_path.suffix == ".csv" else 0):
        try:
            t = _finite(row["timestamp"], "timestamp")
            bids, asks = _side(row, "bid", levels), _side(row, "ask", levels)
        except _BadValue as err:
            raise MarketDataError(f"{books_path} row {n}: {err}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise MarketDataError(f"{books_path} row {n}: {err.__class__.__name__}: {err}") from None
        if timestamps and t <= timestamps[-1]:
            raise MarketDataError(f"{books_path} row {n}: timestamp {t} is not after {timestamps[-1]}")
        if not bids[0][0] < asks[0][0]:
            raise MarketDataError(f"{books_path} row {n}: crossed book (bid {bids[0][0]} >= ask {asks[0][0]})")
        timestamps.append(t)
        books.append(Book(bids=bids, asks=asks))
    per_interval: list[list[Trade]] = [[] for _ in timestamps]
    index, last = 0, float("-inf")
    for n, row in enumerate(_read_table(trades_path), start=2 if trades_path.suffix == ".csv" else 0):
        try:
            t, price, size = (_finite(row[key], key) for key in ("timestamp", "price", "size"))
            if price <= 0 or size <= 0:
                raise _BadValue(f"price {price} and size {size} must be > 0")
            trade = Trade(price, size, str(row["side"]))
        except _BadValue as err:
            raise MarketDataError(f"{trades_path} row {n}: {err}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise MarketDataError(f"{trades_path} row {n}: {err.__class__.__name__}: {err}") from None
        if trade.aggressor not in ("buy", "sell"):
            raise MarketDataError(f"{trades_path} row {n}: side {trade.aggressor!r} is not 'buy' or 'sell'")
        if t < last:  # it would land in a later interval than it happened in
            raise MarketDataError(f"{trades_path} row {n}: timestamp {t} is before the previous trade's {last}; "
                                  "sort the trades by time")
        last = t
        while index < len(timestamps) and timestamps[index] < t:
            index += 1
        if 0 < index < len(timestamps):
            per_interval[index].append(trade)
    return MarketData(timestamps, books, [tuple(t) for t in per_interval])


class _BadValue(ValueError):
    """A value a market cannot hold (a NaN price, a negative size); the message names its column."""


def _cell(value) -> float | None:
    """A table cell as a number; None when empty ("" in a CSV, null in Parquet, NaN where pandas wrote a gap)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _finite(value, column: str) -> float:
    number = _cell(value)
    if number is None or not math.isfinite(number):
        raise _BadValue(f"{column} is {'empty' if number is None else number}, not a finite number")
    return number


def _side(row: dict, side: str, levels: int) -> tuple[tuple[float, float], ...]:
    """One side's levels, best first: prices > 0 and each worse than the one before, sizes >= 0, all finite. A
    thin book leaves its deepest levels empty: the side ends at the first empty level, and none after it may
    be filled; the first level must be."""
    out: list[tuple[float, float]] = []
    for i in range(1, levels + 1):
        price, size = _cell(row[f"{side}_px_{i}"]), _cell(row[f"{side}_sz_{i}"])
        if price is None and size is None and i > 1:
            deeper = [f"{side}_{k}_{j}" for j in range(i + 1, levels + 1) for k in ("px", "sz")
                      if _cell(row[f"{side}_{k}_{j}"]) is not None]
            if deeper:
                raise _BadValue(f"{side} level {i} is empty but {deeper[0]} is not")
            break
        price, size = _finite(price, f"{side}_px_{i}"), _finite(size, f"{side}_sz_{i}")
        if price <= 0 or size < 0:
            raise _BadValue(f"{side}_px_{i} {price} must be > 0 and {side}_sz_{i} {size} >= 0")
        if out and not (price < out[-1][0] if side == "bid" else price > out[-1][0]):
            raise _BadValue(f"{side}_px_{i} {price} is not {'below' if side == 'bid' else 'above'} "
                            f"{side}_px_{i - 1} {out[-1][0]} (levels go best first)")
        out.append((price, size))
    return tuple(out)


def write_market(market: MarketData, books_path: str | Path, trades_path: str | Path) -> None:
    """Write `market` in the CSV layout above."""
    levels = max(len(levels) for book in market.books for levels in (book.bids, book.asks))
    header = ["timestamp"] + [f"{s}_{k}_{i}" for s in ("bid", "ask") for i in range(1, levels + 1) for k in ("px", "sz")]

    def cells(side: tuple[tuple[float, float], ...]) -> list:  # a thin side's missing levels left empty
        return [x for level in side for x in level] + [""] * (2 * (levels - len(side)))

    with open(books_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for t, book in zip(market.timestamps, market.books):
            writer.writerow([t] + cells(book.bids) + cells(book.asks))
    with open(trades_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["timestamp", "price", "size", "side"])
        for i, trades in enumerate(market.trades):
            for j, trade in enumerate(trades):  # spread inside the interval, so each lands in its own
                t = market.timestamps[i - 1] + (market.timestamps[i] - market.timestamps[i - 1]) * (j + 1) / (len(trades) + 1)
                writer.writerow([t, trade.price, trade.size, trade.aggressor])


def synthetic_market(steps: int, *, seed: int, tick: float = 0.1, start: float = 60_000.0, levels: int = 5,
                     interval_s: float = 10.0) -> MarketData:
    """A market with a random-walk mid whose volatility switches between calm and busy regimes, a spread
    and depth that widen and thin when it is busy, and seller/buyer-initiated trades that lean the way
    the price moves (so passive orders fill more often against the move)."""
    rng = random.Random(seed)
    vol_bps = {"calm": 2.0, "busy": 8.0}
    regime, mid = "calm", start
    timestamps, books, trades = [], [], []
    for step in range(steps):
        if rng.random() < (0.03 if regime == "calm" else 0.08):
            regime = "busy" if regime == "calm" else "calm"
        move = rng.gauss(0.0, vol_bps[regime]) * 1e-4 * mid
        mid = max(mid + move, 100 * tick)
        spread_ticks = 1 + (rng.randrange(4) if regime == "busy" else rng.randrange(2))
        bid = math.floor((mid - spread_ticks * tick / 2) / tick) * tick
        ask = bid + spread_ticks * tick
        depth = 0.5 if regime == "busy" else 1.0
        bids = tuple((round(bid - i * tick, 10), round(rng.expovariate(1.0 / (depth * (2 + 2 * i))), 3))
                     for i in range(levels))
        asks = tuple((round(ask + i * tick, 10), round(rng.expovariate(1.0 / (depth * (2 + 2 * i))), 3))
                     for i in range(levels))
        interval: list[Trade] = []
        if step:
            lean = 0.5 + max(-0.4, min(0.4, move / (vol_bps[regime] * 1e-4 * mid + 1e-12) * 0.2))
            for _ in range(rng.randrange(1, 7 if regime == "busy" else 4)):
                aggressor = "buy" if rng.random() < lean else "sell"
                prev = books[-1]
                levels_hit = prev.asks if aggressor == "buy" else prev.bids
                price = levels_hit[min(int(rng.expovariate(1.5)), levels - 1)][0]
                interval.append(Trade(round(price, 10), round(rng.expovariate(1.0), 3) + 0.001, aggressor))
        timestamps.append(step * interval_s)
        books.append(Book(bids=bids, asks=asks))
        trades.append(tuple(interval))
    return MarketData(timestamps, books, trades)


@dataclass
class EpisodeRow:
    history: list[Book]
    """The window shown to the model, oldest first; the last one is the arrival book."""
    history_trades: list[tuple[Trade, ...]]
    episode: Episode
    start: float
    """Timestamp of the first shown snapshot."""
    end: float
    """Timestamp of the horizon's book."""


def cut_episodes(market: MarketData, *, window: int, horizon: int, stride: int, seed: int, tick: float,
                 quantity: tuple[float, float] = (1.0, 10.0), taker_fee_bps: float = 5.0,
                 maker_fee_bps: float = 1.0) -> list[EpisodeRow]:
    """Episodes from consecutive snapshots: `window` shown (ending at arrival), `horizon` steps replayed.
    quantity: the bounds of each episode's order size, whole lots (drawn uniformly, both included)."""
    if window < 1 or horizon < 1 or stride < 1:
        raise ValueError(f"window, horizon and stride must each be at least 1, got window={window}, "
                         f"horizon={horizon}, stride={stride}")
    low, high = quantity
    if not (float(low).is_integer() and float(high).is_integer() and 1 <= low <= high):
        raise ValueError(f"quantity bounds must be whole lots with 1 <= low <= high, got {quantity}")
    rng = random.Random(seed)
    rows = []
    for first in range(1, len(market.books) - window - horizon + 1, stride):
        arrival = first + window - 1
        episode = Episode(
            side=rng.choice(("buy", "sell")), quantity=float(rng.randint(int(low), int(high))),
            tick=tick, books=tuple(market.books[arrival:arrival + horizon + 1]),
            trades=tuple(market.trades[arrival + 1:arrival + horizon + 1]),
            taker_fee_bps=taker_fee_bps, maker_fee_bps=maker_fee_bps)
        rows.append(EpisodeRow(history=market.books[first:arrival + 1], history_trades=market.trades[first:arrival + 1],
                               episode=episode, start=market.timestamps[first],
                               end=market.timestamps[arrival + horizon]))
    return rows


def split_by_time(rows: list[EpisodeRow], val_fraction: float) -> tuple[list[EpisodeRow], list[EpisodeRow]]:
    """Train: episodes that end before the cut; validation: those that start after it; none straddle it."""
    if not rows:
        return [], []
    first, last = min(r.start for r in rows), max(r.end for r in rows)
    cut = last - (last - first) * val_fraction
    return [r for r in rows if r.end < cut], [r for r in rows if r.start > cut]


def episode_to_dict(episode: Episode) -> dict:
    return {"side": episode.side, "quantity": episode.quantity, "tick": episode.tick,
            "taker_fee_bps": episode.taker_fee_bps, "maker_fee_bps": episode.maker_fee_bps,
            "books": [{"bids": [list(l) for l in b.bids], "asks": [list(l) for l in b.asks]} for b in episode.books],
            "trades": [[[t.price, t.size, t.aggressor] for t in interval] for interval in episode.trades]}


def episode_from_dict(data: dict) -> Episode:
    return Episode(
        side=data["side"], quantity=float(data["quantity"]), tick=float(data["tick"]),
        taker_fee_bps=float(data["taker_fee_bps"]), maker_fee_bps=float(data["maker_fee_bps"]),
        books=tuple(Book(bids=tuple((float(p), float(s)) for p, s in b["bids"]),
                         asks=tuple((float(p), float(s)) for p, s in b["asks"])) for b in data["books"]),
        trades=tuple(tuple(Trade(float(p), float(s), str(a)) for p, s, a in interval) for interval in data["trades"]))
