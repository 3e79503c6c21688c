"""Data code: chat template, media preprocessing, collate, ToyWorld builder and converters."""
