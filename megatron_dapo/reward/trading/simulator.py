"""A deterministic limit-order execution simulator: replays an episode's order book and fills child orders.

Time runs in decision steps 0..H. Step k sees book k (book 0 is the arrival snapshot); the trades
of the interval between books k-1 and k arrive before book k. A child order placed at step s with
time-in-force f rests through the intervals s+1 .. s+f (never past H) and is cancelled after.
Whatever is left at step H is sent as a market order against book H.

Fills, for a buy (a sell mirrors it):
- marketable (limit >= best ask at placement): takes the ask levels priced <= limit, best first, at
  their prices and up to their displayed sizes; the rest of the order rests at the limit;
- resting at price p, with a queue ahead of it: the displayed bid size at p when it was placed
  (nothing when p improves on the best bid or lies between displayed levels; the deepest level's size
  when p is below every displayed bid, where the book shows nothing); cancellations ahead are not credited;
- in each interval: seller-initiated trades at exactly p first use up the queue ahead, then fill
  the order; the queue is the market's, so orders of ours at one price clear it once between them
  (the first placed fills first, then the next, behind whatever of the queue is still ahead of it);
  trades below p (which would have hit the order first, by price priority) fill it, up to their size,
  and leave no queue ahead of it (they took the whole queue at p first);
  asks displayed below p in the new book (a book that moved through the order) fill it up to the size
  they show beyond what the book before showed at their price, and leave no queue ahead of it either. The replayed book does not know which
  of its asks the order itself took: an ask the book before showed too may be one the order took when
  it was placed, or in an earlier interval, and an ask at exactly p may be the rest of one it took
  (neither fills it; an order that crosses the spread and rests gets no maker fills from the asks it
  crossed). Resting orders share these volumes, best price first, then in the order they were
  placed, and marketable orders in one step share the displayed levels;
- fills of resting orders are at the order's price and pay the maker fee; marketable fills and the
  final market order pay the taker fee. A market order larger than the book's displayed depth fills
  the excess at the deepest level's price.

Cost is implementation shortfall against the arrival mid, in basis points of the order's arrival
notional, fees included: positive is worse than the mid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

EPS = 1e-12
"""Sizes this close to zero are zero."""
PRICE_RTOL = 1e-9
"""Prices this close, relative to their size, are one price: a price reached by arithmetic in ticks (the touch less
three ticks) can be a float step away from the book's, which at a price of 1e6 is 1.2e-10 (any tick is far wider
than 1e-9 of its price)."""


def same_price(a: float, b: float) -> bool:
    return abs(a - b) <= PRICE_RTOL * max(abs(a), abs(b))


@dataclass(frozen=True)
class Book:
    """One snapshot: price levels best first, [(price, size), ...]."""

    bids: tuple[tuple[float, float], ...]
    asks: tuple[tuple[float, float], ...]

    @property
    def best_bid(self) -> float:
        return self.bids[0][0]

    @property
    def best_ask(self) -> float:
        return self.asks[0][0]

    @property
    def mid(self) -> float:
        return (self.best_bid + self.best_ask) / 2

    def same_side(self, side: str) -> tuple[tuple[float, float], ...]:
        """The levels an order of `side` joins (bids for a buy)."""
        return self.bids if side == "buy" else self.asks

    def opposite(self, side: str) -> tuple[tuple[float, float], ...]:
        """The levels an order of `side` takes from (asks for a buy)."""
        return self.asks if side == "buy" else self.bids


@dataclass(frozen=True)
class Trade:
    price: float
    size: float
    aggressor: str
    """"buy" (took the asks) or "sell" (hit the bids)."""


@dataclass(frozen=True)
class Episode:
    side: str
    """"buy" or "sell"."""
    quantity: float
    """Size to execute by the horizon."""
    tick: float
    """Price increment."""
    books: tuple[Book, ...]
    """Books 0..H: book 0 at arrival, one per decision step after it."""
    trades: tuple[tuple[Trade, ...], ...]
    """trades[k - 1]: the trades between book k-1 and book k (H entries)."""
    taker_fee_bps: float = 5.0
    maker_fee_bps: float = 1.0

    @property
    def horizon(self) -> int:
        return len(self.books) - 1

    @property
    def arrival_mid(self) -> float:
        return self.books[0].mid


@dataclass(frozen=True)
class ChildOrder:
    step: int
    """Decision step at which it is placed, 0 .. H-1."""
    price: float | None
    """Limit price; None for a market order (fills in full, at the deepest level beyond the book)."""
    size: float
    tif: int
    """Intervals it rests for (>= 1)."""


@dataclass
class Execution:
    fills: list[tuple[int, float, float, bool]] = field(default_factory=list)
    """(step, price, size, taker) per fill; step H for the final market order."""

    @property
    def filled(self) -> float:
        return sum(f[2] for f in self.fills)


def _better_or_equal(side: str, price: float, than: float) -> bool:
    """A buy at `price` pays at least `than` (a sell receives at most it)."""
    return price >= than or same_price(price, than) if side == "buy" else price <= than or same_price(price, than)


def take(levels: list[list[float]], side: str, size: float, limit: float | None) -> list[tuple[float, float]]:
    """Walk the opposite side's levels ([price, depth], best first, depth used up in place) up to `limit`;
    with no limit the excess beyond the displayed depth fills at the deepest level's price."""
    fills, left = [], size
    for level in levels:
        price, depth = level
        if left <= EPS or (limit is not None and not _better_or_equal(side, limit, price)):
            break
        got = min(left, depth)
        if got > EPS:
            fills.append((price, got))
            level[1] -= got
            left -= got
    if limit is None and left > EPS:
        fills.append((levels[-1][0], left))
    return fills


def _queue_ahead(book: Book, side: str, price: float) -> float:
    levels = book.same_side(side)
    for level, depth in levels:
        if same_price(level, price):
            return depth
    deepest = levels[-1] if levels else None
    if deepest is not None and (price < deepest[0] if side == "buy" else price > deepest[0]):
        return deepest[1]  # beyond the displayed levels, where the book shows nothing: as deep as the deepest
    return 0.0  # improves on the touch, or in a gap between displayed levels: nobody is there


def simulate(episode: Episode, orders: list[ChildOrder]) -> Execution:
    """Fill `orders` (checked by the caller: steps in range, sizes summing to at most the quantity).

    Within a step, everything shares the step's liquidity: marketable orders and the final market order
    use up the displayed levels they take, and resting orders share the interval's trades and any
    crossing levels, best price first, then in the order they were placed.
    """
    side, horizon = episode.side, episode.horizon
    hitting = "sell" if side == "buy" else "buy"
    execution = Execution()
    resting: list[dict] = []
    placed = 0
    by_step: dict[int, list[ChildOrder]] = {}
    for order in orders:
        by_step.setdefault(order.step, []).append(order)
    best_first = -1 if side == "buy" else 1

    def priority(orders: list[dict]) -> list[dict]:
        """Best price first, then the order placed first. Prices that are one price (`same_price`: one reached by
        arithmetic in ticks can be a float step below the same price in the book or in another order) rank as
        the first placed of them, so that a later order at that price cannot jump ahead by a float step."""
        anchors: list[float] = []

        def anchor(price: float) -> float:
            found = next((a for a in anchors if same_price(a, price)), None)
            if found is None:
                anchors.append(price)
            return price if found is None else found

        by_seq = sorted(orders, key=lambda o: o["seq"])
        ranked = [(best_first * anchor(o["price"]), o["seq"], i) for i, o in enumerate(by_seq)]
        return [by_seq[i] for *_, i in sorted(ranked)]

    for step in range(horizon + 1):
        book = episode.books[step]
        levels = [[price, depth] for price, depth in book.opposite(side)]
        if step > 0:  # the interval's trades and the new book, against what rests
            trades = [[t.price, t.size] for t in episode.trades[step - 1] if t.aggressor == hitting]
            cleared: list[list[float]] = []  # [price, queue volume traded away at it this interval]
            fresh = _beyond(levels, episode.books[step - 1].opposite(side))
            for order in priority(resting):
                _fill_resting(order, trades, levels, fresh, side, step, execution, cleared)
            resting = [o for o in resting if o["left"] > EPS and o["expires"] > step]
        if step == horizon:
            break
        for order in by_step.get(step, []):
            left = order.size
            for price, size in take(levels, side, order.size, order.price):
                execution.fills.append((step, price, size, True))
                left -= size
            if left > EPS:
                resting.append({"price": order.price, "left": left, "expires": min(step + order.tif, horizon),
                                "queue": _queue_ahead(book, side, order.price), "seq": placed})
                placed += 1
    left = episode.quantity - execution.filled
    if left > EPS:
        for price, size in take(levels, side, left, None):
            execution.fills.append((horizon, price, size, True))
    return execution


def _consume(pool: list[list[float]], eligible, amount: float) -> float:
    """Use up to `amount` of the eligible entries of pool ([price, size], sizes reduced in place)."""
    used = 0.0
    for entry in pool:
        if used >= amount - EPS:
            break
        if eligible(entry[0]) and entry[1] > EPS:
            got = min(entry[1], amount - used)
            entry[1] -= got
            used += got
    return used


def _beyond(levels: list[list[float]], before: tuple[tuple[float, float], ...]) -> list[float]:
    """Per level of `levels` ([price, depth]), the depth beyond what the book `before` showed at its price."""
    return [max(depth - sum(d for p, d in before if same_price(p, price)), 0.0) for price, depth in levels]


def _fill_resting(order: dict, trades: list[list[float]], levels: list[list[float]], fresh: list[float], side: str,
                  step: int, execution: Execution, cleared: list[list[float]]) -> None:
    """One interval for one resting order: trades at its price serve the queue ahead first; then it fills
    from what is left of them, from trades through its price, and from crossing levels, up to what they show
    beyond the book before (`fresh`, per level, used up in place alongside `levels`).
    cleared: the queue volume already traded away at each price this interval, by orders of ours placed before
    this one; the market's queue ahead of this order is cleared once, not again for each of our orders."""
    price = order["price"]

    def at(p: float) -> bool:
        return same_price(p, price)

    def through(p: float) -> bool:
        return _better_or_equal(side, price, p) and not at(p)

    done = next((entry for entry in cleared if at(entry[0])), None)
    if done is None:
        done = [price, 0.0]
        cleared.append(done)
    done[1] += _consume(trades, at, max(order["queue"] - done[1], 0.0))
    order["queue"] = max(order["queue"] - done[1], 0.0)
    if any(through(p) for p, _ in trades):  # the market traded through its price: the queue at it was taken first
        order["queue"] = 0.0
    got = _consume(trades, lambda p: at(p) or through(p), order["left"])
    for i, level in enumerate(levels):
        if order["left"] - got <= EPS:
            break
        if through(level[0]):
            order["queue"] = 0.0  # a book that moved through its price took the queue at it first
            taken = min(fresh[i], level[1], order["left"] - got)
            if taken > EPS:
                fresh[i] -= taken
                level[1] -= taken
                got += taken
    if got > EPS:
        execution.fills.append((step, price, got, False))
        order["left"] -= got


def shortfall_bps(episode: Episode, execution: Execution) -> float:
    """Implementation shortfall of the fills against the arrival mid, fees included, in bps (lower is better)."""
    mid, sign = episode.arrival_mid, 1.0 if episode.side == "buy" else -1.0
    cost = 0.0
    for _, price, size, taker in execution.fills:
        fee = episode.taker_fee_bps if taker else episode.maker_fee_bps
        cost += sign * (price - mid) * size + price * size * fee / 1e4
    return cost / (mid * episode.quantity) * 1e4


# ---- baselines ---------------------------------------------------------------------------------

def market_now(episode: Episode) -> list[ChildOrder]:
    """The whole quantity at once, against the arrival book."""
    return [ChildOrder(step=0, price=None, size=episode.quantity, tif=1)]


def twap(episode: Episode) -> list[ChildOrder]:
    """Equal marketable slices at every decision step."""
    slice_ = episode.quantity / episode.horizon
    return [ChildOrder(step=k, price=None, size=slice_, tif=1) for k in range(episode.horizon)]


def passive_at_touch(episode: Episode) -> list[ChildOrder]:
    """The whole quantity resting at the arrival touch (best bid for a buy) until the horizon."""
    touch = episode.books[0].same_side(episode.side)[0][0]
    return [ChildOrder(step=0, price=touch, size=episode.quantity, tif=episode.horizon)]


BASELINES = {"market": market_now, "twap": twap, "passive": passive_at_touch}

