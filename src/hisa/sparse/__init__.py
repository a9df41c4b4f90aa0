"""Sparse attention: coordinator, algorithms (quest, oracle, streaming), backend adaptor, config."""
