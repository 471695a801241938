"""Evaluation: metrics per task (``metrics``), ASR decoding (``asr``), greedy answers to prompts (``answers``), evaluating an exported folder (``exported``)."""
