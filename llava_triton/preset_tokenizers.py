"""Tokenizers of the embedded presets, trained on presets/corpus.txt in the styles real checkpoints ship.

A preset's `tokenizer.style` picks one:

- `byte_level`: a GPT-2-style byte-level BPE (every byte is a symbol, `Ġ` marks a space), saved as
  transformers 5 saves a `TokenizersBackend`. Special tokens at ids 0..3 (`<unk> <s> </s> <pad>`).
- `sentencepiece`: the Llama/SentencePiece BPE that llava-hf's LLaVA-1.5 checkpoints ship
  (`llava-hf/llava-1.5-7b-hf`): `<unk> <s> </s>` at ids 0..2, the byte-fallback tokens
  `<0x00>`..`<0xFF>` at 3..258, `▁` for a space, a normalizer that prepends `▁` to every piece of
  text between special tokens (so `<image>\\nWhat` has a `▁` after `<image>`), a decoder that fuses
  runs of byte tokens into UTF-8 (each byte of a run that is not valid UTF-8 becomes U+FFFD) and
  strips the leading space, and the files in the transformers 4 layout those checkpoints have:
  `tokenizer_config.json` with `tokenizer_class: LlamaTokenizer`, `legacy: false`,
  `add_bos_token: true`, `special_tokens_map.json`, and the chat template in `chat_template.json`.
  `<image>` and `<pad>` follow the trained vocabulary at the config's ids (32000 and 32001 in
  LLaVA-1.5); as there, the model's vocabulary may be larger than the tokenizer's, and the ids
  past the tokenizer's decode to nothing.

Both place `<image>` at the config's `image_token_index`; ids between the trained vocabulary and
it are placeholder tokens with no merges, so no text encodes to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llava_triton.spec import IMAGE_TOKEN, VIDEO_TOKEN

PRESETS_DIR = Path(__file__).parent / "presets"
CORPUS_FILE = PRESETS_DIR / "corpus.txt"
STYLES = ("byte_level", "sentencepiece")

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
PLACEHOLDER = "<unused{}>"
SPIECE_UNDERLINE = "\u2581"  # ▁, SentencePiece's word boundary
BYTE_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))

# LLaVA-1.5's conversation format as llava-hf renders it ("USER: <image>\nWhat is this? ASSISTANT:"),
# except that content items are rendered in the order given: llava-hf's template moves every image
# to the front of the message; this one keeps an image where the user placed it. For the usual
# message (images first, then text) both give the same string.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{%- elif item['type'] == 'video' -%}{{ '" + VIDEO_TOKEN + "\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] + ' ' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


# Mistral's instruction format as llava-hf/llava-v1.6-mistral-7b-hf uses it ("[INST] <image>\nWhat is this? [/INST]"),
# content items in the order given (as CHAT_TEMPLATE), an answer closed by EOS, a system message before the rest.
MISTRAL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST] ' }}{%- elif message['role'] == 'assistant' -%}{{ ' ' }}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '" + IMAGE_TOKEN + "\n' }}"
    "{%- elif item['type'] == 'video' -%}{{ '" + VIDEO_TOKEN + "\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- if not loop.last -%}{{ ' ' }}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ ' [/INST]' }}{%- elif message['role'] == 'assistant' -%}{{ '</s>' }}"
    "{%- else -%}{{ '\n\n' }}{%- endif -%}"
    "{%- endfor -%}"
)
# A preset's `tokenizer.chat_template` picks one.
CHAT_TEMPLATES = {"llava": CHAT_TEMPLATE, "mistral": MISTRAL_CHAT_TEMPLATE}


def chat_template(preset: dict[str, Any]) -> str:
    name = preset["tokenizer"].get("chat_template", "llava")
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat_template {name!r}; one of {', '.join(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]


def write_tokenizer(preset: dict[str, Any], directory: Path, processor_class: str = "LlavaProcessor") -> None:
    """Write the preset's tokenizer files and chat template into `directory`."""
    style = preset["tokenizer"].get("style", "byte_level")
    if style == "byte_level":
        _byte_level(preset).save_pretrained(directory)
    elif style == "sentencepiece":
        _write_sentencepiece(preset, Path(directory), processor_class)
    else:
        raise ValueError(f"unknown tokenizer style {style!r}; one of {', '.join(STYLES)}")


def _sizes(preset: dict[str, Any]) -> tuple[int, int, int]:
    """(trained vocabulary size, image_token_index, the model's vocab_size), checked."""
    config = preset["config"]
    trained = int(preset["tokenizer"]["bpe_vocab_size"])
    image_token_index = int(config["image_token_index"])
    vocab_size = int(config["text_config"]["vocab_size"])
    for name, token_id in _media_tokens(preset).items():
        if trained > token_id:
            raise ValueError(f"bpe_vocab_size {trained} must not exceed the id of {name}, {token_id}")
        if token_id >= vocab_size:
            raise ValueError(f"{name}'s id {token_id} must be below vocab_size {vocab_size}")
    return trained, image_token_index, vocab_size


def _media_tokens(preset: dict[str, Any]) -> dict[str, int]:
    """`<image>` (and LLaVA-NeXT-Video's `<video>`) with the ids the config gives them."""
    config = preset["config"]
    tokens = {IMAGE_TOKEN: int(config["image_token_index"])}
    if "video_token_index" in config:
        tokens[VIDEO_TOKEN] = int(config["video_token_index"])
    return tokens


def _corpus() -> list[str]:
    return CORPUS_FILE.read_text().splitlines()


def _added(tokens: list[str]):
    from tokenizers import AddedToken

    return [AddedToken(token, special=True, normalized=False) for token in tokens]


def _byte_level(preset: dict[str, Any]):
    """A byte-level BPE padded to the model's vocab_size, as a transformers `TokenizersBackend`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import TokenizersBackend

    config = preset["config"]
    bpe_vocab_size, image_token_index, vocab_size = _sizes(preset)
    special = [UNK, BOS, EOS, PAD]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, min_frequency=int(preset["tokenizer"].get("min_frequency", 2)),
        special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    trained.train_from_iterator(_corpus(), trainer)
    vocab, merges = _vocab_and_merges(trained)
    if [vocab[t] for t in special] != list(range(len(special))):
        raise RuntimeError("BPE training did not put the special tokens at ids 0..3")

    # Every id the model can emit decodes: placeholders up to vocab_size.
    media = _media_tokens(preset)
    _pad_vocabulary(vocab, {token_id: name for name, token_id in media.items()}, vocab_size)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(_added([*special, *media]))  # they keep their vocabulary ids
    # Llama prepends BOS to every encoded text; the chat template therefore does not write it.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, special.index(BOS))])
    if any(tokenizer.token_to_id(name) != token_id for name, token_id in media.items()) \
            or tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError("padded tokenizer does not match the config's image_token_index / vocab_size")
    return TokenizersBackend(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN, **({"video_token": VIDEO_TOKEN} if VIDEO_TOKEN in media
                                                             else {})},
        model_max_length=int(config["text_config"]["max_position_embeddings"]), chat_template=chat_template(preset))


def _vocab_and_merges(trained) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model_json = json.loads(trained.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    return dict(model_json["vocab"]), merges


def _pad_vocabulary(vocab: dict[str, int], named: dict[int, str], size: int) -> None:
    """Fill ids len(vocab)..size-1: the `named` tokens at their ids, placeholders elsewhere."""
    trained_size = len(vocab)
    for token_id in range(trained_size, size):
        vocab[named.get(token_id, PLACEHOLDER.format(token_id - trained_size))] = token_id


def _write_sentencepiece(preset: dict[str, Any], directory: Path, processor_class: str) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    config = preset["config"]
    bpe_vocab_size, image_token_index, _ = _sizes(preset)
    pad_token_id = int(config["pad_token_id"])
    media = _media_tokens(preset)
    if pad_token_id <= max(media.values()):
        raise ValueError(f"pad_token_id {pad_token_id} must follow {' and '.join(media)} "
                         "(`<pad>` is added after them, as in llava-hf's tokenizers)")
    special = [UNK, BOS, EOS]

    # Training splits at spaces (SentencePiece's split_by_whitespace), so no merge crosses a word
    # boundary; the saved tokenizer then needs no pre-tokenizer, as Llama's tokenizer.json has none.
    normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_UNDERLINE),
                                       normalizers.Replace(" ", SPIECE_UNDERLINE)])
    trained = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    trained.normalizer = normalizer
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, min_frequency=int(preset["tokenizer"].get("min_frequency", 2)),
        special_tokens=[*special, *BYTE_TOKENS], show_progress=False)
    trained.train_from_iterator(_corpus(), trainer)
    vocab, merges = _vocab_and_merges(trained)
    if [vocab.get(t) for t in (*special, *BYTE_TOKENS)] != list(range(len(special) + len(BYTE_TOKENS))):
        raise RuntimeError("BPE training did not put <unk> <s> </s> and the byte tokens at ids 0..258")
    _pad_vocabulary(vocab, {**{token_id: name for name, token_id in media.items()}, pad_token_id: PAD},
                    pad_token_id + 1)

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 1)])
    tokenizer.add_special_tokens(_added([*special, *media, PAD]))
    if any(tokenizer.token_to_id(name) != token_id for name, token_id in media.items()) \
            or tokenizer.token_to_id(PAD) != pad_token_id:
        raise RuntimeError("padded tokenizer does not match the config's image_token_index / pad_token_id")

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))

    def entry(token: str) -> dict[str, Any]:
        return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    added = {str(vocab[t]): {**entry(t), "special": True} for t in (*special, *media, PAD)}
    write_json(directory / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": None, "added_tokens_decoder": added,
        "bos_token": BOS, "clean_up_tokenization_spaces": False, "eos_token": EOS, "legacy": False,
        "model_max_length": int(config["text_config"]["max_position_embeddings"]), "pad_token": PAD,
        "padding_side": "left", "processor_class": processor_class, "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "trust_remote_code": False, "unk_token": UNK,
        "use_default_system_prompt": False})
    write_json(directory / "special_tokens_map.json", {
        "bos_token": entry(BOS), "eos_token": entry(EOS), "pad_token": entry(PAD), "unk_token": entry(UNK)})
    write_json(directory / "chat_template.json", {"chat_template": chat_template(preset)})


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
