"""The tokenizer files of a converted folder: the sentencepiece model plus a `tokenizer.json` that encodes exactly
like it, so `AutoTokenizer.from_pretrained(folder)` works without sentencepiece installed."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path


def write_hf_tokenizer(sp_model: Path, out_dir: Path, max_length: int) -> None:
    import sentencepiece as spm
    from tokenizers import normalizers, processors
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    bos, eos, unk = (sp.id_to_piece(i) for i in (sp.bos_id(), sp.eos_id(), sp.unk_id()))

    shutil.copy2(sp_model, out_dir / "tokenizer.model")
    with tempfile.TemporaryDirectory() as tmp:  # Hugging Face's own sentencepiece -> tokenizers conversion
        shutil.copy2(sp_model, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
        converted = AutoTokenizer.from_pretrained(tmp)
        backend = converted.backend_tokenizer
    # sentencepiece prepends "▁" to every text, even one starting with a space; Metaspace(prepend_scheme="first")
    # does not, so " a" would encode differently. These two normalizers are sentencepiece's behaviour.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    # BOS first, as normtron's data has it (`prepare-data` writes BOS ids EOS per document).
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                           special_tokens=[(bos, sp.bos_id())])
    backend.save(str(out_dir / "tokenizer.json"))
    # The generic fast class: LlamaTokenizer would rebuild the normalizers above from its own defaults.
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "unk_token": unk,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_length}, indent=2) + "\n")
