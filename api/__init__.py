"""The Tuneforge REST API deployable: OpenAI-compatible files and fine-tuning jobs, plus a pass-through
to the serving gateway so one base URL serves both fine-tuning and inference."""
