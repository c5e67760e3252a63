"""`kvsqueeze serve`: an OpenAI-compatible HTTP server that compresses a long context once and answers many requests
over it (needs the `serve` extra: `pip install "kvsqueeze[serve]"`).

One module per job, importing only downward:
- `settings`: the server's options (`ServerSettings`), checked when built.
- `compression`: a request's `kv_compression` field turned into a method, with the CLI's errors.
- `prompts`: where a chat or completion prompt is split into the cached prefix and the question.
- `store`: compressed contexts in memory (least recently used dropped first, bounded by bytes measured from the
  storages) and on disk (`--cache-dir`, the library's checked cache files).
- `engine`: the model's work: prefill and compress a prefix (or find it cached), decode a batch of rows over it.
- `scheduler`: one worker thread that alone runs the engine, fed by a bounded queue; requests over the same context
  waiting together are decoded as rows of one batch.
- `metrics`: the Prometheus metrics of `GET /metrics`.
- `errors`, `schemas`, `middleware`, `responses`, `app`: the HTTP side (OpenAI's error shape, the request models,
  API key and body limits, the response and stream chunk formats, the routes).
- `server`: load the model and run uvicorn (what the CLI calls).

Importing this package imports nothing heavy; its modules import FastAPI, pydantic and torch as they need.
"""
