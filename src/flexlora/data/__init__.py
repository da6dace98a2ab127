"""Federated instruction data: loaders, partitioners, prompt formats, and the built-in task suite."""

from flexlora.data.types import ClientData, DataError, Example

__all__ = ["ClientData", "DataError", "Example"]
