"""`mlxmtp serve`: an OpenAI-compatible HTTP API over one model, decoding with its MTP heads.

api.py: request fields and response shapes; worker.py: the decoding thread, its bounded queue and the prompt cache;
app.py: the Starlette routes, server-sent events and the uvicorn server.
"""
