"""A real Home Assistant for the tests (server.py), its installer (install_ha.sh), and HA's template rules for
tests that do not start it (templates.py)."""
