"""The data pipeline: reading corpora (`corpus.py`), tokenizers (`tokenizer.py`), `normtron prepare-data`
(`prepare.py`), the prepared directory (`format.py`), the training-time reader (`batches.py`), Megatron indexed
datasets (`indexed.py`), and a run's sources and their weighted mixture (`mixture.py`)."""
