"""Preference data from your own model, and held-out evaluation from the same machinery.

The paper's pair construction (arXiv 2411.10442, InternVL's ``mm_reasoning_pipeline``):

- ``questions``: question sets (MMPR-style meta.json with ``answer`` and a ``scoring`` mode)
- ``prompts``: InternVL's reasoning instruction on top of the training prompt rule
- ``engines``: existing generation engines behind one interface (transformers, vLLM)
- ``model_source``: the HF directory an engine loads (a Megatron checkpoint is exported)
- ``scoring``: final-answer extraction and the scorers (math-verify, VQA, option letters,
  relaxed numeric, ANLS)
- ``sampler``: rank-split, resumable sampling runs
- ``pairs``: correctness and Dropout NTP pairs in MMPR format, and the counts
- ``evaluation``: answer accuracy and reward-margin preference accuracy
- ``cli``: the command lines behind ``megatron-mpo sample`` / ``megatron-mpo pairs``

It sits above ``data`` (templates, tiling, meta files) and ``conversion`` (export); nothing
below it imports it.
"""
