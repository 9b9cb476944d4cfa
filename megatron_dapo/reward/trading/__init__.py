"""Crypto limit-order execution as a DAPO task: market data, an order-book simulator, the reward."""
