"""Model loading and surgery: load by task (``loading``), find the block stack (``blocks``), replace the
head and freeze by depth (``surgery``), and the fixed preparation order (``prepare``).

Kept import-free so that ``engine.models.loading`` (used by ``shoulders validate``) does not pull in torch.
"""
