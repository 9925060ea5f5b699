"""Raw text → token shards → training batches: sources.py, prepare.py (`gptmini prepare`), loader.py."""
