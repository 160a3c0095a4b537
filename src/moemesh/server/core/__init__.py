"""One request through the engine, whatever API it came in by: state (settings, model, names,
prompt threads), engine_loop (the engine's thread, failure isolation), admission (429), prompting
(cheap length check, render + tokenize off the event loop), sampling (fields -> SamplingParams),
generation (tokens -> text -> stop strings -> reasoning -> tool calls -> deltas), stop_strings,
sse (streams, client disconnects), metrics (Prometheus)."""
