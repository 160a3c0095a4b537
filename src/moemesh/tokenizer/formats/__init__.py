"""Chat, tool-call and reasoning formats: how a conversation becomes a prompt and how the model's
output is read back, per model family. Below the engine (imports only tokenizer, errors), so the
server, the CLI and the models share one copy.

chat_prompt (messages + tools + tool_choice -> prompt text and prefill, by template or built-in
renderer), harmony (gpt-oss: render and parse channels), deepseek_chat / deepseek_tools (DeepSeek
V2.5/V3/R1: render, stream tool calls), tool_parser (Hermes/Qwen ``<tool_call>``), reasoning
(``<think>``), holdback (how much streamed text to hold back while a marker may be starting).
"""
