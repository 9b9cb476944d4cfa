"""The execution task: answers parsed strictly, malformed ones penalised with a counted reason, the
reward through the real scorer, and market data from files and from the generator, split by time."""
import math
import re

import pytest

from megatron_dapo.reward.registry import RewardSample
from megatron_dapo.reward.scorer import compute_rewards
from megatron_dapo.reward.trading.market import (
    MarketDataError,
    cut_episodes,
    episode_from_dict,
    episode_to_dict,
    load_market,
    split_by_time,
    synthetic_market,
    write_market,
)
from megatron_dapo.reward.trading.simulator import Book, ChildOrder, Episode, Trade
from megatron_dapo.reward.trading.task import (
    MALFORMED_REASONS,
    MALFORMED_REWARD,
    evaluate,
    parse_orders,
    render_prompt,
)
from tests.reward.trading.test_simulator import BOOK, _episode

EPISODE = _episode("buy", 10, [(Trade(100.0, 7.0, "sell"),), ()])


def test_orders_are_read_after_the_last_orders_line():
    text = "I will join the bid.\nOrders:\nstep=0 offset=9 size=1 tif=1\nOrders:\nstep=0 offset=0 size=6 tif=2\n" \
           "step=1 offset=-1 size=4 tif=1\n"
    assert parse_orders(text, EPISODE) == [ChildOrder(step=0, price=100.0, size=6.0, tif=2),
                                           ChildOrder(step=1, price=101.0, size=4.0, tif=1)]
    assert parse_orders("Orders:\nnone", EPISODE) == []
    # The limit is per step: 4 at step 0 and 2 at step 1 are legal; offsets up to 20 either way.
    legal = "Orders:\n" + "step=0 offset=0 size=1 tif=1\n" * 3 + "step=0 offset=20 size=1 tif=1\n" + \
        "step=1 offset=-20 size=1 tif=1\n" * 2
    assert [order.price for order in parse_orders(legal, EPISODE)] == [100.0] * 3 + [80.0, 120.0, 120.0]


def test_a_sell_is_priced_from_the_ask_at_its_own_step():
    sell = _episode("sell", 10, [(), ()])
    orders = parse_orders("Orders:\nstep=0 offset=0 size=1 tif=1\nstep=1 offset=-1 size=1 tif=1\n"
                          "step=1 offset=2 size=1 tif=1", sell)
    assert [order.price for order in orders] == [101.0, 100.0, 103.0]  # 0 joins the ask, -1 crosses to the bid
    # The touch is the book's at the order's step: the bids are 98 at step 1.
    lower = Book(bids=((98.0, 5.0), (97.0, 10.0)), asks=((99.0, 4.0), (100.0, 10.0)))
    falling = _episode("buy", 4, [(), ()], books=(BOOK, lower, lower))
    orders = parse_orders("Orders:\nstep=1 offset=0 size=1 tif=1\nstep=0 offset=0 size=1 tif=1", falling)
    assert [order.price for order in orders] == [98.0, 100.0]
    # Doing nothing beats TWAP in a falling market for a buy: a malformed answer, executed as doing nothing, is
    # still no success.
    assert evaluate("Orders:\nnone", falling)["acc"] == 1.0
    assert evaluate("buy it all", falling)["acc"] == 0.0


@pytest.mark.parametrize("answer, reason", [
    ("buy it all now", "unparseable"),
    ("Orders:\nstep=0 offset=0 size=5", "unparseable"),
    ("Orders:\nstep=2 offset=0 size=5 tif=1", "bad_step"),
    ("Orders:\nstep=0 offset=0 size=-5 tif=1", "negative_size"),
    ("Orders:\nstep=0 offset=0 size=5 tif=0", "bad_tif"),
    ("Orders:\n" + "step=0 offset=0 size=1 tif=1\n" * 5, "too_many_orders"),  # the limit is per step
    ("Orders:\nstep=0 offset=500 size=5 tif=1", "price_outside_book"),
    ("Orders:\nstep=0 offset=-21 size=5 tif=1", "price_outside_book"),  # the bound holds both ways
    ("Orders:\nstep=0 offset=0 size=6 tif=1\nstep=1 offset=0 size=6 tif=1", "oversize"),
    ("Orders:\nstep=0 offset=0 size=1 tif=" + "1" * 5000, "unparseable"),  # int() refuses 4,300+ digits
    ("Orders:\nstep=\u0660 offset=0 size=5 tif=1", "unparseable"),  # an Arabic-Indic zero is no ASCII digit
])
def test_malformed_answers_get_the_penalty_and_their_reason(answer, reason):
    result = evaluate(answer, EPISODE)
    assert result["reward"] == MALFORMED_REWARD and result["acc"] == 0.0 and result["malformed"] == 1.0
    assert {r: result[f"malformed_{r}"] for r in MALFORMED_REASONS} == {r: float(r == reason) for r in MALFORMED_REASONS}
    # Scored as doing nothing: the whole order at market at the horizon.
    assert result["profit_loss"] == pytest.approx(-evaluate("Orders:\nnone", EPISODE)["shortfall_bps"])


def test_reward_compares_with_twap_on_the_same_episode():
    passive = evaluate("Orders:\nstep=0 offset=0 size=10 tif=2", EPISODE)
    market = evaluate("Orders:\nstep=0 offset=-2 size=10 tif=1", EPISODE)  # up to 102: the market order's fills
    assert passive["malformed"] == 0.0 and passive["vs_passive_bps"] == pytest.approx(0.0)
    assert market["vs_market_bps"] == pytest.approx(0.0, abs=1e-9)
    assert (passive["reward"] > 0) == (passive["vs_twap_bps"] < 0) == bool(passive["acc"])
    assert -1 < market["reward"] < 1 and market["profit_loss"] == -market["shortfall_bps"]
    # By hand, against the arrival mid 100.5 on 10 x 100.5 = 1005 of notional (taker fee 5 bps, maker 1 bp):
    # TWAP buys 5 at each of the two steps at market, 4 at 101 and 1 at 102: 2 x (4 x 0.5 + 1.5) + 1012 x 5e-4
    # = 7.506, 74.687 bps. Passive rests 10 at 100 behind 5: the sell of 7 fills 2 (-1, fee 200 x 1e-4), the
    # horizon's market order 4 at 101 and 4 at 102 (2 + 6, fee 812 x 5e-4): 7.426, 73.891 bps. Market crosses to
    # 102: 4 at 101 and 6 at 102, 2 + 9 + 1016 x 5e-4 = 11.508, 114.507 bps.
    twap, passive_bps, market_bps = 7.506 / 1005 * 1e4, 7.426 / 1005 * 1e4, 11.508 / 1005 * 1e4
    assert passive["shortfall_bps"] == pytest.approx(passive_bps) and market["shortfall_bps"] == pytest.approx(market_bps)
    assert passive["vs_twap_bps"] == pytest.approx(passive_bps - twap)
    assert passive["reward"] == pytest.approx(math.tanh((twap - passive_bps) / 10))  # REWARD_SCALE_BPS
    assert market["reward"] == pytest.approx(math.tanh((twap - market_bps) / 10))


def test_reward_function_runs_in_the_scorer_workers():
    rows = cut_episodes(synthetic_market(60, seed=3), window=4, horizon=4, stride=10, seed=0, tick=0.1)
    episode = rows[0].episode
    samples = [RewardSample("limit_order_execution", answer, "", {"episode": episode_to_dict(episode)})
               for answer in ("Orders:\nstep=0 offset=0 size=1 tif=3", "no idea", "Orders:\nnone")]
    batch = compute_rewards(samples, timeout_s=30, num_workers=1)
    assert batch.num_failed == 0
    good, bad, idle = batch.results
    assert bad.score == MALFORMED_REWARD and bad.extra["malformed_unparseable"] == 1.0
    assert good.extra["malformed"] == 0.0 and set(good.extra) == set(bad.extra) == set(idle.extra)
    assert "profit_loss" in good.extra and "vs_twap_bps" in good.extra


def test_market_files_round_trip_and_bad_rows_are_named(tmp_path):
    market = synthetic_market(50, seed=1, levels=3)
    write_market(market, tmp_path / "books.csv", tmp_path / "trades.csv")
    loaded = load_market(tmp_path / "books.csv", tmp_path / "trades.csv")
    assert loaded.books == market.books and loaded.timestamps == market.timestamps
    assert loaded.trades == market.trades
    import pyarrow.csv
    import pyarrow.parquet

    for name in ("books", "trades"):  # the same tables as Parquet
        pyarrow.parquet.write_table(pyarrow.csv.read_csv(tmp_path / f"{name}.csv"), tmp_path / f"{name}.parquet")
    from_parquet = load_market(tmp_path / "books.parquet", tmp_path / "trades.parquet")
    assert from_parquet.books == market.books and from_parquet.trades == loaded.trades
    lines = (tmp_path / "books.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",", ",x", 1)
    (tmp_path / "books.csv").write_text("\n".join(lines))
    with pytest.raises(MarketDataError, match=r"books.csv row 4: ValueError"):
        load_market(tmp_path / "books.csv", tmp_path / "trades.csv")


def test_values_a_market_cannot_hold_are_named_and_a_thin_book_is_read(tmp_path):
    """Before, a NaN deeper level (what pandas writes for a thin book) or a negative trade size loaded, and every
    answer on such an episode scored NaN, as if the reward function were broken."""
    header = "timestamp,bid_px_1,bid_sz_1,bid_px_2,bid_sz_2,ask_px_1,ask_sz_1,ask_px_2,ask_sz_2\n"
    trades = tmp_path / "trades.csv"
    trades.write_text("timestamp,price,size,side\n1.5,99,1,sell\n")

    def load(*rows, trade_rows=None):
        (tmp_path / "books.csv").write_text(header + "".join(f"{t},{row}\n" for t, row in enumerate(rows, 1)))
        if trade_rows is not None:
            trades.write_text("timestamp,price,size,side\n" + "".join(r + "\n" for r in trade_rows))
        return load_market(tmp_path / "books.csv", trades)

    thin = load("99,1,98,2,101,1,102,2", "99,1,,,101,1,nan,nan")  # the second snapshot has one level a side
    assert thin.books[1].bids == ((99.0, 1.0),) and thin.books[1].asks == ((101.0, 1.0),)
    write_market(thin, tmp_path / "again.csv", tmp_path / "again_trades.csv")
    assert load_market(tmp_path / "again.csv", tmp_path / "again_trades.csv").books == thin.books
    for row, message in (("99,1,98,nan,101,1,102,2", "row 3: bid_sz_2 is empty, not a finite number"),
                         ("99,1,98,2,101,1,inf,2", "row 3: ask_px_2 is inf, not a finite number"),
                         ("99,1,98,-2,101,1,102,2", "row 3: bid_px_2 98.0 must be > 0 and bid_sz_2 -2.0 >= 0"),
                         ("99,1,,,101,1,102,2", None), ("99,1,,,101,1,102,", "row 3: ask_sz_2 is empty"),
                         (",,98,2,101,1,102,2", "row 3: bid_px_1 is empty"),
                         ("99,1,100,2,101,1,102,2", "row 3: bid_px_2 100.0 is not below bid_px_1 99.0"),
                         ("99,1,98,2,,,102,2", "row 3: ask_px_1 is empty")):
        if message is None:
            load("99,1,98,2,101,1,102,2", row)
            continue
        with pytest.raises(MarketDataError, match=re.escape(f"books.csv {message}")):
            load("99,1,98,2,101,1,102,2", row)
    with pytest.raises(MarketDataError, match=re.escape("trades.csv row 2: price 99.0 and size -3.0 must be > 0")):
        load("99,1,98,2,101,1,102,2", trade_rows=["1.5,99,-3,sell"])
    with pytest.raises(MarketDataError, match=re.escape("trades.csv row 2: price is empty, not a finite number")):
        load("99,1,98,2,101,1,102,2", trade_rows=["1.5,nan,3,sell"])


def test_synthetic_market_has_regimes_and_episodes_split_by_time():
    market = synthetic_market(600, seed=7)
    spreads = [round((b.best_ask - b.best_bid) / 0.1) for b in market.books]
    assert min(spreads) >= 1 and max(spreads) >= 3  # busy stretches widen the spread
    assert all(b.bids[0][0] < b.asks[0][0] for b in market.books)
    rows = cut_episodes(market, window=8, horizon=6, stride=5, seed=0, tick=0.1)
    train, val = split_by_time(rows, val_fraction=0.2)
    assert train and val and max(r.end for r in train) < min(r.start for r in val)
    assert len(train) + len(val) < len(rows)  # the episodes across the cut are dropped
    assert episode_from_dict(episode_to_dict(train[0].episode)) == train[0].episode
    text = render_prompt(train[0].history, train[0].history_trades, train[0].episode)
    assert text.count("spread") >= 8 and "Orders:" in text and "step=S offset=O size=Q tif=F" in text
    assert "at most 20 either way" in text and "at most 4 orders a step" in text  # what the penalty is for


def test_prices_are_shown_to_the_tick():
    """`:g` kept 6 significant digits: 100234.5 read 100234, and a 59994.93 bid and a 59994.94 ask looked alike."""
    episode = Episode(side="buy", quantity=1.0, tick=0.01, books=(Book(bids=((59994.93, 1.0),),
                                                                          asks=((59994.94, 2.0),)),) * 2, trades=((),))
    book = episode.books[0]
    text = render_prompt([book], [()], episode)
    assert "59994.93x1 | 59994.94x2 spread 1" in text
    big = Episode(side="sell", quantity=1.0, tick=0.5, books=(Book(bids=((100234.5, 3.0),),
                                                                    asks=((100235.0, 1.0),)),) * 2, trades=((),))
    assert "100234.5x3 | 100235x1 spread 1" in render_prompt([big.books[0]], [()], big)


def test_quantity_bounds_are_whole_lots():
    market = synthetic_market(60, seed=3)
    rows = cut_episodes(market, window=4, horizon=4, stride=10, seed=0, tick=0.1, quantity=(2, 3))
    assert len(rows) == 6 and {row.episode.quantity for row in rows} == {2.0, 3.0}
    for bad in ((0.5, 2.0), (0, 3), (4, 2), (1.5, 3)):  # a zero-size order would divide its shortfall by zero
        with pytest.raises(ValueError, match="whole lots with 1 <= low <= high"):
            cut_episodes(market, window=4, horizon=4, stride=10, seed=0, tick=0.1, quantity=bad)


def test_episodes_replay_the_trades_after_arrival_and_show_those_before():
    """market.trades[i] are the trades between snapshots i - 1 and i: an episode arriving at snapshot a shows
    those up to a and replays from a + 1 (one interval later would leak into the prompt what it replays)."""
    market = synthetic_market(60, seed=3)
    rows = cut_episodes(market, window=4, horizon=3, stride=7, seed=0, tick=0.1)
    assert len({market.trades[i] for i in range(1, 60)}) > 50  # the intervals differ, so a shift would show
    for row in rows:
        arrival = market.books.index(row.episode.books[0])
        assert row.history[-1] == market.books[arrival] and len(row.history) == 4
        assert row.history_trades[-1] == market.trades[arrival]
        assert row.episode.trades == tuple(market.trades[arrival + 1:arrival + 4])
        assert row.episode.books == tuple(market.books[arrival:arrival + 4])


def test_a_trade_at_a_snapshot_s_time_is_in_the_interval_that_snapshot_ends(tmp_path):
    (tmp_path / "books.csv").write_text("timestamp,bid_px_1,bid_sz_1,ask_px_1,ask_sz_1\n"
                                       "1,99,1,101,1\n2,99,1,101,1\n3,99,1,101,1\n")
    (tmp_path / "trades.csv").write_text("timestamp,price,size,side\n0.5,99,9,sell\n1.5,99,1,sell\n"
                                         "2,100,2,buy\n2.5,101,3,buy\n3.5,99,9,sell\n")
    market = load_market(tmp_path / "books.csv", tmp_path / "trades.csv")
    # Before the first snapshot and after the last: in no interval.
    assert market.trades == [(), (Trade(99.0, 1.0, "sell"), Trade(100.0, 2.0, "buy")), (Trade(101.0, 3.0, "buy"),)]


def test_episodes_need_a_window_and_a_horizon():
    market = synthetic_market(40, seed=1)
    for bad in ({"window": 0}, {"horizon": 0}, {"stride": 0}):
        settings = {"window": 4, "horizon": 4, "stride": 5, **bad}
        with pytest.raises(ValueError, match=f"{next(iter(bad))}={0}"):
            cut_episodes(market, seed=0, tick=0.1, **settings)
