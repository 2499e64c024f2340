"""From a conversation with images or video to model inputs: dynamic resolution tiles, frames, the chat
template, the tokenizer and the Processor that joins them."""
