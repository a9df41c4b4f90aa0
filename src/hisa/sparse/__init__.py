"""Sparse attention: coordinator, algorithms (quest, quest-mean, oracle, streaming), backend adaptor, config."""
