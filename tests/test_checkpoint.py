"""The embedded default checkpoint: builds, is reproducible, loads with transformers."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from llava_triton import checkpoint
from llava_triton.checkpoint import STAMP_FILE, build_checkpoint, load_preset
from llava_triton.preset_tokenizers import write_tokenizer
from llava_triton.spec import IMAGE_TOKEN, ModelSpec
from llava_triton.testing.reference import hf_generate, make_test_images, preset_checkpoint, tiny_checkpoint

TINY_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "preprocessor_config.json", "processor_config.json", STAMP_FILE)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    """A second, independent build of the tiny preset."""
    return build_checkpoint("tiny", tmp_path_factory.mktemp("build") / "tiny", force=True, log=lambda m: None)


def test_tiny_has_the_hf_files(tiny):
    for name in TINY_FILES:
        assert (tiny / name).is_file(), name
    assert not list(tiny.parent.glob(f".{tiny.name}.*")), "staging directory left behind"


def test_tiny_preset_values(tiny):
    spec = ModelSpec.from_pretrained(tiny)
    assert (spec.image_size, spec.patch_size, spec.num_image_tokens) == (336, 14, 576)
    assert (spec.vision_feature_layer, spec.vision_feature_select_strategy) == (-2, "default")
    assert (spec.vision_hidden_size, spec.text_hidden_size) == (64, 128)
    assert (spec.vocab_size, spec.image_token_index, spec.eos_token_id) == (1024, 1000, (2,))
    assert (spec.max_position_embeddings, spec.torch_dtype) == (4096, "float32")
    generation = json.loads((tiny / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 3)


def test_build_is_deterministic(tiny, rebuilt):
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (rebuilt / name).read_bytes() == (tiny / name).read_bytes(), name


def test_build_skipped_when_stamp_matches_and_redone_when_not(rebuilt):
    messages = []
    mtime = (rebuilt / "model.safetensors").stat().st_mtime_ns
    build_checkpoint("tiny", rebuilt, log=messages.append)
    assert "skipping" in messages[-1]
    assert (rebuilt / "model.safetensors").stat().st_mtime_ns == mtime

    stamp = json.loads((rebuilt / STAMP_FILE).read_text())
    (rebuilt / STAMP_FILE).write_text(json.dumps({**stamp, "hash": "stale"}))
    messages.clear()
    build_checkpoint("tiny", rebuilt, log=messages.append)
    assert not any("skipping" in m for m in messages)
    assert json.loads((rebuilt / STAMP_FILE).read_text()) == stamp


def test_model_loads_with_transformers(tiny):
    model, info = LlavaForConditionalGeneration.from_pretrained(tiny, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    config = model.config
    assert config.image_token_index == 1000
    assert (config.text_config.num_attention_heads, config.text_config.num_key_value_heads) == (4, 2)
    assert model.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_processor_loads_with_the_pil_image_processor(tiny):
    for processor in (LlavaProcessor.from_pretrained(tiny), AutoProcessor.from_pretrained(tiny)):
        assert type(processor).__name__ == "LlavaProcessor"
        assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
        assert processor.image_token_id == 1000
        assert (processor.patch_size, processor.num_additional_image_tokens) == (14, 1)
        tokenizer = processor.tokenizer
        assert len(tokenizer) == 1024
        assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == 1000
        assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
            0, 1, 2, 3)
        crop = processor.image_processor.crop_size
        assert (crop["height"], crop["width"], processor.image_processor.size["shortest_edge"]) == (336, 336, 336)


def test_chat_template_is_llava_1_5(tiny):
    processor = LlavaProcessor.from_pretrained(tiny)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "USER: <image>\nWhat is this? ASSISTANT:")
    ids = processor(text="USER: hi ASSISTANT:")["input_ids"][0]
    assert ids[0] == 1 and 1000 not in ids


def test_tokenizer_roundtrips_text_and_decodes_every_id(tiny):
    tokenizer = LlavaProcessor.from_pretrained(tiny).tokenizer
    text = "A red square and 3 blue circles, près de la fenêtre. 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer("What is in this image?", add_special_tokens=False)["input_ids"]) <= 8  # BPE merges learnt
    # Every id the model can emit decodes (placeholders fill the vocab up to vocab_size).
    assert all(tokenizer.convert_ids_to_tokens(i) is not None for i in range(1024))


@pytest.fixture(scope="module")
def sentencepiece() -> Path:
    return preset_checkpoint("tiny-sentencepiece")


def test_sentencepiece_preset_has_llava_hf_tokenizer_files(sentencepiece):
    """The files and pipeline of llava-hf/llava-1.5-7b-hf's tokenizer (see preset_tokenizers)."""
    config = json.loads((sentencepiece / "tokenizer_config.json").read_text())
    assert (config["tokenizer_class"], config["legacy"], config["add_bos_token"], config["add_eos_token"]) == (
        "LlamaTokenizer", False, True, False)
    assert [config["added_tokens_decoder"][i]["content"] for i in ("0", "1", "2", "1000", "1001")] == [
        "<unk>", "<s>", "</s>", IMAGE_TOKEN, "<pad>"]
    tokenizer_json = json.loads((sentencepiece / "tokenizer.json").read_text())
    model = tokenizer_json["model"]
    assert ((model["type"], model["byte_fallback"], model["fuse_unk"], model["unk_token"])
            == ("BPE", True, True, "<unk>"))
    assert [model["vocab"][f"<0x{b:02X}>"] for b in range(256)] == list(range(3, 259))
    assert [n["type"] for n in tokenizer_json["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert tokenizer_json["pre_tokenizer"] is None
    assert [d["type"] for d in tokenizer_json["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    assert (sentencepiece / "chat_template.json").is_file() and (sentencepiece / "special_tokens_map.json").is_file()
    generation = json.loads((sentencepiece / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 1001)


def test_sentencepiece_tokenizer_as_transformers_loads_it(sentencepiece):
    tokenizer = LlavaProcessor.from_pretrained(sentencepiece).tokenizer
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("USER: <image>\nWhat is 世界?")["input_ids"])
    assert tokens[:6] == ["<s>", "▁USER:", "▁", IMAGE_TOKEN, "▁", "<0x0A>"]  # a ▁ after <image>, as llava-hf's
    assert {"<0xE4>", "<0xB8>", "<0x96>"} <= set(tokens)  # byte fallback
    text = "A red square and 3 blue circles, près de la fenêtre. 🙂"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # The model's ids past the tokenizer's 1002 decode to nothing, as llava-hf's 32002..32063 do.
    assert len(tokenizer) == 1002 and tokenizer.decode(list(range(1002, 1024))) == ""
    first = hf_generate(sentencepiece, [make_test_images()["jpeg"]], "What is in this image?", max_new_tokens=12)
    assert len(first) == 12 and len(set(first)) > 3


def test_generation_is_not_degenerate(tiny):
    images = make_test_images()
    first = hf_generate(tiny, [images["jpeg"]], "What is in this image?", max_new_tokens=12)
    second = hf_generate(tiny, [images["webp"]], "What is in this image?", max_new_tokens=12)
    assert len(first) == 12 and len(set(first)) > 3
    assert first != second  # the image matters


def test_7b_preset_is_llava_1_5_7b():
    preset = load_preset("llava-1.5-7b")
    spec = ModelSpec.from_hf_config(preset["config"])
    assert (spec.image_size, spec.patch_size, spec.num_image_tokens, spec.vision_hidden_size) == (336, 14, 576, 1024)
    assert (spec.text_hidden_size, spec.vocab_size, spec.image_token_index) == (4096, 32064, 32000)
    assert (spec.vision_feature_layer, spec.max_position_embeddings, spec.torch_dtype) == (-2, 4096, "float16")
    config = LlavaConfig(**json.loads(json.dumps(preset["config"])))
    text, vision = config.text_config, config.vision_config
    assert (text.intermediate_size, text.num_hidden_layers, text.num_attention_heads) == (11008, 32, 32)
    assert (vision.num_hidden_layers, vision.intermediate_size, vision.num_attention_heads) == (24, 4096, 16)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    # The parameter count of llava-hf/llava-1.5-7b-hf.
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072


def test_7b_preset_tokenizer_is_laid_out_as_llava_1_5s(tmp_path):
    """<image> at 32000 and <pad> at 32001 after the trained vocabulary; the model's 32064 ids are
    more than the tokenizer's 32002, as in llava-hf/llava-1.5-7b-hf."""
    for preset in ("llava-1.5-7b", "tiny-sentencepiece"):
        write_tokenizer(load_preset(preset), tmp_path / preset)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llava-1.5-7b")
    assert tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, "<pad>"]) == [32000, 32001]
    assert len(tokenizer) == 32002
    tiny = AutoTokenizer.from_pretrained(tmp_path / "tiny-sentencepiece")
    text = "USER: What is in this image? ASSISTANT:"
    assert tokenizer(text)["input_ids"] == tiny(text)["input_ids"]  # the same trained BPE


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        checkpoint.main(["--help"])
    assert exit_info.value.code == 0
    assert "--preset" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        checkpoint.main(["--preset", "no-such-preset"])
    with pytest.raises(ValueError, match="unknown preset"):
        build_checkpoint("no-such-preset", tmp_path / "x")
