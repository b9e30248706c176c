"""Small LLaMA builders, a local corpus and tokenizer for the demo, examples and benchmarks."""

from gradlens.data.models import LLAMA_SIZES, build_llama, llama_config

__all__ = ["LLAMA_SIZES", "build_llama", "llama_config"]
