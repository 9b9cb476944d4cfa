"""The execution simulator on episodes worked out by hand.

Book at arrival and after: bids 100 x 5, 99 x 10; asks 101 x 4, 102 x 10; mid 100.5; tick 1;
taker fee 5 bps, maker fee 1 bps. Shortfall in bps of the arrival notional (mid x quantity).
"""
import pytest

from megatron_dapo.reward.trading.simulator import (
    Book,
    ChildOrder,
    Episode,
    Trade,
    passive_at_touch,
    shortfall_bps,
    simulate,
    twap,
)

BOOK = Book(bids=((100.0, 5.0), (99.0, 10.0)), asks=((101.0, 4.0), (102.0, 10.0)))


def _episode(side, quantity, trades, books=None):
    books = books or (BOOK, BOOK, BOOK)
    return Episode(side=side, quantity=quantity, tick=1.0, books=tuple(books), trades=tuple(trades),
                   taker_fee_bps=5.0, maker_fee_bps=1.0)


def _bps(cost, quantity):
    return cost / (100.5 * quantity) * 1e4


def test_marketable_buy_fills_in_full_walking_the_book():
    episode = _episode("buy", 10, [(), ()])
    execution = simulate(episode, [ChildOrder(step=0, price=102.0, size=10, tif=1)])
    assert execution.fills == [(0, 101.0, 4.0, True), (0, 102.0, 6.0, True)]
    # 4 x (101 - 100.5) + 6 x (102 - 100.5) = 11, taker fee 5 bps of 404 + 612 = 0.508
    assert shortfall_bps(episode, execution) == pytest.approx(_bps(11 + 0.508, 10))


def test_partial_passive_fill_then_market_at_the_horizon():
    # Joins the best bid behind 5 lots; sellers take 7 at 100: 5 go to the queue ahead, 2 to us.
    episode = _episode("buy", 10, [(Trade(100.0, 7.0, "sell"),), ()])
    execution = simulate(episode, [ChildOrder(step=0, price=100.0, size=10, tif=2)])
    assert execution.fills == [(1, 100.0, 2.0, False), (2, 101.0, 4.0, True), (2, 102.0, 4.0, True)]
    maker = 2 * (100 - 100.5) + 200 * 1e-4
    taker = 4 * 0.5 + 404 * 5e-4 + 4 * 1.5 + 408 * 5e-4
    assert shortfall_bps(episode, execution) == pytest.approx(_bps(maker + taker, 10))


def test_no_fill_then_the_whole_order_at_market_at_the_horizon():
    # Resting at 99 behind 10 lots; the only trade is at 100, above it: nothing fills; cancelled after 1 step.
    episode = _episode("buy", 10, [(Trade(100.0, 3.0, "sell"),), ()])
    execution = simulate(episode, [ChildOrder(step=0, price=99.0, size=10, tif=1)])
    assert execution.fills == [(2, 101.0, 4.0, True), (2, 102.0, 6.0, True)]
    assert shortfall_bps(episode, execution) == pytest.approx(_bps(11 + 0.508, 10))


def test_sell_side_queue_then_a_trade_through_the_price():
    # Sells 6 at the best ask behind 4: buyers take 3 at 101 (queue 4 -> 1), then 2 at 102, through our 101:
    # those 2 would have taken our cheaper offer first. The other 4 are sold at market at the horizon (bid 100).
    episode = _episode("sell", 6, [(Trade(101.0, 3.0, "buy"),), (Trade(102.0, 2.0, "buy"),)])
    execution = simulate(episode, [ChildOrder(step=0, price=101.0, size=6, tif=2)])
    assert execution.fills == [(2, 101.0, 2.0, False), (2, 100.0, 4.0, True)]
    # a sell above the mid earns, below it costs: -(101 - 100.5) x 2 + 202e-4, then (100.5 - 100) x 4 + 400 x 5e-4
    assert shortfall_bps(episode, execution) == pytest.approx((-1 + 0.0202 + 2 + 0.2) / (100.5 * 6) * 1e4)


def test_book_moving_through_a_resting_order_fills_it():
    lower = Book(bids=((98.0, 5.0), (97.0, 10.0)), asks=((99.0, 4.0), (100.0, 10.0)))
    episode = _episode("buy", 5, [(), ()], books=(BOOK, lower, lower))
    execution = simulate(episode, [ChildOrder(step=0, price=100.0, size=5, tif=1)])
    # The 4 lots offered at 99, below the bid, trade with it; the last lot goes at market at the horizon.
    assert execution.fills == [(1, 100.0, 4.0, False), (2, 99.0, 1.0, True)]
    # An ask that only comes down to the order's own price does not fill it (it may be the order's own take).
    level = Book(bids=((99.0, 5.0),), asks=((100.0, 4.0),))
    episode = _episode("buy", 5, [(), ()], books=(BOOK, level, level))
    assert simulate(episode, [ChildOrder(step=0, price=100.0, size=5, tif=1)]).fills == [(2, 100.0, 4.0, True),
                                                                                        (2, 100.0, 1.0, True)]


def test_an_order_that_crossed_the_spread_gets_no_maker_fills_from_the_asks_it_crossed():
    """A buy of 16 at 102 takes 101 x 4 and 102 x 10 and rests 2 lots at 102; the replayed book still shows the
    4 at 101 (it cannot know the order took them): they fill nothing again, at the maker fee or otherwise."""
    quiet = _episode("buy", 16, [(), ()])
    assert simulate(quiet, [ChildOrder(step=0, price=102.0, size=16, tif=2)]).fills == [
        (0, 101.0, 4.0, True), (0, 102.0, 10.0, True), (2, 101.0, 2.0, True)]
    # Depth beyond what the book before showed is new: 6 at 101 where there were 4 fills the 2 resting lots.
    deeper = Book(bids=BOOK.bids, asks=((101.0, 6.0), (102.0, 10.0)))
    episode = _episode("buy", 16, [(), ()], books=(BOOK, deeper, deeper))
    assert simulate(episode, [ChildOrder(step=0, price=102.0, size=16, tif=2)]).fills[2:] == [(1, 102.0, 2.0, False)]


def test_fees_count_by_how_the_order_filled():
    quiet = _episode("buy", 4, [(), ()])
    taker = shortfall_bps(quiet, simulate(quiet, [ChildOrder(step=0, price=101.0, size=4, tif=1)]))
    assert taker == pytest.approx(_bps(4 * 0.5 + 404 * 5e-4, 4))
    hit = _episode("buy", 4, [(Trade(99.0, 4.0, "sell"),), ()])  # 4 sold below 100: they would have hit our bid
    maker = shortfall_bps(hit, simulate(hit, [ChildOrder(step=0, price=100.0, size=4, tif=1)]))
    assert maker == pytest.approx(_bps(4 * -0.5 + 400 * 1e-4, 4))


def test_market_order_beyond_the_displayed_depth_fills_at_the_deepest_level():
    episode = _episode("buy", 20, [(), ()])
    execution = simulate(episode, [])
    assert execution.fills == [(2, 101.0, 4.0, True), (2, 102.0, 10.0, True), (2, 102.0, 6.0, True)]


def test_baselines():
    episode = _episode("buy", 10, [(Trade(100.0, 7.0, "sell"),), ()])
    # TWAP: 5 at market at steps 0 and 1 (4 @ 101 + 1 @ 102 each).
    assert simulate(episode, twap(episode)).fills == [(0, 101.0, 4.0, True), (0, 102.0, 1.0, True),
                                                     (1, 101.0, 4.0, True), (1, 102.0, 1.0, True)]
    # Passive at the touch: the whole order at 100 behind 5 lots until the horizon.
    assert simulate(episode, passive_at_touch(episode)).fills[0] == (1, 100.0, 2.0, False)


def test_orders_share_the_liquidity_of_a_step():
    """Splitting an order does not make the book's liquidity count twice."""
    episode = _episode("buy", 5, [(), ()])
    one = simulate(episode, [ChildOrder(step=0, price=102.0, size=5, tif=1)])
    five = simulate(episode, [ChildOrder(step=0, price=102.0, size=1, tif=1) for _ in range(5)])
    assert one.fills == [(0, 101.0, 4.0, True), (0, 102.0, 1.0, True)]
    assert shortfall_bps(episode, five) == pytest.approx(shortfall_bps(episode, one))


def test_resting_fills_are_capped_by_what_traded_and_shared():
    # A 0.5-lot sale below the bid fills 0.5 of a 5-lot bid, not all of it.
    episode = _episode("buy", 5, [(Trade(99.0, 0.5, "sell"),), ()])
    assert simulate(episode, [ChildOrder(step=0, price=100.0, size=5, tif=1)]).fills[0] == (1, 100.0, 0.5, False)
    # Two bids at 100, each behind the 5 displayed: 6 sold at 100 serve the queue (5), then the first bid (1).
    episode = _episode("buy", 10, [(Trade(100.0, 6.0, "sell"),), ()])
    fills = simulate(episode, [ChildOrder(step=0, price=100.0, size=5, tif=1)] * 2).fills
    assert [f for f in fills if not f[3]] == [(1, 100.0, 1.0, False)]


def test_orders_of_ours_at_one_price_clear_the_queue_once():
    """The 5 displayed at 99 are the market's queue ahead of both bids: 7 sold at 99 clear it once, then fill the
    first bid and the second, as they fill one bid of 2. Split or not, the same schedule scores the same."""
    episode = _episode("buy", 2, [(Trade(99.0, 7.0, "sell"),), ()],
                       books=[Book(bids=((99.0, 5.0),), asks=((101.0, 4.0),))] * 3)
    one = simulate(episode, [ChildOrder(step=0, price=99.0, size=2, tif=2)])
    two = simulate(episode, [ChildOrder(step=0, price=99.0, size=1, tif=2)] * 2)
    assert one.fills == [(1, 99.0, 2.0, False)]
    assert two.fills == [(1, 99.0, 1.0, False), (1, 99.0, 1.0, False)]
    # A bid placed later, behind more of the queue (8 displayed then), waits for what is ahead of it only.
    books = [Book(bids=((99.0, 5.0),), asks=((101.0, 4.0),)), Book(bids=((99.0, 8.0),), asks=((101.0, 4.0),))] * 2
    episode = _episode("buy", 2, [(), (Trade(99.0, 7.0, "sell"),), (Trade(99.0, 2.0, "sell"),)], books=books)
    fills = simulate(episode, [ChildOrder(step=0, price=99.0, size=1, tif=3), ChildOrder(step=1, price=99.0, size=1,
                                                                                         tif=2)]).fills
    # Interval 2: 5 clear the queue ahead of both, 1 fills the first bid, 1 more of the second's queue (8) goes;
    # interval 3: the 2 left of its queue go, and it fills at the horizon's market order.
    assert [f for f in fills if not f[3]] == [(2, 99.0, 1.0, False)] and fills[-1] == (3, 101.0, 1.0, True)


def test_a_bid_beyond_the_displayed_levels_waits_behind_the_deepest_level_s_size():
    # The book shows bids down to 99 (x 10); a bid at 97 is behind an unseen queue taken as 10 deep: 12 sold at 97
    # fill it by 2 only (a trade at 98, above it, does not reach it).
    episode = _episode("buy", 10, [(Trade(98.0, 3.0, "sell"), Trade(97.0, 12.0, "sell")), ()])
    execution = simulate(episode, [ChildOrder(step=0, price=97.0, size=10, tif=2)])
    assert execution.fills[0] == (1, 97.0, 2.0, False)
    # The same for a sell above the deepest ask (102 x 10).
    episode = _episode("sell", 10, [(Trade(104.0, 11.0, "buy"),), ()])
    execution = simulate(episode, [ChildOrder(step=0, price=104.0, size=10, tif=2)])
    assert execution.fills[0] == (1, 104.0, 1.0, False)


def test_a_price_worked_out_in_ticks_meets_the_book_at_a_large_price():
    # At a price of 1e6 a float step is 1.2e-10: the best bid less one tick of 0.01 comes out a step below the
    # book's 1000000.06. It is that level all the same: it waits behind its 10 lots and gets 2 of the 12 sold there.
    book = Book(bids=((1000000.07, 5.0), (1000000.06, 10.0)), asks=((1000000.08, 4.0), (1000000.09, 10.0)))
    price = round(1000000.07 - 1 * 0.01, 10)
    assert price != 1000000.06
    episode = Episode(side="buy", quantity=10, tick=0.01, books=(book, book, book), taker_fee_bps=5.0,
                      maker_fee_bps=1.0, trades=((Trade(1000000.06, 12.0, "sell"),), ()))
    execution = simulate(episode, [ChildOrder(step=0, price=price, size=10, tif=2)])
    assert execution.fills[0] == (1, price, 2.0, False)



def test_orders_at_one_price_keep_their_places_at_a_large_price():
    """The first bid's price, worked out in ticks, is a float step below the second's, the book's 1000000.06: it is
    the same price, and the first bid placed keeps the place ahead of the second (the raw floats put it behind)."""
    book = Book(bids=((1000000.07, 5.0), (1000000.06, 10.0)), asks=((1000000.08, 4.0), (1000000.09, 10.0)))
    worked_out = round(1000000.07 - 1 * 0.01, 10)
    assert worked_out < 1000000.06
    episode = Episode(side="buy", quantity=2, tick=0.01, books=(book, book, book), taker_fee_bps=5.0,
                      maker_fee_bps=1.0, trades=((Trade(1000000.06, 11.0, "sell"),), ()))
    execution = simulate(episode, [ChildOrder(step=0, price=worked_out, size=1, tif=1),
                                   ChildOrder(step=0, price=1000000.06, size=1, tif=1)])
    assert execution.fills == [(1, worked_out, 1.0, False), (2, 1000000.08, 1.0, True)]


def test_prices_off_the_tick_grid_keep_their_order():
    """A tick of 0.02 where the data also shows 100.01 (its tick a multiple of the real one): 100.01 is a better bid
    than 100.00, not the same grid point."""
    book = Book(bids=((100.0, 5.0), (99.98, 10.0)), asks=((100.04, 4.0), (100.06, 10.0)))
    episode = Episode(side="buy", quantity=2, tick=0.02, books=(book,) * 3, taker_fee_bps=5.0, maker_fee_bps=1.0,
                      trades=((Trade(99.99, 1.0, "sell"),), ()))
    execution = simulate(episode, [ChildOrder(step=0, price=100.0, size=1, tif=1),
                                   ChildOrder(step=0, price=100.01, size=1, tif=1)])
    assert execution.fills == [(1, 100.01, 1.0, False), (2, 100.04, 1.0, True)]


def test_off_grid_prices_a_float_step_apart_are_one_price_too():
    """Off the grid (tick 0.02, prices in cents) at 1e6, a price worked out in ticks is a float step below the
    same price given otherwise: the first placed keeps its place."""
    worked_out = round(1000000.07 - 3 * 0.02, 10)
    assert worked_out != 1000000.01
    book = Book(bids=((1000000.07, 5.0), (1000000.01, 10.0)), asks=((1000000.09, 4.0), (1000000.11, 10.0)))
    episode = Episode(side="buy", quantity=2, tick=0.02, books=(book,) * 3, taker_fee_bps=5.0, maker_fee_bps=1.0,
                      trades=((Trade(1000000.01, 11.0, "sell"),), ()))
    execution = simulate(episode, [ChildOrder(step=0, price=worked_out, size=1, tif=1),
                                   ChildOrder(step=0, price=1000000.01, size=1, tif=1)])
    assert execution.fills == [(1, worked_out, 1.0, False), (2, 1000000.09, 1.0, True)]


def test_a_better_price_is_served_before_an_earlier_order():
    # Bids at 99 (placed first) and 100: the one lot sold at 98 would have hit the 100 bid first.
    episode = _episode("buy", 2, [(Trade(98.0, 1.0, "sell"),), ()])
    execution = simulate(episode, [ChildOrder(step=0, price=99.0, size=1, tif=1),
                                   ChildOrder(step=0, price=100.0, size=1, tif=1)])
    assert execution.fills == [(1, 100.0, 1.0, False), (2, 101.0, 1.0, True)]


def test_an_order_rests_for_tif_intervals_after_it_is_placed():
    # Placed at step 0, tif=1 rests through interval 1 only: the sale in interval 2 comes after it is cancelled.
    episode = _episode("buy", 1, [(), (Trade(99.0, 3.0, "sell"),), ()], books=(BOOK,) * 4)
    assert simulate(episode, [ChildOrder(step=0, price=100.0, size=1, tif=1)]).fills == [(3, 101.0, 1, True)]
    assert simulate(episode, [ChildOrder(step=0, price=100.0, size=1, tif=2)]).fills == [(2, 100.0, 1.0, False)]


def test_the_queue_ahead_shrinks_across_intervals():
    # Behind 5 lots at 100: 3 sold there in interval 1 leave 2 ahead; of the 3 in interval 2, the third is ours.
    episode = _episode("buy", 1, [(Trade(100.0, 3.0, "sell"),), (Trade(100.0, 3.0, "sell"),)])
    assert simulate(episode, [ChildOrder(step=0, price=100.0, size=1, tif=2)]).fills == [(2, 100.0, 1.0, False)]


def test_a_trade_through_the_price_clears_the_queue_ahead():
    # Behind 5 lots at 100: a sale of 2 at 99, through our price, took the 5 ahead first (price priority), and
    # fills our 2; the 3 sold at 100 in interval 2 are then ours too. The other 5 go at market at the horizon.
    episode = _episode("buy", 10, [(Trade(99.0, 2.0, "sell"),), (Trade(100.0, 3.0, "sell"),)])
    execution = simulate(episode, [ChildOrder(step=0, price=100.0, size=10, tif=2)])
    assert execution.fills == [(1, 100.0, 2.0, False), (2, 100.0, 3.0, False), (2, 101.0, 4.0, True),
                               (2, 102.0, 1.0, True)]
    # So does a book that moved through it: an ask of 1 at 99 in interval 1 fills 1 and clears the queue.
    lower = Book(bids=((98.0, 5.0),), asks=((99.0, 1.0), (101.0, 4.0), (102.0, 10.0)))
    episode = _episode("buy", 10, [(), (Trade(100.0, 3.0, "sell"),)], books=(BOOK, lower, BOOK))
    execution = simulate(episode, [ChildOrder(step=0, price=100.0, size=10, tif=2)])
    assert execution.fills[:2] == [(1, 100.0, 1.0, False), (2, 100.0, 3.0, False)], execution.fills
