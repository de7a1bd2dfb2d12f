"""The tokenizer files of a converted folder, so `AutoTokenizer.from_pretrained(folder)` encodes exactly like the
tokenizer the model was trained with: a Hugging Face tokenizer.json is carried over as it is; a sentencepiece model
is copied and also converted into a `tokenizer.json` that encodes exactly like it (no sentencepiece needed)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path


def write_hf_tokenizer(tok, out_dir: Path, max_length: int) -> None:
    """The tokenizer files for `tok` (`trainer.data.tokenizer.load_tokenizer` of a checkpoint's tokenizer) in
    `out_dir`."""
    if tok.kind == "sentencepiece":
        (out_dir / "tokenizer.model").write_bytes(tok.model_bytes)
        _write_sentencepiece(out_dir / "tokenizer.model", out_dir, max_length)
        return
    (out_dir / "tokenizer.json").write_bytes(tok.json_bytes)
    # The generic fast class runs tokenizer.json as it is (its post-processor adds BOS where it did in training).
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "clean_up_tokenization_spaces": False, "model_max_length": max_length}, indent=2) + "\n")


def special_token_ids(tok) -> tuple[int | None, int | None]:
    """(bos, eos) ids for config.json and generation_config.json: those the tokenizer frames documents with."""
    bos = tok.bos_id
    if bos is None and getattr(tok, "bos_token", None) is not None:  # named in tokenizer_config.json, not added
        bos = tok.tokenizer.token_to_id(tok.bos_token)
    return bos, tok.eos_id


def _write_sentencepiece(sp_model: Path, out_dir: Path, max_length: int) -> None:
    import sentencepiece as spm
    from tokenizers import normalizers, processors
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    bos, eos, unk = (sp.id_to_piece(i) for i in (sp.bos_id(), sp.eos_id(), sp.unk_id()))

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
