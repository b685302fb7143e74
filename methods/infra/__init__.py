"""Model infrastructure the editing methods stand on (none of it is an editing method):

  models.py       loading a model (the embedded SmolLM2, a local folder, the Hub) with its fingerprint
  arch.py         the architecture table: where the blocks, MLPs and edited matrices of each model type live
  hooks.py        forward hooks that read or replace a module's input/output
  tokens.py       token batches: padding, subject/last-token positions
  kv_cache.py     the key/value cache argument of each model's forward
  cpu_linear.py   oneDNN linear products on CPU; linear_plan.py measures which backend wins per shape
  memory.py       peak memory (RSS or CUDA) measurement
  cache.py        the content-keyed file cache shared by trials and nodes
"""
