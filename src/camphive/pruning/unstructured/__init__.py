"""Unstructured pruning: single weights selected, merged into kept ones and masked."""
