"""titan-plan: will a model and layout fit, and how fast will it run, before the GPUs are rented.

Memory comes from :mod:`titan_core.plan.probe` (titan's own step on fake tensors at the target
world size); time from :mod:`titan_core.plan.cost` (named, sourced device constants).
"""
