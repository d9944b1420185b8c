"""llmqtt: one small LLM on an edge board, serving prompt-defined text tasks over MQTT."""

__version__ = "0.1.0"
