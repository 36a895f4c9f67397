"""Data: fetch raw logs, ingest them into HF ``datasets``, split, synthesise."""
