"""Checkpoints that restore everything (``store``) and exports that plain ``transformers`` / ``peft`` load (``export``)."""
