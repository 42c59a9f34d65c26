"""The work of each stage, pure over one shard and testable without Prefect.

Top level: the stage contract (``stage.py``), the one configuration (``config``), where
shards run (``devices.py``, ``ray_actors.py``). One subpackage per family of stages:
``download/``, ``captions/``, ``annotate/`` (phrases, boxes, vqa), ``shards.py``,
``train/``, ``evaluate/``; ``demo/`` holds what only the demo, tests and benchmarks use.
"""
