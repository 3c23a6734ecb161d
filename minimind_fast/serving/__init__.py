"""OpenAI-compatible serving: a continuous-batching engine (`engine`) behind a FastAPI app (`app`)."""
