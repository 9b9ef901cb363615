"""Training data: corpora and prepared token sources, deterministic resumable sampling, loaders.

  module.py    DataModule: the training and validation sets of the `data` section and loaders
  corpus.py    the `dataset` corpora: stdlib / text_dir bytes (or the run's BPE), a `bin` file
  mixture.py   `data.sources`: a weighted mixture of prepared folders and Megatron prefixes
  prepare.py   `deepseek-moe data prepare`: text and JSONL / parquet into a dataset folder
  indexed.py   Megatron-LM's indexed dataset format, read and written
  sampling.py  which sample ids each process reads at each step
  errors.py    DataError

Import from the modules: this package imports nothing itself, so `data prepare` (numpy and
tokenizers) runs, and forks its workers, without torch.
"""
