"""The bundled demo: a public-domain Quijote excerpt and the chat rows built from it."""
