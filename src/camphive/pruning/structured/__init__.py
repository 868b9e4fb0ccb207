"""Structured pruning: whole channels folded into kept ones and physically removed."""
