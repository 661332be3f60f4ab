"""Training: the loss, StableAdamW and schedule, the jitted train step, the train state
(fresh or restored), cached encoder features, metric writers, and the train loop.

May import: evaluation (the loop evaluates), and everything below it. Never inference/.
"""
