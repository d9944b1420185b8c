"""The MQTT side: topics, request/reply messages (pure) and the paho transport (the only paho importer)."""
