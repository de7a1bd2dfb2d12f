"""Hugging Face format: parameter names and configs (`mapping.py`), the tokenizer files (`tokenizer.py`), and the
custom architecture written into converted folders for placements Llama cannot express (`remote_config.py`,
`remote_model.py`, assembled by `codegen.py`). `trainer/convert/` drives them."""
