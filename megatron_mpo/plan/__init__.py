"""Run planning: whether a config's layout fits the GPUs, how long a step and an epoch
take, and which layouts fit (``python -m megatron_mpo.plan``).

params (parameters per rank) -> activations (one micro-batch's saved tensors) -> memory
(per rank and stage) -> timing (the trainer's FLOP count at an assumed MFU) -> run (a
config and the hardware to a plan) -> layouts (what else fits) -> report / cli.
"""
