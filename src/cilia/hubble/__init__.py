"""Hubble-compatible flow observability: observer ring, filters, printers, relay, metrics."""
