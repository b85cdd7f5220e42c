"""Validation callbacks and torchmetrics Metric classes."""
