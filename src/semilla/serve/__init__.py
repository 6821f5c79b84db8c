"""The OpenAI-compatible server: `semilla serve`. FastAPI over the continuous-batching engine."""
