"""HTTP beside MQTT: the Ollama and OpenAI APIs, the task endpoints, /healthz, /metrics and a web page.

server.py is the only aiohttp importer; everything else here is pure (JSON in, dicts out).
"""
