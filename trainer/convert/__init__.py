"""`normtron convert`: training checkpoints to Hugging Face folders and back.

to-hf reads only the `model.*` tensors of a DCP checkpoint, by key, without a process group, so any layout that
saved through `get_state_dict` (one process, DDP, FSDP2) converts alike. Tensors stream one output shard at a time:
memory holds one shard, never the whole model twice. from-hf reads safetensors tensor by tensor into a DCP
checkpoint that `checkpoint.init_from` starts a run from. Outputs are written under a temporary name and renamed
into place at the end, so a failed conversion leaves nothing behind.

Modules: `checkpoints.py` reads training checkpoints (finding one, its config, its model tensors by name);
`to_hf.py`, `from_hf.py` and `consolidate.py` are the three directions; `output.py` holds what they share (the
all-or-nothing output directory, the tokenizer check); `hf/` is the Hugging Face side (names, configs, tokenizer
files, the generated model code).
"""
