"""Durable local storage shared by the agent and the coordinator."""

from storage.atomic import atomic_write, fsync_dir
from storage.docstore import AtomicJSONStorage, open_docstore

__all__ = ["AtomicJSONStorage", "atomic_write", "fsync_dir", "open_docstore"]
