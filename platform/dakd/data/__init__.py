"""Data: readers (records), the Parquet shard format, transforms and the balancing factor."""
