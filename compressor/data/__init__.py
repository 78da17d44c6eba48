"""Labelled data: in-memory sets, streams, label checks."""
