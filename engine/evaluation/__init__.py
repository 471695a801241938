"""Evaluation: metrics per task (``metrics``), ASR decoding (``asr``), greedy generation (``generation``), evaluating an exported folder (``exported``)."""
