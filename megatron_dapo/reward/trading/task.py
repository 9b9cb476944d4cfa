"""The limit-order execution task: the prompt, the answer format, and the reward.

Answer format (strict). After the last line that reads exactly `Orders:`, one child order per line:

    step=S offset=O size=Q tif=F

S: the decision step it is placed at, 0 .. H-1 (0 is now). O: the limit price in ticks behind the
touch on the order's own side at step S (0 joins the best bid for a buy / best ask for a sell,
2 sits two ticks behind it, a negative offset moves towards the other side and crosses it when
it reaches the spread). Q: size (> 0). F: the steps the order rests before it is cancelled (>= 1).
No lines (or `none`) after `Orders:` leaves everything to the market order at the horizon, which
also executes whatever the child orders did not fill.

Reward: the simulator's implementation shortfall (bps, fees included) against TWAP's on the same
episode, reward = tanh((TWAP shortfall - shortfall) / REWARD_SCALE_BPS) in (-1, 1); acc = 1 when
the answer beats TWAP. `profit_loss` = -shortfall in bps (dynamic sampling's metric). A malformed
answer scores MALFORMED_REWARD, its execution is the do-nothing one (everything at the horizon), and
`malformed` plus one `malformed_<reason>` field count why: unparseable, too_many_orders (more than
MAX_ORDERS_PER_STEP per step), bad_step, negative_size, bad_tif, price_outside_book (|offset| >
MAX_OFFSET_TICKS), oversize (sizes add up to more than the order).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from megatron_dapo.reward.trading import simulator
from megatron_dapo.reward.trading.market import episode_from_dict
from megatron_dapo.reward.trading.simulator import Book, ChildOrder, Episode, Trade

DATA_SOURCE = "limit_order_execution"
REWARD_SCALE_BPS = 10.0
MALFORMED_REWARD = -1.0
MAX_OFFSET_TICKS = 20
MAX_ORDERS_PER_STEP = 4
MALFORMED_REASONS = ("unparseable", "too_many_orders", "bad_step", "negative_size", "bad_tif", "price_outside_book",
                     "oversize")
_LINE = re.compile(r"step=(-?[0-9]{1,9}) offset=(-?[0-9]{1,9}) size=(-?[0-9]{1,12}(?:\.[0-9]{1,12})?) "
                   r"tif=(-?[0-9]{1,9})")
"""ASCII digits only, and not too many of them: a runaway number (4,300 digits and int() raises) is unparseable."""


class MalformedAnswer(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def parse_orders(response: str, episode: Episode) -> list[ChildOrder]:
    """The child orders of a response, or MalformedAnswer saying why not."""
    lines = response.strip().splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip() == "Orders:"]
    if not marks:
        raise MalformedAnswer("unparseable", "no line 'Orders:'")
    body = [line.strip() for line in lines[marks[-1] + 1:] if line.strip()]
    if body == ["none"]:
        return []
    orders, total = [], 0.0
    for line in body:
        match = _LINE.fullmatch(line)
        if match is None:
            raise MalformedAnswer("unparseable", f"line {line[:60]!r} is not 'step=S offset=O size=Q tif=F'")
        step, offset, size, tif = int(match[1]), int(match[2]), float(match[3]), int(match[4])
        if not 0 <= step < episode.horizon:
            raise MalformedAnswer("bad_step", f"step {step} is outside 0..{episode.horizon - 1}")
        if size <= 0:
            raise MalformedAnswer("negative_size", f"size {size} must be > 0")
        if tif < 1:
            raise MalformedAnswer("bad_tif", f"tif {tif} must be >= 1")
        if abs(offset) > MAX_OFFSET_TICKS:
            raise MalformedAnswer("price_outside_book", f"offset {offset} ticks is beyond +-{MAX_OFFSET_TICKS}")
        touch = episode.books[step].same_side(episode.side)[0][0]
        price = touch - offset * episode.tick if episode.side == "buy" else touch + offset * episode.tick
        if price <= 0:
            raise MalformedAnswer("price_outside_book", f"offset {offset} gives price {price}")
        total += size
        orders.append(ChildOrder(step=step, price=round(price, 10), size=size, tif=tif))
    busiest = max(Counter(order.step for order in orders).items(), key=lambda item: item[1], default=None)
    if busiest is not None and busiest[1] > MAX_ORDERS_PER_STEP:
        raise MalformedAnswer("too_many_orders", f"{busiest[1]} orders at step {busiest[0]} "
                              f"(at most {MAX_ORDERS_PER_STEP} per step)")
    if total > episode.quantity + simulator.EPS:
        raise MalformedAnswer("oversize", f"sizes add up to {total:g} > the order's {episode.quantity:g}")
    return orders


def evaluate(response: str, episode: Episode) -> dict[str, float]:
    """Shortfalls of the answer and of the baselines, the reward, and the malformed counters."""
    reason = None
    try:
        orders = parse_orders(response, episode)
    except MalformedAnswer as err:
        orders, reason = [], err.reason
    shortfall = simulator.shortfall_bps(episode, simulator.simulate(episode, orders))
    base = {name: simulator.shortfall_bps(episode, simulator.simulate(episode, make(episode)))
            for name, make in simulator.BASELINES.items()}
    reward = MALFORMED_REWARD if reason else math.tanh((base["twap"] - shortfall) / REWARD_SCALE_BPS)
    out = {"reward": reward, "acc": float(reason is None and shortfall < base["twap"]), "profit_loss": -shortfall,
           "shortfall_bps": shortfall, **{f"vs_{name}_bps": shortfall - value for name, value in base.items()},
           "malformed": float(reason is not None)}
    out.update({f"malformed_{r}": float(r == reason) for r in MALFORMED_REASONS})
    return out


def reward(response: str, ground_truth: str, extra_info: dict[str, Any]):
    """The registered reward function (data_source "limit_order_execution"); the episode is in extra_info."""
    from megatron_dapo.reward.registry import RewardResult

    result = evaluate(response, episode_from_dict(extra_info["episode"]))
    score, acc = result.pop("reward"), result.pop("acc")
    return RewardResult(score=score, acc=acc, extra=result)


# ---- the prompt ---------------------------------------------------------------------------------

def _price_text(price: float, tick: float) -> str:
    """A price with the tick's decimals (trailing zeros dropped): `:g` keeps 6 significant digits, and showed
    100234.5 as 100234, and a bid of 59994.93 and an ask of 59994.94 as the same 59994.9."""
    decimals = max(0, len(f"{tick:.10f}".rstrip("0").split(".")[1]))
    text = f"{price:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def render_prompt(history: list[Book], trades: list[tuple[Trade, ...]], episode: Episode, *, compact: bool = False,
                  interval_s: float = 10.0) -> str:
    """The episode as text: the order, the fees, the recent book window (oldest first), the answer format.

    compact: one short line per snapshot, for the CPU-sized model."""
    side = episode.side.upper()
    if compact:  # spread in ticks, best bid and ask sizes, mid return in bps, per snapshot
        rows, previous = [], None
        for book in history:
            ret = 0.0 if previous is None else (book.mid / previous.mid - 1) * 1e4
            spread = round((book.best_ask - book.best_bid) / episode.tick)
            rows.append(f"sp{spread} b{book.bids[0][1]:.1f} a{book.asks[0][1]:.1f} r{ret:+.0f}")
            previous = book
        return f"{side} {episode.quantity:g} in {episode.horizon}\n" + "\n".join(rows)
    lines = [
        f"Execute a {side} order of {episode.quantity:g} lots within {episode.horizon} decision steps "
        f"(one step = {interval_s:g} s). Tick size {episode.tick:g}. Fees: taker {episode.taker_fee_bps:g} bps, "
        f"maker {episode.maker_fee_bps:g} bps. Whatever is unfilled at the horizon is bought or sold at market.",
        "Recent order book, oldest first (bid price x size | ask price x size for the top levels, spread in "
        "ticks, mid return in bps since the previous snapshot, lots bought / sold by takers):",
    ]
    previous = None
    for book, interval in zip(history, trades):
        depth = " ".join(f"{_price_text(p, episode.tick)}x{s:g}" for p, s in book.bids[:3]) + " | " + \
            " ".join(f"{_price_text(p, episode.tick)}x{s:g}" for p, s in book.asks[:3])
        spread = round((book.best_ask - book.best_bid) / episode.tick)
        ret = 0.0 if previous is None else (book.mid / previous.mid - 1) * 1e4
        bought = sum(t.size for t in interval if t.aggressor == "buy")
        sold = sum(t.size for t in interval if t.aggressor == "sell")
        lines.append(f"{depth} spread {spread} ret {ret:+.1f} vol {bought:.2f}/{sold:.2f}")
        previous = book
    lines.append("The last snapshot is now (step 0). Reason briefly, then answer with a line 'Orders:' followed by "
                 "one line per child order: step=S offset=O size=Q tif=F (S: step 0.."
                 f"{episode.horizon - 1}; O: limit price in ticks behind the touch on your side, negative to "
                 f"cross, at most {MAX_OFFSET_TICKS} either way; Q: size, the sizes adding up to at most the order; "
                 f"F: steps it rests), at most {MAX_ORDERS_PER_STEP} orders a step, or 'none'.")
    return "\n".join(lines)
