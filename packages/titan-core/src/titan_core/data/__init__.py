"""Data: the tokenizer, document sources and the layout-independent global batch loader.

The embedded default (``dataset="embedded"``, ``hf_assets_path=""``) needs no network: a corpus of
standard library docstrings and a 2048-token byte-level BPE tokenizer, built once and cached.
"""

from titan_core.data.embedded import EMBEDDED_VOCAB_SIZE, embedded_assets_dir
from titan_core.data.loader import GlobalBatchLoader
from titan_core.data.sources import DocumentSource, open_documents
from titan_core.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "EMBEDDED_VOCAB_SIZE",
    "DocumentSource",
    "GlobalBatchLoader",
    "Tokenizer",
    "embedded_assets_dir",
    "load_tokenizer",
    "open_documents",
]
