"""GGUF files as models: read with the `gguf` package, converted once into a Hugging Face
folder in the store's cache, tokenizer rebuilt from the file's metadata."""

from edgeserve.gguf.convert import ensure_folder
from edgeserve.gguf.reader import GGUFError, GGUFFile

__all__ = ["GGUFError", "GGUFFile", "ensure_folder"]
