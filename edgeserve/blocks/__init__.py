"""Task packs: a task is a base model plus block-sparse changed blocks (pack.py), built by
build.py, held in the pool as task_block units (arena.py) and applied per batch row
(delta.py)."""
