"""The work of each stage, per shard: plain functions (Prefect lives in pipelines/)."""
