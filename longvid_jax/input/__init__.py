"""Input pipeline (Grain): decode video and audio, features, tokenizer, chat templates, batches.

Modules: `decode` (frames and audio from files), `audio` (Whisper log-mel, per-second windows),
`tokenizer` (offline Qwen2, local HF folders), `chat` (templates, loss masks), `sources`
(annotation files), `transforms` (per-record decoding, skipping and bucketed batching) and
`pipeline` (`PipelineConfig`, `make_dataset`, `make_iterator`). Nothing is imported here, so
that importing one module stays cheap in worker processes.
"""
