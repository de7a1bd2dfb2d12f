"""The data pipeline: reading corpora (`corpus.py`), tokenizers (`tokenizer.py`), `normtron prepare-data`
(`prepare.py`), and the training-time reader (`batches.py`)."""
