"""The `messages` input: a whole conversation rendered by the checkpoint's chat template.

Without a server: the ids equal transformers' processor's for the same messages, a prompt and its
one-turn messages give the same ids, and every refusal names its problem. Through a real server
(gRPC): the greedy tokens equal transformers', and refusals come back as the request's error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llava_triton.errors import InvalidRequestError
from llava_triton.preprocess import Preprocessor, chat_messages, parse_messages, request_text
from llava_triton.spec import IMAGE_TOKEN, ModelSpec, ServingConfig
from llava_triton.testing.reference import hf_generate, hf_inputs, make_test_images, tiny_checkpoint

IMAGES = make_test_images()
SERVING = ServingConfig()


def user(*parts) -> dict:
    return {"role": "user", "content": [{"type": "image"} if part is None else {"type": "text", "text": part}
                                        for part in parts]}


CONVERSATIONS = {
    "one image, then text": ([IMAGES["jpeg"]], [user(None, "What is in the picture?")]),
    "text between two images": ([IMAGES["jpeg"], IMAGES["png"]], [user("Compare", None, "with", None, "please.")]),
    "system, user, assistant, user": ([IMAGES["webp"]], [
        {"role": "system", "content": "You describe pictures in one sentence."},
        user(None, "What is this?"),
        {"role": "assistant", "content": "A red square and a blue ball."},
        {"role": "user", "content": "Which colour is larger?"}]),
    "text only, string content": ([], [{"role": "user", "content": "Tell me about the sea."}]),
    "assistant turn with parts": ([], [user("Hi"), {"role": "assistant", "content": [{"type": "text",
                                                                                      "text": "Hello"}]},
                                       user("Again")]),
}


@pytest.fixture(scope="module")
def checkpoint():
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def preprocessor(checkpoint):
    return Preprocessor.from_pretrained(checkpoint, ModelSpec.from_pretrained(checkpoint), SERVING)


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_messages_match_transformers(checkpoint, preprocessor, case):
    images, messages = CONVERSATIONS[case]
    input_ids, pixel_values, _ = preprocessor(images, None, messages=json.dumps(messages).encode())
    hf_ids, hf_pixel_values = hf_inputs(checkpoint, images, None, messages=messages)
    np.testing.assert_array_equal(input_ids, hf_ids)
    if images:
        np.testing.assert_array_equal(pixel_values, hf_pixel_values)


def test_a_prompt_is_the_one_user_turn_of_messages(preprocessor):
    for prompt, messages in [("What is in the picture?", [user(None, "What is in the picture?")]),
                             (f"Look: {IMAGE_TOKEN} and say.", [user("Look:", None, "and say.")])]:
        np.testing.assert_array_equal(preprocessor.build_input_ids(prompt, 1),
                                      preprocessor.build_input_ids(None, 1, messages=json.dumps(messages)))
    assert chat_messages("Hi", 0, SERVING) == [user("Hi")]


def test_texts_go_to_the_template_as_they_are(preprocessor):
    rendered = preprocessor.render(parse_messages(json.dumps([{"role": "system", "content": "  Be brief.\n"},
                                                              user(None, " What? ")]), 1, SERVING))
    assert rendered == f"  Be brief.\n USER: {IMAGE_TOKEN}\n What?  ASSISTANT:"


def test_request_text_takes_exactly_one_of_prompt_and_messages():
    prompt, messages = np.array([b"hi"], dtype=object), np.array([b"[]"], dtype=object)
    assert request_text(prompt, None) == (b"hi", None)
    assert request_text(None, messages) == (None, b"[]")
    with pytest.raises(InvalidRequestError, match="send either prompt or messages, not both"):
        request_text(prompt, messages)
    with pytest.raises(InvalidRequestError, match="the prompt input is required .* or messages"):
        request_text(None, None)
    with pytest.raises(InvalidRequestError, match="messages must hold exactly one string, got 2"):
        request_text(None, np.array([b"[]", b"[]"], dtype=object))
    with pytest.raises(InvalidRequestError, match="send either prompt or messages"):
        chat_messages("hi", 0, SERVING, messages="[]")
    with pytest.raises(InvalidRequestError, match="prompt input is required"):
        chat_messages(None, 0, SERVING)


REFUSED = {
    "not JSON": (b"[{", 0, r"messages is not valid JSON \(Expecting"),
    "not UTF-8": (b'[{"role": "user", "content": "caf\xe9"}]', 0, r"messages is not valid UTF-8 \(byte 33"),
    "lone surrogate": ('[{"role": "user", "content": "\\ud800"}]', 0,
                       r"messages\[0\].content is not valid UTF-8"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, 0, "messages is nested too deeply"),
    "huge integer": ('[{"role": "user", "content": ' + "9" * 5000 + "}]", 0, "messages is not valid JSON"),
    "an object": ('{"role": "user", "content": "hi"}', 0, "messages must be a JSON array of turns, got an object"),
    "empty": ("[]", 0, "messages is empty"),
    "a turn that is a string": ('["hi"]', 0, r"messages\[0\] must be an object with role and content, got a string"),
    "no role": ('[{"content": "hi"}]', 0, r"messages\[0\] has no 'role'"),
    "no content": ('[{"role": "user"}]', 0, r"messages\[0\] has no 'content'"),
    "unknown key": ('[{"role": "user", "content": "hi", "name": "x"}]', 0,
                    r"messages\[0\] has unknown keys \['name'\]"),
    "unknown role": ('[{"role": "tool", "content": "hi"}]', 0,
                     r'messages\[0\].role "tool" is not system, user or assistant'),
    "role not a string": ('[{"role": 3, "content": "hi"}]', 0, r"messages\[0\].role a number is not system"),
    "content a number": ('[{"role": "user", "content": 7}]', 0,
                         r"messages\[0\].content must be a string or an array of parts, got a number"),
    "content null": ('[{"role": "user", "content": null}]', 0, r"messages\[0\].content must be .* got null"),
    "part a string": ('[{"role": "user", "content": ["hi"]}]', 0,
                      r"messages\[0\].content\[0\] must be an object \(a content part\), got a string"),
    "part type unknown": ('[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]', 0,
                          r'messages\[0\].content\[0\].type "image_url" is not text, image or video'),
    "part without type": ('[{"role": "user", "content": [{"text": "hi"}]}]', 0,
                          r"messages\[0\].content\[0\] has no 'type'"),
    "text not a string": ('[{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]', 0,
                          r"messages\[0\].content\[0\].text must be a string, got an array"),
    "text part with an extra key": ('[{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]', 0,
                                    r"messages\[0\].content\[0\] has unknown keys \['x'\]"),
    "image part with an url": ('[{"role": "user", "content": [{"type": "image", "url": "x"}]}]', 1,
                               r"messages\[0\].content\[0\] has unknown keys \['url'\]"),
    "image tag in a text": ('[{"role": "user", "content": "look <image>"}]', 1,
                            r"messages\[0\].content contains <image>: in messages an image is a"),
    "image in a system turn": ('[{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": '
                               '"hi"}]', 1, r"messages\[0\].content\[0\]: an image can only be in a user turn"),
    "fewer images than parts": (json.dumps([user(None, None, "which?")]), 1,
                                "messages have 2 image parts but 1 images were sent"),
    "more images than parts": (json.dumps([user("which?")]), 2, "messages have 0 image parts but 2 images were sent"),
    "nothing to say": ('[{"role": "user", "content": " "}]', 0, "messages hold no text and no image"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_the_problem(case):
    messages, num_images, pattern = REFUSED[case]
    with pytest.raises(InvalidRequestError, match=pattern):
        parse_messages(messages, num_images, SERVING)


def test_limits_on_turns_and_bytes(preprocessor):
    turns = [user("hi")] * 3
    parse_messages(json.dumps(turns), 0, ServingConfig(max_messages=3))
    with pytest.raises(InvalidRequestError, match=r"messages has 4 turns, more than the limit of 3 \(max_messages\)"):
        parse_messages(json.dumps(turns + [user("hi")]), 0, ServingConfig(max_messages=3))
    data = json.dumps(turns).encode()
    parse_messages(data, 0, ServingConfig(max_messages_bytes=len(data)))
    with pytest.raises(InvalidRequestError, match=f"messages is {len(data)} bytes, more than the limit of "
                                                  f"{len(data) - 1} bytes \\(max_messages_bytes\\)"):
        parse_messages(data, 0, ServingConfig(max_messages_bytes=len(data) - 1))
    # The request's bytes count the messages where they would count the prompt.
    small = Preprocessor(preprocessor.tokenizer, preprocessor.image_processor, preprocessor.chat_template,
                         preprocessor.spec, ServingConfig(max_request_bytes=len(IMAGES["jpeg"]) + len(data) - 1))
    with pytest.raises(InvalidRequestError, match=r"request is \d+ bytes \(1 images and the text\).*max_request_bytes"):
        small([IMAGES["jpeg"]], None, messages=json.dumps([user(None, "hi"), user("hi"), user("hi")]))


def test_a_conversation_past_the_context_is_refused(preprocessor):
    long_turns = [user("The red square is next to the blue circle. " * 100)] * 10
    with pytest.raises(InvalidRequestError, match=r"prompt is \d+ tokens .* the limit is 4095"):
        preprocessor([], None, messages=json.dumps(long_turns))


# --- through a real server --------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["text between two images", "system, user, assistant, user"])
def test_served_messages_equal_transformers(llava_client, tiny_checkpoint, case):
    images, messages = CONVERSATIONS[case]
    expected = hf_generate(tiny_checkpoint, images, None, 10, messages=messages)
    result = llava_client.generate(messages=messages, images=images, max_tokens=10)
    assert result.token_ids == expected
    # The same request with the messages as JSON text, streamed.
    streamed = list(llava_client.stream(messages=json.dumps(messages), images=images, max_tokens=10))
    assert [t for chunk in streamed for t in chunk.token_ids] == expected


@pytest.mark.e2e
def test_served_prompt_and_its_messages_give_the_same_answer(llava_client):
    by_prompt = llava_client.generate("What is in the picture?", [IMAGES["jpeg"]], max_tokens=8)
    by_messages = llava_client.generate(messages=[user(None, "What is in the picture?")], images=[IMAGES["jpeg"]],
                                        max_tokens=8)
    assert by_messages.token_ids == by_prompt.token_ids and by_messages.prompt_tokens == by_prompt.prompt_tokens


@pytest.mark.e2e
def test_served_refusals_name_the_problem_and_the_server_goes_on(llava_client, triton_server):
    import numpy as np
    import tritonclient.grpc as grpcclient

    from client import LlavaError

    with pytest.raises(LlavaError, match=r'messages\[1\].role "tool" is not system, user or assistant'):
        llava_client.generate(messages=[user("hi"), {"role": "tool", "content": "x"}], max_tokens=2)
    with pytest.raises(LlavaError, match="messages have 1 image parts but 0 images were sent"):
        llava_client.generate(messages=[user(None, "hi")], max_tokens=2)
    # Both inputs at once, which the client refuses to build: tensors by hand.
    inputs = []
    for name, value in (("prompt", b"hi"), ("messages", json.dumps([user("hi")]).encode())):
        tensor = grpcclient.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value], dtype=object))
        inputs.append(tensor)
    with pytest.raises(LlavaError, match="send either prompt or messages, not both"):
        list(llava_client._stream(inputs, timeout=60))
    assert llava_client.generate(messages=[user("hi")], max_tokens=2).completion_tokens == 2
