"""Estimators from sample files: per-prompt scores, bounds and rankings, in nats.

``topk`` (Monte Carlo KL terms, the top-k tail-bucket lower bounds, the legacy heuristic),
``ranking`` (scores per prompt with bootstrap CIs, the ranking and its JSON contract),
``contributions`` (each token's share of a prompt's score, for token views).
"""
