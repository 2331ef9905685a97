"""Prompt ids equal the Hugging Face processor's with each tokenizer style, loaded from the files
export copies (no server); export refuses a copy that tokenizes differently."""

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from export.processor_check import PROBE_PROMPTS, ProcessorMismatchError, check_prompt_ids
from llava_triton.preprocess import Preprocessor
from llava_triton.processor import copy_processor_files
from llava_triton.spec import IMAGE_TOKEN, ModelSpec, ServingConfig
from llava_triton.testing.reference import (
    IMAGES_FOR_PROMPTS,
    TOKENIZER_PRESETS,
    TOKENIZER_PROMPTS,
    hf_inputs,
    preset_checkpoint,
)


@pytest.fixture(scope="module", params=TOKENIZER_PRESETS)
def exported(request, tmp_path_factory):
    """(checkpoint, the processor files as export copies them)."""
    checkpoint = preset_checkpoint(request.param)
    processor_dir = tmp_path_factory.mktemp(request.param) / "processor"
    copy_processor_files(checkpoint, processor_dir)
    return checkpoint, processor_dir


@pytest.fixture(scope="module")
def served(exported):
    checkpoint, processor_dir = exported
    return Preprocessor.from_pretrained(processor_dir, ModelSpec.from_pretrained(checkpoint), ServingConfig())


@pytest.mark.parametrize("case", list(TOKENIZER_PROMPTS))
def test_prompt_ids_equal_the_processors(exported, served, case):
    checkpoint, _ = exported
    prompt, num_images = TOKENIZER_PROMPTS[case]
    images = IMAGES_FOR_PROMPTS[:num_images]
    input_ids = served(images, prompt)[0]
    expected, _ = hf_inputs(checkpoint, images, prompt)
    np.testing.assert_array_equal(input_ids, expected)


def test_without_config_json_transformers_builds_another_llama_pipeline(tmp_path):
    """Why export copies config.json: for model type `llava` transformers takes tokenizer.json as it
    is; from the tokenizer files alone, `tokenizer_class: LlamaTokenizer` rebuilds the pipeline and
    the `▁` after `<image>` is lost. If this stops failing over, the copy is still right."""
    checkpoint = preset_checkpoint("tiny-sentencepiece")
    copy_processor_files(checkpoint, tmp_path)
    (tmp_path / "config.json").unlink()
    text = f"USER: {IMAGE_TOKEN}\nWhat is this? ASSISTANT:"
    with_config = AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"]
    without = AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"]
    assert len(without) == len(with_config) - 1


def test_export_check_passes_for_each_style(exported):
    checkpoint, processor_dir = exported
    assert check_prompt_ids(checkpoint, processor_dir, ModelSpec.from_pretrained(checkpoint), ServingConfig()) == len(
        PROBE_PROMPTS)


def test_export_check_ignores_the_request_limits(exported):
    """An export for short prompts (here shorter than the two-image probe) still checks every probe."""
    checkpoint, processor_dir = exported
    short = ServingConfig(max_seq_len=700, max_image_tokens=600, max_prompt_tokens=650)
    assert check_prompt_ids(checkpoint, processor_dir, ModelSpec.from_pretrained(checkpoint), short) == len(
        PROBE_PROMPTS)


def drop_the_leading_space(processor_dir) -> None:
    """Make the copied tokenizer lose its normalizer's `▁` before each piece of text."""
    tokenizer_json = json.loads((processor_dir / "tokenizer.json").read_text())
    tokenizer_json["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    (processor_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))


def test_export_check_names_the_first_prompt_that_differs(tmp_path):
    checkpoint = preset_checkpoint("tiny-sentencepiece")
    copy_processor_files(checkpoint, tmp_path)
    drop_the_leading_space(tmp_path)
    with pytest.raises(ProcessorMismatchError,
                       match=r"tokenizes 'What is in this image\?' with 1 image\(s\).*position 1"):
        check_prompt_ids(checkpoint, tmp_path, ModelSpec.from_pretrained(checkpoint), ServingConfig())


def test_export_stops_on_a_mismatch(tmp_path, monkeypatch):
    """`python -m export` exits with the check's message and writes no language model."""
    import llava_triton.processor as processor_module
    from export.__main__ import main as export_main

    copy = processor_module.copy_processor_files

    def copy_and_break(source, dest):
        copied = copy(source, dest)
        drop_the_leading_space(dest)
        return copied

    monkeypatch.setattr(processor_module, "copy_processor_files", copy_and_break)
    with pytest.raises(SystemExit, match="export stopped: the exported preprocessing tokenizes"):
        export_main(["--model", str(preset_checkpoint("tiny-sentencepiece")), "--output", str(tmp_path / "repo"),
                     "--engine", "pytorch", "--device", "cpu", "--no-onnx"])
    assert not (tmp_path / "repo" / "language_model" / "1" / "model.safetensors").exists()
    shutil.rmtree(tmp_path / "repo")


def test_the_7b_presets_processor_passes_the_export_check(tmp_path):
    """The benchmark preset's tokenizer (LLaVA-1.5's ids) without building its 7B weights."""
    from transformers import LlavaConfig

    from llava_triton.checkpoint import image_processor_config, load_preset, processor_config
    from llava_triton.preset_tokenizers import write_json, write_tokenizer

    preset = load_preset("llava-1.5-7b")
    spec = ModelSpec.from_hf_config(preset["config"])
    write_tokenizer(preset, tmp_path)
    LlavaConfig(**json.loads(json.dumps(preset["config"]))).to_json_file(tmp_path / "config.json")
    write_json(tmp_path / "preprocessor_config.json", image_processor_config(spec))
    write_json(tmp_path / "processor_config.json", processor_config(spec))
    copy_processor_files(tmp_path, tmp_path / "processor")
    assert check_prompt_ids(tmp_path, tmp_path / "processor", spec, ServingConfig()) == len(PROBE_PROMPTS)
