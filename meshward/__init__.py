"""meshward command line, configuration and process wiring (no domain logic)."""
