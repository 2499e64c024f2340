"""GPT-OSS's harmony template `internvl3_5_gpt_oss`: prompts, training labels and chat()'s answer, against
the format of the official code (OpenGVLab/InternVL internvl_chat_gpt_oss: conversation.py's template,
dataset.py's `preprocess_internvl3_5_gpt_oss` / `_with_think`, modeling_internvl_chat.py's chat)."""
import numpy as np
import pytest
from PIL import Image

from conftest import bpe_tokenizer
from internvl_jax.inference import chat as chat_lib
from internvl_jax.inputs.conversation import get_template, harmony_reply_done, parse_harmony
from internvl_jax.inputs.processor import Processor
from internvl_jax.inputs.tokenizer import Tokenizer

# Written out from the official conversation.py, not taken from our module.
SYSTEM = ("<|start|>system<|message|>You are InternVL, a large language model trained by Shanghai AI Laboratory.\n"
          "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. "
          "Channel must be included for every message.<|end|>")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>",
           "<|return|>", "<|call|>", "<|constrain|>", "<think>", "</think>", "<img>", "</img>", "<IMG_CONTEXT>"]
HARMONY = get_template("internvl3_5_gpt_oss")


def ctx(n):
  return "<img>" + "<IMG_CONTEXT>" * n + "</img>"


@pytest.fixture(scope="module")
def processor():
  tok = bpe_tokenizer(["What is in the image? A red panda is eating bamboo.", "The answer is 42. Let me look. A cat.",
                       "system user assistant final analysis", SYSTEM], SPECIAL, 1)
  return Processor(Tokenizer(tok, template="internvl3_5_gpt_oss"), template="internvl3_5_gpt_oss", tokens_per_tile=4)


def decode(processor, ids):
  return processor.tokenizer.decode(ids, skip_special_tokens=False)


def supervised_spans(labels):
  """[(start, end)] of the runs of supervised positions."""
  on = np.concatenate([[False], labels != -100, [False]])
  edges = np.flatnonzero(on[1:] != on[:-1])
  return list(zip(edges[::2], edges[1::2]))


# ------------------------------------------------------------------------------------------- prompts

def test_text_prompt_ends_with_the_bare_assistant_role(processor):
  out = processor([{"role": "user", "content": "Hi"}])
  assert decode(processor, out["input_ids"]) == SYSTEM + "<|start|>user<|message|>Hi<|end|><|start|>assistant"
  assert out["pixel_values"] is None


def test_image_prompt_and_history(processor):
  text = processor.text([{"role": "user", "content": "What is in the image?"},
                         {"role": "assistant", "content": "A red panda."},
                         {"role": "user", "content": "Sure?"}], images=[Image.new("RGB", (448, 448))])
  # earlier replies close with <|end|>: sep2 only ends a conversation's last message (official MPT_TWO)
  assert text == (SYSTEM + f"<|start|>user<|message|>{ctx(4)}\nWhat is in the image?<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>A red panda.<|end|>"
                  "<|start|>user<|message|>Sure?<|end|><|start|>assistant")


def test_system_message_replaces_the_default(processor):
  text = processor.text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
  assert text == "<|start|>system<|message|>Be brief.<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant"


@pytest.mark.parametrize("marker", ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>"])
def test_control_tokens_in_text_are_rejected(processor, marker):
  with pytest.raises(ValueError, match=f"message 1: the text holds '{marker}'"):
    processor([{"from": "human", "value": "hi"}, {"from": "gpt", "value": f"a{marker}b"}], train=True)
  with pytest.raises(ValueError, match=f"system= holds '{marker}'"):
    processor([{"role": "user", "content": "hi"}], system=marker)


# ------------------------------------------------------------------------------------------- labels

def test_text_only_training_sample(processor):
  """The official preprocess raises on text-only samples (its `i` is never bound); ours renders them."""
  out = processor([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "The answer is 42."}], train=True)
  ids, labels = out["input_ids"], out["labels"]
  reply = "<|channel|>final<|message|>The answer is 42.<|return|>"
  assert decode(processor, ids) == SYSTEM + "<|start|>user<|message|>Hi<|end|><|start|>assistant" + reply
  [(start, end)] = supervised_spans(labels)
  assert end == len(ids) and decode(processor, labels[start:end]) == reply
  assert decode(processor, ids[:start]).endswith("<|start|>assistant")
  np.testing.assert_array_equal(labels[start:end], ids[start:end])
  np.testing.assert_allclose(out["loss_weights"][start:end], 1 / np.sqrt(end - start))


def test_multi_turn_labels_and_only_the_last_reply_returns(processor):
  tok = processor.tokenizer
  out = processor([{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A red panda."},
                   {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "The answer is 42."}],
                  images=[Image.new("RGB", (448, 448))], train=True)
  ids, labels = out["input_ids"], out["labels"]
  first = "<|channel|>final<|message|>A red panda.<|end|>"
  last = "<|channel|>final<|message|>The answer is 42.<|return|>"
  assert decode(processor, ids) == (SYSTEM + f"<|start|>user<|message|>{ctx(4)}\nWhat is in the image?<|end|>"
                                    f"<|start|>assistant{first}<|start|>user<|message|>Sure?<|end|>"
                                    f"<|start|>assistant{last}")
  assert (ids == tok.token_id("<|return|>")).sum() == 1
  spans = supervised_spans(labels)
  assert [decode(processor, labels[a:b]) for a, b in spans] == [first, last]
  for a, _ in spans:  # masked: the `<|start|>assistant` right before each reply, and everything else
    assert decode(processor, ids[:a]).endswith("<|start|>assistant")
    assert decode(processor, ids[a - len(tok.encode("<|start|>assistant")):a]) == "<|start|>assistant"
  assert (labels[labels != -100] == ids[labels != -100]).all()


def test_thinking_reply_gets_an_analysis_message(processor):
  """`preprocess_internvl3_5_gpt_oss_with_think`: analysis, `<|end|>`, then `<|start|>assistant` and the final
  channel; only the first `<|start|>assistant` is masked. Its system message stays the default one."""
  sample = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "<think>\nLet me look.\n</think>\n\nA cat."}]
  out = processor(sample, train=True, thinking=True)
  reply = ("<|channel|>analysis<|message|>Let me look.<|end|>"
           "<|start|>assistant<|channel|>final<|message|>A cat.<|return|>")
  assert decode(processor, out["input_ids"]) == (SYSTEM + "<|start|>user<|message|>What is it?<|end|>"
                                                 "<|start|>assistant" + reply)
  [(start, end)] = supervised_spans(out["labels"])
  assert decode(processor, out["labels"][start:end]) == reply
  # without thinking the text goes into the final channel as it is, like the plain official preprocess
  plain = processor.text(sample, train=True)
  assert plain.endswith("<|start|>assistant<|channel|>final<|message|><think>\nLet me look.\n</think>\n\nA cat.<|return|>")


# ------------------------------------------------------------------------------------------- answers

@pytest.mark.parametrize("text, want", [
    ("<|channel|>final<|message|>A red panda.", "A red panda."),  # <|return|> is the eos, removed
    ("<|channel|>final<|message|>A red panda.<|end|><|start|>assistant<|channel|>final<|message|>again", "A red panda."),
    ("A red panda.", "A red panda."),  # the model skipped the channel header
    ("<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>final<|message|> 42 ", "42"),
    ("<|channel|>analysis<|message|>Still thinking", ""),  # ran out of tokens before a final message
    ("<|channel|>final", ""),
])
def test_reply_answer_is_the_final_channel(text, want):
  assert chat_lib.reply_answer(HARMONY, text) == want


def test_reply_answer_thinking_and_stop_strings():
  text = "<|channel|>analysis<|message|> Let me look. <|end|><|start|>assistant<|channel|>final<|message|>A cat. END x"
  assert chat_lib.reply_answer(HARMONY, text, thinking=True, stop=("END",)) == ("Let me look.", "A cat.")
  assert chat_lib.reply_answer(HARMONY, "<|channel|>final<|message|>A cat.", thinking=True) == ("", "A cat.")
  chatml = get_template("internvl2_5")
  assert chat_lib.reply_answer(chatml, "<think>a</think>\nb", thinking=True) == ("a", "b")
  assert chat_lib.reply_answer(chatml, " b STOP c", stop=("STOP",)) == "b"


def test_reply_done_waits_for_the_final_message():
  assert not harmony_reply_done("<|channel|>analysis<|message|>Hmm.<|end|>")
  assert not harmony_reply_done("<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>final<|message|>4")
  assert harmony_reply_done("<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>final<|message|>4<|end|>")
  assert harmony_reply_done("4<|end|>") and not harmony_reply_done("4")


def test_rendered_replies_parse_back():
  assert parse_harmony(HARMONY.reply("<think>a b</think> c d", thinking=True)) == ("a b", "c d")
  assert parse_harmony(HARMONY.reply("c d")) == ("", "c d")


def test_chat_stops_at_return_and_at_a_closed_final_message(processor, monkeypatch):
  """chat() without a model: a scripted generate that applies eos ids and the stop callable like the real one."""
  tok = processor.tokenizer
  script = tok.encode("<|channel|>analysis<|message|>Let me look.<|end|><|start|>assistant<|channel|>final<|message|>"
                      "A cat.<|end|><|start|>assistant<|channel|>final<|message|>more<|return|>")
  seen = {}

  def fake_generate(model, input_ids, pixel_values, *, max_new_tokens, eos_token_ids, pad_token_id, stop, **kw):
    seen.update(prompt=input_ids[0], eos=eos_token_ids)
    out = np.full((1, max_new_tokens), pad_token_id, np.int64)
    for step, t in enumerate(script[:max_new_tokens]):
      out[0, step] = t
      if t in eos_token_ids or (stop is not None and stop(0, out[0, :step + 1])):
        break
    return out, [{}]

  monkeypatch.setattr(chat_lib, "generate", fake_generate)
  assert chat_lib.chat(None, processor, "What is it?", thinking=True, max_new_tokens=64) == ("Let me look.", "A cat.")
  assert seen["eos"] == (tok.token_id("<|return|>"),)
  assert decode(processor, seen["prompt"]).endswith("<|start|>user<|message|>What is it?<|end|><|start|>assistant")
  script[:] = tok.encode("<|channel|>final<|message|>A cat.<|return|>junk")
  assert chat_lib.chat(None, processor, "What is it?", max_new_tokens=64) == "A cat."


def test_tokenizer_ends_replies_at_return_and_must_match_the_processor(processor):
  tok = processor.tokenizer
  assert tok.eos_id == tok.token_id("<|return|>")
  with pytest.raises(ValueError, match="template 'internvl3_5_gpt_oss'.*'internvl2_5'"):
    Processor(tok, template="internvl2_5")
  chatml = Tokenizer(tok.tok)  # the default ChatML template: its reply ends at <|im_end|>
  assert chatml.eos_id == tok.token_id("<|im_end|>")


def test_server_text_is_the_final_channel_as_it_streams(processor):
  """`reply_text`, what the server sends: the final channel's text so far, complete once it is closed."""
  tok = processor.tokenizer
  ids = tok.encode("<|channel|>analysis<|message|>Let me look.<|end|><|start|>assistant<|channel|>final"
                   "<|message|>A cat.<|end|>")
  seen = [chat_lib.reply_text(HARMONY, tok, ids[:n]) for n in range(1, len(ids) + 1)]
  final_header = len(ids) - 1 - ids[::-1].index(tok.token_id("<|message|>"))
  assert all(text == "" for text, _ in seen[:final_header + 1])  # nothing of the analysis channel
  assert seen[-2] == ("A cat.", False) and seen[-1] == ("A cat.", True)
  assert chat_lib.reply_text(get_template("internvl2_5"), tok, tok.encode("A cat.")) == ("A cat.", False)
