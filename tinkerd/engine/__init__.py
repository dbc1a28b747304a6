"""Scheduling: per-run seq_id order, cross-tenant batching under a token budget, sampling."""
