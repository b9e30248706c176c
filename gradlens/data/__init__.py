"""Small LLaMA builders, a local corpus and tokenizer for the demo, examples and benchmarks."""

from gradlens.data.batches import DataBundle, prepare_data
from gradlens.data.corpus import Corpus, Document, load_corpus
from gradlens.data.models import LLAMA_SIZES, build_llama, llama_config
from gradlens.data.tokenizer import train_tokenizer

__all__ = [
    "LLAMA_SIZES",
    "Corpus",
    "DataBundle",
    "Document",
    "build_llama",
    "llama_config",
    "load_corpus",
    "prepare_data",
    "train_tokenizer",
]
